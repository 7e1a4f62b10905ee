"""bench/gpu_check.py, the CUDA self-check: it must run everywhere (CI has no GPU), and its checks must be able to fail.

On a CPU the checks that mean something there run for real (`--device=cpu`): bf16 autocast vs fp32, the fused
SDPA kernel, fused vs for-loop AdamW, a 1-process torchrun DDP step (gloo), fp16 + GradScaler through sft.py,
cached vs uncached generation, and short runs of make bench's quicker scripts. On the first GPU the same code runs
on CUDA.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu_check

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine gpu_check runs every check")
def test_without_cuda_every_check_skips_and_exits_0():
    """Catches a script that crashes or fails without CUDA, which would make `make gpu-check` useless in CI."""
    run = subprocess.run([sys.executable, "-m", "bench.gpu_check"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == [f"SKIP  {name}" for name in gpu_check.CHECKS], lines


def test_cpu_checks_pass():
    """Every check that can run on a CPU passes there: catches a broken check (a wrong tolerance, a torchrun command
    that does not start, a flag of a bench/ script that no longer exists) before a GPU is lent to find it."""
    run = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--device=cpu"], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    status = {line.split("  ")[1].split(" (")[0]: line.split("  ")[0] for line in run.stdout.splitlines()
              if line.startswith(("PASS", "FAIL", "SKIP"))}
    cuda_only = {"torch.compile", "vocabulary head"}
    assert run.returncode == 0 and status == {name: "SKIP" if name in cuda_only else "PASS"
                                              for name in gpu_check.CHECKS}, run.stdout + run.stderr[-3000:]


def test_a_failing_check_prints_fail_and_exits_1(monkeypatch, capsys):
    """Catches a runner that swallows a check's error (PASS on a broken path) or still exits 0."""

    def broken(device):
        raise AssertionError("bf16 loss 2.0 vs fp32 1.0")

    monkeypatch.setattr(gpu_check, "CHECKS", {"bf16 autocast": broken, "generation": gpu_check.check_generation})
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--device=cpu"])
    assert gpu_check.main() == 1
    out = capsys.readouterr().out
    assert "FAIL  bf16 autocast" in out and "bf16 loss 2.0 vs fp32 1.0" in out and "PASS  generation" in out, out
