"""Training on several processes: DDP, FSDP2 and CPU offload, kept out of sft.py's loop.

    torchrun --standalone --nproc_per_node=4 sft.py ...                 # DDP: a whole copy of the model per GPU
    torchrun --standalone --nproc_per_node=4 sft.py --fsdp=true ...     # FSDP2: each GPU holds 1/4 of the state
    python -m bench.memory                                              # per-GPU memory of each mode, computed

What it buys: DDP splits each batch over the processes and averages gradients in backward; FSDP2 (Zhao et al. 2023,
arXiv:2304.11277) also splits the 12 bytes per parameter of weights, gradients and optimizer state, so the state per
GPU is 12/world bytes per parameter; --offload puts it in CPU memory. `make memory` computes it (README "Memory per
GPU"; gpt2-xl at the DPO defaults: 39.9 GB per GPU with DDP, 2.6 GB on one GPU with FSDP + offload +
--grad_checkpoint), and a 2-process run measured the computed state exactly (115.74 vs 57.87 MiB). What it guards,
each checked by tests/machinery/test_distributed.py on CPU with gloo and 2 processes: 2 processes train like one,
FSDP holds a world-th of the state, and checkpoints move between DDP, FSDP and any number of processes.
"""

import contextlib
import dataclasses
import math
import os
import resource
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
from torch.distributed.tensor import DTensor, distribute_tensor

from machinery import common


@dataclasses.dataclass(frozen=True)
class Run:
    """Where this process computes and in which precision, and its place among the processes."""

    rank: int  # 0 ... world - 1; rank 0 prints and writes files
    world: int  # processes (torchrun's WORLD_SIZE; 1 for a plain python run)
    local_rank: int  # this process's GPU on its machine
    device: torch.device
    dtype: torch.dtype
    reason: str  # why this dtype (common.pick_device)


def setup(s) -> Run:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK and we join the process group (NCCL on GPUs, gloo on CPUs); a plain
    `python` run is rank 0 of 1. Settings that cannot work with this launch stop here, on every rank alike, before
    any collective could wait for a missing rank. s: the training settings (sft.Settings)."""
    if s.fsdp and "RANK" not in os.environ:
        raise SystemExit("--fsdp=true shards over the processes of a torchrun job, but this is a plain python run; "
                         f"launch it with torchrun (one GPU: torchrun --standalone --nproc_per_node=1 "
                         f"{Path(sys.argv[0]).name} ...) or make ... FSDP=true")
    if s.offload and not s.fsdp:
        raise SystemExit("--offload=true offloads FSDP's shards to the CPU; add --fsdp=true (under torchrun)")
    rank, world, local_rank = 0, 1, 0
    if "RANK" in os.environ:
        if not dist.is_initialized():
            # gloo beside NCCL carries the collectives on CPU tensors (--offload: gradient norm, checkpoints)
            dist.init_process_group("cuda:nccl,cpu:gloo" if torch.cuda.is_available() else "gloo")
        rank, world, local_rank = dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"])
    if s.batch_size % (s.micro_batch_size * world):
        raise SystemExit(f"--batch_size={s.batch_size} must be a multiple of micro_batch_size x processes "
                         f"= {s.micro_batch_size} x {world}")
    on_gpu = s.device == "auto" and torch.cuda.is_available()
    device, dtype, reason = common.pick_device(f"cuda:{local_rank}" if on_gpu else s.device, s.dtype)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return Run(rank, world, local_rank, device, dtype, reason)


@contextlib.contextmanager
def rank_zero_first(run: Run):
    """Rank 0 fills the shared caches (downloads, tokenized arrays) while the other ranks wait at a barrier; then
    they find the files ready. Without it every rank of a fresh multi-GPU run downloads and writes the same files."""
    if run.rank != 0:
        dist.barrier()
    yield
    if run.rank == 0 and run.world > 1:
        dist.barrier()


def shard(model, s, device, dtype, block_type):
    """FSDP2 in place: each block (a module of `block_type`, model.Block) is one unit of sharding, the root
    (embeddings, ln_f, the head tied to wte) another.

    Every rank keeps 1/world of each weight (dim 0 cut into world chunks, as torch.chunk does). A unit's weights are
    all-gathered just before its forward and again before its backward, and freed after each: only a block or two
    are ever whole. Backward reduce-scatters the gradients (each rank receives the average of its own shard), and
    the optimizer, built afterwards on the sharded parameters, steps on shards only."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # --offload: shards, gradients and the optimizer step on the CPU; pinned host memory speeds the copies (GPU only)
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if s.offload else OffloadPolicy()
    # On a GPU the blocks gather their weights in bf16 (half the traffic and the memory) and reduce gradients in
    # fp32: the rounding autocast would apply anyway. Their inputs are not cast, so the residual stream stays fp32 as
    # under DDP; the root keeps fp32 weights: the embeddings start that stream and GPT.logits projects in fp32.
    # On the CPU, fp32 weights and autocast alone (CPU LayerNorm takes no bf16 weights with fp32 inputs).
    mixed = MixedPrecisionPolicy()
    if device.type == "cuda" and dtype != torch.float32:
        mixed = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for block in [m for m in model.modules() if isinstance(m, block_type)]:
        fully_shard(block, mesh=mesh, mp_policy=mixed, offload_policy=offload)
    fully_shard(model, mesh=mesh, offload_policy=offload)  # a tied weight stays one parameter: one shard, one grad
    return model


def place(model, s, run: Run, block_type):
    """The model on this process's device: sharded over the processes with --fsdp, one unit per `block_type` module
    (each rank's shards on its GPU, or on the CPU with --offload), else whole."""
    return shard(model, s, run.device, run.dtype, block_type) if s.fsdp else model.to(run.device)


def wrap(model, s, run: Run):
    """The module the loop calls: under several processes without FSDP, DistributedDataParallel, which averages the
    gradients over the processes in backward. Checkpoints save the unwrapped module, so their keys stay plain."""
    if run.world > 1 and not s.fsdp:
        device_ids = [run.local_rank] if run.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    return model


def grad_scaler(s, run: Run):
    """fp16 has too little range for small gradients: the loss is scaled up, and the gradients unscaled before
    clipping (FSDP: each rank sees only its shards' gradients, so the sharded scaler agrees on overflow with the
    others). A no-op unless the dtype is fp16."""
    return (ShardedGradScaler if s.fsdp else torch.amp.GradScaler)(run.device.type, enabled=run.dtype == torch.float16)


@contextlib.contextmanager
def gradient_sync(model, raw_model, s, run: Run, last: bool):
    """Backward of one micro-batch: gradients are reduced over the processes on the `last` one of a step only.
    DDP: no_sync() skips its all-reduce before that. FSDP: until then keep the weights gathered after backward and the
    gradients whole and unreduced, so a step costs one reduce-scatter and fewer all-gathers, for the memory of whole
    bf16 weights + fp32 gradients meanwhile; --offload is there to save memory, so it reduces after every one."""
    if s.fsdp:
        reduce = last or s.offload
        raw_model.set_requires_gradient_sync(reduce)
        raw_model.set_reshard_after_backward(reduce)
    with model.no_sync() if not (last or run.world == 1 or s.fsdp) else contextlib.nullcontext():
        yield


def eval_chunks(ids: list[int], size: int, n: int, run: Run, fsdp: bool) -> list[list[int]]:
    """This rank's held-out examples `ids` (of n on all ranks) in micro-batches of `size`. Under FSDP each forward
    gathers weights from every rank, so all ranks run as many: a rank with fewer examples runs empty chunks ([]),
    whose results the caller does not count."""
    chunks = [ids[i : i + size] for i in range(0, len(ids), size)]
    if fsdp:
        chunks += [[]] * (math.ceil(math.ceil(n / run.world) / size) - len(chunks))
    return chunks


def reduce_mean(sums: dict, count, run: Run) -> dict[str, float]:
    """Per-example sums of this rank -> means over every example of every rank."""
    keys = sorted(sums)
    packed = torch.stack([sums[k] for k in keys] + [count.float()])
    if run.world > 1:
        dist.all_reduce(packed)
    return {k: (packed[i] / packed[-1]).item() for i, k in enumerate(keys)}


def gather(t: torch.Tensor, master: bool):
    """The whole tensor, on rank 0's CPU (None on other ranks). An FSDP shard (a DTensor) is all-gathered first: a
    collective, so every rank calls this for the same tensors in the same order."""
    if isinstance(t, DTensor):
        t = t.full_tensor()
    return t.detach().cpu() if master else None


def full_state_dict(model, master: bool) -> dict:
    return {k: gather(t, master) for k, t in model.state_dict().items()}


def local_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A whole tensor read from a checkpoint -> this rank's part of it, laid out as `like`: the shard an FSDP
    DTensor holds (each rank read the whole file, so each cuts its own chunk: src_data_rank=None, no traffic), or
    the tensor itself."""
    if not isinstance(like, DTensor):
        return full
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to(like.device)


def state_bytes(model, optimizer) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state that THIS process holds: an FSDP DTensor counts its local
    shard only. Not counted: DDP's gradient buckets, autocast's bf16 weight copies, activations (see bench/memory.py)."""

    def nbytes(tensors) -> int:
        local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
        return sum(t.numel() * t.element_size() for t in local)

    params = list(model.parameters())  # a tied weight once
    return {"params": nbytes(params), "grads": nbytes(p.grad for p in params if p.grad is not None),
            "optimizer": nbytes(v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v))}


def log_state(model, optimizer, s, run: Run, step: int, log) -> None:
    """Once, while gradients and optimizer state exist: what the fullest process holds (uneven shards: that one
    must fit), as a metrics record and a printed line."""
    held = state_bytes(model, optimizer)
    largest = torch.tensor(list(held.values()), device=run.device)
    if run.world > 1:
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    held = dict(zip(held, largest.tolist()))
    log({"step": step, "split": "memory", "processes": run.world, "fsdp": s.fsdp, **held})
    if run.rank == 0:
        where = "CPU" if s.offload or run.device.type == "cpu" else "GPU"
        print(f"state per process ({where}, largest of {run.world}): " + ", ".join(f"{k} {v / 2**20:,.1f} MiB"
              for k, v in held.items()) + f"; total {sum(held.values()) / 2**30:.2f} GiB", flush=True)


def peak_memory_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB: peak RSS


@contextlib.contextmanager
def process_group(run: Run):
    """Around the training loop: after a normal end the ranks leave together (a rank exiting while another still
    talks to it aborts the group); the group is destroyed however the loop ends. Then, with several processes, the
    process exits at once: a sharded or DDP model keeps references to the group's finished work, and freed during
    the interpreter's teardown, gloo's worker threads can abort the process (SIGABRT, "terminate called without an
    active exception"; pytorch#179291) after the run has finished and saved. Nothing is left to do by then."""
    try:
        yield
        if run.world > 1:
            dist.barrier()
    finally:
        if run.world > 1:
            dist.destroy_process_group()
    if run.world > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
