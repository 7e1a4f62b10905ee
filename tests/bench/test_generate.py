"""bench/generate.py on a tiny model, one round: the three decoders it races give the same tokens."""

import re

import pytest

from bench import generate, timing


@pytest.mark.skipif(timing.transformers is None, reason="transformers not installed")
def test_all_three_decoders_give_our_tokens(capsys):
    """Catches a renamed flag, a broken import, and a race between decoders that do different things (EOS left on
    in one, another prompt in the other): the "same tokens as ours" column falls below 100%."""
    generate.main(["--model=tiny", "--batch=2", "--prompt_len=8", "--new_tokens=4", "--steps=1", "--device=cpu",
                   "--dtype=float32"])
    out = capsys.readouterr().out
    same = re.findall(r"(\S+)%\n", out)
    assert same == ["100.0"] * 3 and "KV cache vs none:" in out, out
