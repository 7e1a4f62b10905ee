"""bench/train_step.py on a tiny model, one round: the script runs with its flags, and the two models it races
compute the same log-probs (else the speed ratio compares different work)."""

import re

import pytest

from bench import timing, train_step


@pytest.mark.skipif(timing.transformers is None, reason="transformers not installed")
def test_ours_and_transformers_agree_and_the_summary_prints(capsys):
    """Catches a renamed flag, a broken import, and a weight map (to_transformers) that gives transformers other
    weights than ours: the printed max |diff| of the log-probs would be large."""
    train_step.main(["--model=tiny", "--batch=2", "--seq=16", "--steps=1", "--device=cpu", "--dtype=float32"])
    out = capsys.readouterr().out
    diff = float(re.search(r"max \|diff\| (\S+)", out).group(1))
    assert diff < 1e-3 and "train step      ours vs transformers:" in out, out
