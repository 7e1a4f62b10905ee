"""plot.py: the figures judge.py's rows feed. Each docstring names the bug the test would catch. Figures drawn along
a pipeline are also checked where that pipeline is: training.png in tests/test_dpo.py, Figure 3 and the Best-of-N
curve in tests/test_sampling.py, results files of an older judge.py in tests/machinery/test_answer_store.py."""



import judge
import model as gpt
import plot
import sampling
from tests.helpers import SYNTHETIC


def test_dpo_steps_give_figure_3_right(tmp_path):
    """Catches: intermediate checkpoints not found or not told apart (their step missing from the rows), and
    the win-rate-vs-step figure not drawn."""
    for step in (200, 100):
        gpt.save_model(gpt.GPT(gpt.PRESETS["tiny"]), tmp_path / "dpo" / f"step_{step:06d}", {"step": step})
    rows = judge.main(SYNTHETIC + ["--models=sft:tiny", f"--dpo_steps={tmp_path / 'dpo'}", f"--out={tmp_path}",
                                   "--temperatures=0.5"])
    assert [(r["model"], r["step"]) for r in rows] == [
        ("sft", None), (sampling.STEPS_MODEL, 100), (sampling.STEPS_MODEL, 200)]
    plot.main([f"--out={tmp_path}", "--runs=", f"--sizes={tmp_path}/none"])
    assert (tmp_path / "fig3_steps.png").stat().st_size > 1000
