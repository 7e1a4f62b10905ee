"""bench/dpo_vs_trl.py on a tiny model, one round, fp32: the script runs with its flags; TRL joins when installed,
else the summary says why it was skipped."""

from bench import dpo_vs_trl


def test_dpo_optimizer_step_runs(capsys):
    """Catches a renamed flag, a broken import (sft.make_optimizer, dpo.make_loss), or the step's parts not timed."""
    dpo_vs_trl.main(["--model=tiny", "--seq=16", "--steps=1", "--device=cpu", "--dtype=float32"])
    out = capsys.readouterr().out
    assert "ours by part (ms): forward" in out and "ours with the plain head" in out, out
    assert "TRL's DPOTrainer" in out or "not installed" in out, out
