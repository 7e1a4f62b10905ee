"""bench/fp32_head.py on a tiny model, one round: the script runs with its flags and prints both ratios."""

from bench import fp32_head


def test_fp32_and_low_precision_heads_run(capsys):
    """Catches a renamed flag, a broken import, or a head swap that no longer reaches GPT.forward's head."""
    fp32_head.main(["--model=tiny", "--batch=2", "--seq=16", "--steps=1", "--device=cpu", "--dtype=float32"])
    out = capsys.readouterr().out
    assert "SFT, bfloat16 head" in out and "DPO, fp32 head" in out and "fp32 head       step time vs" in out, out
