"""machinery/checkpoints.py: a resumed run against an uninterrupted one, bit for bit, also after a kill mid-save;
Ctrl-C saves latest/ and the same command resumes. Tiny models, fp32 on the CPU. Each test's docstring names the
bug it would catch.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT, category_pairs, max_abs_diff, records, run_sft, settings, small_model, tensors

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny tensors run faster on one thread


RESUME = dict(checkpoint_every=2, eval_every=2, warmup_steps=3)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """4 steps in one go, with dropout 0.1 (so the RNG matters), lr warmup over 3 steps (so the step count
    matters) and a checkpoint every 2 steps."""
    out = tmp_path_factory.mktemp("uninterrupted")
    run_sft(settings(out=str(out), max_steps=4, **RESUME), small_model(dropout=0.1), category_pairs())
    return out


@pytest.mark.parametrize("crash", ["none", "leftover latest.tmp", "only latest.old"])
def test_resume_is_bit_for_bit(tmp_path, uninterrupted, crash):
    """Catches any state a resume loses or changes: RNG (dropout masks repeat -> weights differ), optimizer
    moments or their step count, the data position (batches re-seen), the lr schedule. And the latest/ swap:
    a kill mid-save leaves a half-written latest.tmp or only latest.old; either must still resume exactly."""
    out = tmp_path / "run"
    run_sft(settings(out=str(out), max_steps=2, **RESUME), small_model(dropout=0.1), category_pairs())
    if crash == "leftover latest.tmp":  # killed while writing the next checkpoint
        shutil.copytree(out / "latest", out / "latest.tmp")
        (out / "latest.tmp" / "state.json").unlink()
        (out / "latest.tmp" / "optimizer.safetensors").write_bytes(b"\x00" * 100)
    elif crash == "only latest.old":  # killed between the two renames of replace_dir
        (out / "latest").rename(out / "latest.old")
    # other initial weights and RNG state: only what latest/ restores can make the runs agree
    run_sft(settings(out=str(out), max_steps=4, **RESUME), small_model(seed=1, dropout=0.1), category_pairs())
    assert records(out, "train")[-1]["step"] == 4
    want = tensors(uninterrupted / "final" / "model.safetensors")
    got = tensors(out / "final" / "model.safetensors")
    unequal = [k for k in want if not torch.equal(want[k], got[k])]
    diff, where = max_abs_diff(want, got)
    assert not unequal, f"{crash}: weights differ in {unequal[:5]}; max abs diff {diff} at {where}"
    want = tensors(uninterrupted / "latest" / "optimizer.safetensors")  # moments, step counts, RNG state
    got = tensors(out / "latest" / "optimizer.safetensors")
    unequal = [k for k in want if not torch.equal(want[k], got[k])]
    assert want.keys() == got.keys() and not unequal, f"{crash}: optimizer/RNG state differs in {unequal[:5]}"
    leftovers = sorted(p.name for p in out.iterdir() if p.name.startswith("latest."))
    assert not leftovers, f"{crash}: {leftovers} left beside latest/"


def test_ctrl_c_saves_latest_and_the_same_command_resumes(tmp_path):
    """Ctrl-C must finish the step, save latest/ and exit 130; rerunning the command continues from there
    (catches a handler that exits without saving, or a save that a resume cannot read)."""
    import signal

    out = tmp_path / "run"
    cmd = [sys.executable, "sft.py", "--dataset=synthetic", "--model=tiny", "--device=cpu", "--dtype=float32",
           "--batch_size=4", "--micro_batch_size=4", "--eval_every=0", "--checkpoint_every=0", "--optimizer=adamw",
           f"--out={out}"]
    proc = subprocess.Popen(cmd + ["--max_steps=1000"], cwd=ROOT, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    for line in proc.stdout:  # wait until training is under way
        if "step 3/1000" in line:
            break
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, rest[-2000:]
    saved = json.loads((out / "latest" / "state.json").read_text())["step"]
    assert saved >= 3 and "interrupted" in rest, rest[-2000:]
    again = subprocess.run(cmd + [f"--max_steps={saved + 1}"], cwd=ROOT, env=dict(os.environ),
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert f"resumed from {out / 'latest'} at step {saved}" in again.stdout
    assert json.loads((out / "final" / "config.json").read_text())["meta"]["step"] == saved + 1
