"""bench/dpo_step.py on a tiny model, one round: the script runs with its flags and prints its four steps."""

from bench import dpo_step


def test_the_four_steps_run_and_the_summary_prints(capsys):
    """Catches a renamed flag, a broken import, or a step that no longer runs (dpo.make_loss or dpo.dpo_loss with
    another signature, the two-forwards split of [chosen; rejected] wrong)."""
    dpo_step.main(["--model=tiny", "--batch=2", "--seq=16", "--steps=1", "--device=cpu", "--dtype=float32"])
    out = capsys.readouterr().out
    for name in ("SFT, same rows", "DPO fused, precomputed ref", "DPO two forwards, precomputed", "DPO fused, live ref"):
        assert f"\n  {name} " in out, out
    assert "fused vs two forwards:" in out and "precomputed vs live reference:" in out, out
