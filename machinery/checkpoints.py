"""Exact resume: a run killed at any moment, by kill -9 or Ctrl-C, continues bit for bit from its last checkpoint.

    python sft.py --out=runs/x ...    # killed, then the same command again: "resumed from runs/x/latest at step N"

What it guards (tests/machinery/test_checkpoints.py: resume is bit for bit, under one process, DDP and FSDP, with
another number of processes, after Ctrl-C): latest/ holds the weights, the optimizer state and the RNG, without
pickle (safetensors + JSON); it is written to a temporary directory and swapped in, so a kill never leaves a broken
latest/, and a kill mid-swap leaves latest.old whole. Sharded weights are gathered whole, so DDP, FSDP and one
process write the same files. final/ and step_N/ hold the model alone, in the hub layout model.load_model (and
transformers) read.
"""

import contextlib
import json
import signal
from pathlib import Path

import torch

from machinery import common, distributed
from machinery.safetensors_file import read_safetensors, write_safetensors


def write_weights(model, directory: Path, meta: dict, weights: dict) -> None:
    """Whole `weights` of `model` into `directory`, through the model's own `save` (model.GPT writes the hub layout;
    reward.py's trunk + head writes the head beside it), and `load` for the way back (read_weights)."""
    model.save(directory, meta=meta, state_dict=weights)


def read_weights(model, directory: Path) -> dict:
    """The whole tensors write_weights wrote, keyed as model.state_dict()."""
    return model.load(directory)


def save_weights(model, directory: Path, meta: dict, master: bool) -> None:
    """final/ and step_N/: the hub-layout model.safetensors, whole; every rank calls it, rank 0 writes."""
    weights = distributed.full_state_dict(model, master)
    if master:
        write_weights(model, directory, meta, weights)


def save_checkpoint(directory: Path, model, optimizer, step: int, settings: dict, master: bool = True) -> None:
    """Everything an exact resume needs, without pickle: weights and optimizer tensors as safetensors, the rest
    as JSON. Written to a temporary directory and swapped in, so a kill never leaves a broken latest/. Every rank
    calls it: FSDP's shards are gathered into whole tensors, so DDP, FSDP and one process write the same files,
    and a run resumes under any of them, with any number of processes."""
    weights = distributed.full_state_dict(model, master)
    state = optimizer.state_dict()  # state: {param index: {"step", "square_avg" or "exp_avg", ...}}
    tensors = {f"{i}.{k}": distributed.gather(v, master) for i, st in state["state"].items() for k, v in st.items()}
    if not master:
        return
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    with common.new_dir(directory) as tmp:
        write_weights(model, tmp, {"step": step, "settings": settings}, weights)
        write_safetensors(tmp / "optimizer.safetensors", tensors)
        (tmp / "state.json").write_text(json.dumps({"step": step, "param_groups": state["param_groups"]}))


def load_checkpoint(directory: Path, model, optimizer) -> int:
    """Restore weights, optimizer state and RNG from save_checkpoint's directory; returns the step."""
    if not (directory / "state.json").exists() and directory.with_name(directory.name + ".old").exists():
        directory = directory.with_name(directory.name + ".old")  # killed mid-swap: the previous one is whole
    saved = json.loads((directory / "config.json").read_text())["meta"]["settings"]["optimizer"]
    if saved != type(optimizer).__name__.lower():
        raise SystemExit(f"{directory} holds {saved} state; resume with --optimizer={saved}, or --resume=false")
    current = model.state_dict()  # FSDP: DTensor shards, which each take their part of the whole saved tensor
    model.load_state_dict({k: distributed.local_like(t, current[k]) for k, t in read_weights(model, directory).items()})
    meta = json.loads((directory / "state.json").read_text())
    tensors, _ = read_safetensors(directory / "optimizer.safetensors")
    torch.set_rng_state(tensors.pop("rng.torch"))
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors.pop("rng.cuda"))
    tensors.pop("rng.cuda", None)
    params = [p for group in optimizer.param_groups for p in group["params"]]  # the indices of state_dict()
    state: dict = {}
    for key, t in tensors.items():
        i, name = key.split(".", 1)
        p = params[int(i)]
        state.setdefault(int(i), {})[name] = distributed.local_like(t, p) if t.shape == p.shape else t  # moments
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta["step"]


def resume(out: Path, model, optimizer, master: bool) -> int:
    """The step to start from: the one out/latest was saved at (weights, optimizer and RNG restored), else 0."""
    if not any((out / d / "state.json").exists() for d in ("latest", "latest.old")):
        return 0
    step = load_checkpoint(out / "latest", model, optimizer)
    if master:
        print(f"resumed from {out / 'latest'} at step {step}")
    return step


@contextlib.contextmanager
def ctrl_c_finishes_the_step(enabled: bool):
    """Ctrl-C (SIGINT) sets a flag instead of raising KeyboardInterrupt, which could land anywhere mid-step: the loop
    finishes its step, saves latest/ and exits. Yields a function that tells whether Ctrl-C was pressed. Only a
    single-process run takes it over: under torchrun a rank that stopped on its own would leave the others waiting
    in a collective."""
    pressed = []
    previous = signal.signal(signal.SIGINT, lambda *_: pressed.append(True)) if enabled else None
    try:
        yield lambda: bool(pressed)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
