"""bench/tokenization.py on 20 pairs, one round: the script runs with its flags and its made-up pairs have HH's
shape."""

from bench import tokenization


def test_twenty_pairs_tokenize(capsys):
    """Catches a renamed flag or a broken import (data.tokenize_pairs, data.PARTS, the tokenizer's files)."""
    tokenization.main(["--n_pairs=20", "--steps=1"])
    out = capsys.readouterr().out
    assert "tokenization    ours " in out and "pairs/s" in out, out


def test_hh_like_pairs_have_hh_format():
    """Catches made-up pairs that data.py would not split as HH's (no Human/Assistant turn, no leading space)."""
    pairs = tokenization.hh_like_pairs(3, seed=0)
    assert all(p["prompt"].startswith("\n\nHuman: ") and p["prompt"].endswith("\n\nAssistant:") for p in pairs)
    assert all(p["chosen"].startswith(" ") and p["rejected"].startswith(" ") for p in pairs), pairs
