"""bench/decode.py on a tiny model, one round, fp32: the script runs with its flags and prints its step table."""

from bench import decode


def test_decode_steps_run(capsys):
    """Catches a renamed flag, a broken import (fast_generate.generate, prepare_linear), or a decoder dropped from
    the table."""
    decode.main(["--model=tiny", "--batch=2", "--prompt_len=8", "--new_tokens=4", "--steps=1", "--device=cpu",
                 "--dtype=float32"])
    out = capsys.readouterr().out
    assert "ours (fast_generate.generate)" in out and "ours, plain model.generate" in out, out
    assert "decode float32 " in out, out
