"""machinery/distributed.py: DDP and FSDP on gloo (two processes on the CPU) against one process with the same
global batch, the state each FSDP rank holds, checkpoints across modes and numbers of processes, two machines, and
launches that cannot work. Tiny models, fp32. Each test's docstring names the bug it would catch.
"""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import dpo
import model as gpt
import sft
from bench import memory
from tests.helpers import FAST, ROOT, SMALL, max_abs_diff, records, small_model, tensors

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny tensors run faster on one thread


SMALL_SPLITS = {"train": 32, "test": 8}  # precomputing reference log-probs of all 4,500 pairs takes minutes here


DRIVER = """
import sys
sys.path.insert(0, {root!r})
import data, dpo
data.load_pairs = lambda dataset, split: data.synthetic_pairs(split, n={splits!r}[split])
dpo.main(sys.argv[1:])
"""


# Every multi-process comparison trains with these settings. 5 held-out examples split 3 + 2 over two ranks: in
# micro-batches of 2, rank 0 runs one more eval forward than rank 1, which FSDP's gathers must not wait on forever.
TWO = {**FAST, "lr": 1e-4, "eval_every": 2, "n_eval": 5}


def torchrun(args: list[str], env: dict | None = None) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    result = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """runs(script, mode, steps=3, name=None, resume=None, extra=()) -> the run directory, trained once per module.

    Every run starts from the same initial weights (runs.init) with the TWO settings; mode is "one" (this process),
    "ddp" or "fsdp" (torchrun, 2 processes on gloo). FSDP runs also recompute activations (--grad_checkpoint) and,
    at batch 8 = 2 micro-batches x 2 per rank, accumulate without reducing in between. resume: start from a copy of
    that run's directory (latest/, metrics) without its final/. dpo runs train on SMALL_SPLITS, each with its own
    cache (name-cache/), so each computes its own reference table."""
    root = tmp_path_factory.mktemp("runs")
    gpt.save_model(small_model(), root / "init")
    driver = root / "driver.py"
    driver.write_text(DRIVER.format(root=str(ROOT), splits=SMALL_SPLITS))

    def run(script: str, mode: str, steps: int = 3, name: str | None = None, resume: Path | None = None, extra=()):
        out = root / (name or f"{script}-{mode}-{steps}")
        if (out / "final").exists():
            return out
        if resume is not None:
            shutil.copytree(resume, out, ignore=shutil.ignore_patterns("final"))
        args = [*(f"--{k}={v}" for k, v in TWO.items()), f"--model={root / 'init'}", "--dataset=synthetic",
                f"--max_steps={steps}", f"--out={out}", *extra]
        args += ["--fsdp=true", "--grad_checkpoint=true"] if mode == "fsdp" else []
        cache = {"DPO_CACHE": str(root / f"{out.name}-cache")} if script == "dpo" else {}
        if mode == "one":
            with pytest.MonkeyPatch.context() as mp:
                if script == "dpo":
                    mp.setattr(data, "load_pairs", lambda dataset, split: data.synthetic_pairs(split, SMALL_SPLITS[split]))
                    mp.setenv("DPO_CACHE", cache["DPO_CACHE"])
                (sft.main if script == "sft" else dpo.main)(args)
        else:
            torchrun(["sft.py" if script == "sft" else str(driver), *args], env=cache)
        return out

    run.init = root / "init"
    return run


def compare_runs(one: Path, two: Path, atol: float, steps: int = 3, evals: bool = True) -> None:
    a, b = records(one, "train"), records(two, "train")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, steps + 1)), (a, b)
    # grad_norm catches a gradient scaled by the world size, which RMSprop would hide. Its tolerance is looser: FSDP
    # sums gradients in another order, and RMSprop's division by tiny second moments (embedding rows seen once)
    # amplifies those last-bit differences, ~1e-5 relative after 4 steps. A world-size error is a factor of 2.
    for ra, rb in zip(a, b):
        for key, rtol in (("loss", 1e-5), ("grad_norm", 1e-4)):
            assert abs(ra[key] - rb[key]) <= rtol * abs(ra[key]) + 1e-6, \
                f"step {ra['step']} {key}: {one.name} {ra[key]}, {two.name} {rb[key]}, diff {abs(ra[key] - rb[key])}"
    if evals:  # (a resumed run evaluates the step it resumes at once more)
        ea, eb = records(one, "eval"), records(two, "eval")
        assert [r["step"] for r in ea] == [r["step"] for r in eb] and ea, (ea, eb)
        diff = max(abs(ra["loss"] - rb["loss"]) for ra, rb in zip(ea, eb))
        assert diff <= 1e-5 * abs(ea[-1]["loss"]), f"eval loss: {one.name} {ea}, {two.name} {eb}, max abs diff {diff}"
    start = tensors(one.parent / "init" / "model.safetensors")
    want, got = tensors(one / "final" / "model.safetensors"), tensors(two / "final" / "model.safetensors")
    moved, _ = max_abs_diff(start, want)
    diff, where = max_abs_diff(want, got)
    assert diff <= atol, f"final weights: max abs diff {diff} at {where} (training moved them by up to {moved})"
    assert moved > 100 * atol, f"training moved the weights by only {moved}"


@pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch build has no torch.distributed")
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
@pytest.mark.parametrize("script", ["sft", "dpo"])
def test_two_processes_match_one(runs, script, mode):
    """Catches DDP bugs: gradients averaged over ranks without the x world correction (half the gradient),
    ranks training on the same examples instead of disjoint halves of the batch, no_sync misplaced (a rank's
    micro-batches lost), metrics or eval not all-reduced, and (dpo) the precomputed reference table assembled
    wrongly from the ranks' shards. The lr is small enough that Adam-style noise amplification of zero
    gradients (see the accumulation test) stays below the tolerance. And FSDP bugs: the tied head sharded apart
    from wte (one would miss the other's gradient), the last micro-batch not reducing its gradients (shards keep
    only their own rank's), shards gathered wrongly into final/, activation checkpointing at odds with the
    re-gathered weights."""
    one, two = runs(script, "one"), runs(script, mode)
    if script == "dpo":
        tables = sorted((one.parent / f"{one.name}-cache" / "reference_logps").glob("*.npy"))
        assert len(tables) == 2, tables  # train and test
        for table in tables:
            want, got = np.load(table), np.load(two.parent / f"{two.name}-cache" / "reference_logps" / table.name)
            diff = np.abs(want - got).max()
            assert diff <= 1e-4, f"{table.name}: reference table of 1 process vs 2 ({mode}): max abs diff {diff}"
    compare_runs(one, two, atol=1e-5)


def test_fsdp_holds_a_world_th_of_the_state(runs):
    """Each FSDP rank must hold half of the parameters, gradients and optimizer state that a DDP rank holds (the
    logged, measured bytes of the real tensors): catches a block or the root left unsharded (wte is most of this
    model), gradients or optimizer moments kept whole. The numbers of bench/memory.py's state_per_rank, computed from
    the shapes alone for the README's memory table, must equal the measured ones exactly for both modes."""
    measured = {mode: records(runs("sft", mode), "memory")[0] for mode in ("ddp", "fsdp")}
    with torch.device("meta"):
        shapes = gpt.GPT(SMALL)
    for mode, record in measured.items():
        computed = memory.state_per_rank(shapes, world=2, fsdp=mode == "fsdp")
        got = {k: record[k] for k in computed}
        assert got == computed, f"{mode}: measured {got}, computed from shapes {computed}"
    for key in ("params", "grads", "optimizer"):
        ddp, fsdp = measured["ddp"][key], measured["fsdp"][key]
        assert abs(fsdp - ddp / 2) <= 0.01 * ddp, f"{key}: FSDP rank holds {fsdp} bytes, DDP rank {ddp}, want ~{ddp / 2}"


def test_fsdp_resumes_exactly_and_with_another_number_of_processes(runs):
    """2 FSDP steps, then a second FSDP launch resumes from latest/ to step 3: bit-identical weights and optimizer
    state to 3 uninterrupted FSDP steps. Catches optimizer moments not re-sharded on load (each rank taking the whole
    tensor, or rank 0's chunk), shards saved from one rank only, the step count or lr schedule lost. The same
    checkpoint resumed by one plain process must match 3 one-process steps within 1e-5: the files hold whole
    tensors, so a run may resume with any number of processes."""
    first = runs("sft", "fsdp", steps=2)
    resumed = runs("sft", "fsdp", name="sft-fsdp-resumed", resume=first)
    straight = runs("sft", "fsdp")
    for file in ("final/model.safetensors", "latest/optimizer.safetensors"):
        want, got = tensors(straight / file), tensors(resumed / file)
        unequal = [k for k in want if not torch.equal(want[k], got[k])]
        assert want.keys() == got.keys() and not unequal, f"{file}: resumed differs in {unequal[:5]}"
    compare_runs(runs("sft", "one"), runs("sft", "one", name="sft-one-from-fsdp", resume=first), atol=1e-5, evals=False)


def test_ddp_checkpoint_resumes_under_fsdp_with_offload(runs):
    """DDP's latest/ after 3 steps, resumed by FSDP with CPU offload for a 4th: must match 4 one-process steps
    within 1e-5. Catches checkpoints that differ between the modes (optimizer state keyed otherwise, the tied
    weight saved twice or not at all), and an offload step that does not train (shards on the CPU that the
    optimizer never updates, gradients lost on their way there)."""
    mixed = runs("sft", "fsdp", steps=4, name="sft-ddp-then-fsdp-offload", resume=runs("sft", "ddp"),
                 extra=("--offload=true",))
    compare_runs(runs("sft", "one", steps=4), mixed, atol=1e-5, steps=4, evals=False)


def test_two_machines_train_like_one_process(runs, tmp_path):
    """Two torchrun launchers on localhost, one process each, as two machines run `make sft NNODES=2 NODE_RANK=i
    MASTER_ADDR=... MASTER_PORT=...`: must train as one process does. Catches a Makefile that drops a variable
    (the launchers would wait for each other, then time out), and ranks taken from LOCAL_RANK (both would be
    rank 0: the same examples, and each would write the checkpoints)."""
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    train_args = " ".join(f"--{k}={v}" for k, v in TWO.items()) + " --dataset=synthetic --max_steps=3"
    procs = [subprocess.Popen(["make", "sft", f"PY={sys.executable}", f"MODEL={runs.init}", f"RUN_DIR={tmp_path}",
                               "NNODES=2", f"NODE_RANK={i}", "MASTER_ADDR=127.0.0.1", f"MASTER_PORT={port}",
                               "FSDP=true", f"TRAIN_ARGS={train_args}"], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
    try:
        logs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    shutil.copytree(tmp_path / "sft", runs.init.parent / "sft-two-machines")  # compare_runs finds init beside it
    compare_runs(runs("sft", "one"), runs.init.parent / "sft-two-machines", atol=1e-5)


def test_bad_launches_stop_with_an_error_that_says_what_to_do(tmp_path):
    """Catches settings that cannot work silently ignored or failing late (after tokenizing, or in a collective
    that then waits forever): FSDP outside torchrun, offload without FSDP, a batch the processes cannot split."""
    args = [f"--{k}={v}" for k, v in FAST.items()] + ["--model=tiny", "--dataset=synthetic", f"--out={tmp_path}"]
    with pytest.raises(SystemExit, match=r"--fsdp=true .* plain python run; launch it with torchrun"):
        sft.main(args + ["--fsdp=true"])
    with pytest.raises(SystemExit, match=r"--offload=true .* add --fsdp=true"):
        dpo.main(args + ["--offload=true"])
    with pytest.raises(SystemExit, match=r"--batch_size=6 must be a multiple of micro_batch_size x processes = 4 x 1"):
        sft.main(args + ["--batch_size=6", "--micro_batch_size=4"])
