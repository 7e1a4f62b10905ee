"""Supervised fine-tuning on the preferred responses ("Preferred-FT"), and the one training loop of the project.

    python sft.py --model=gpt2 --out=runs/gpt2/sft                           # one GPU, or the CPU
    torchrun --standalone --nproc_per_node=4 sft.py --model=gpt2-medium ...  # several GPUs (DDP)
    torchrun --standalone --nproc_per_node=4 sft.py --fsdp=true ...           # several GPUs, weights sharded (FSDP2)
    python sft.py --help                                                     # every setting, with its default

The DPO paper (Rafailov et al. 2023, arXiv:2305.18290, Sec. 4 and 6.1) first fine-tunes the base model on the
chosen responses of Anthropic HH, so that the reference policy pi_ref is in-distribution for the preference
data; DPO then starts from it. SFT maximises the likelihood of the chosen response y_w given the prompt x:

    L_SFT = - E_(x, y_w) [ log pi(y_w | x) ],     log pi(y | x) = sum_t log pi(y_t | x, y_<t)

SFT and DPO differ only in that loss, so this file holds the training loop once (`train`) and dpo.py
imports it with its own loss. The loop follows the order of events of one optimizer step:

    set lr (linear warmup) -> evaluate / checkpoint when due -> micro-batches: forward + backward,
    gradients accumulated -> unscale + clip -> optimizer step -> log a progress line and metrics.jsonl

Several processes (torchrun) split every batch. By default each holds a whole copy of the model, its gradients and
the optimizer state, and gradients are averaged in backward (DistributedDataParallel). --fsdp=true shards all three
over the processes instead (FSDP2, Zhao et al. 2023, arXiv:2304.11277): 12 bytes per parameter become 12 / world,
and each block's weights are gathered just before its forward and backward and freed after. --offload=true also
moves the shards and the optimizer step to the CPU. Checkpoints are the same files in every mode.

A run directory holds config.json (the settings), metrics.jsonl, latest/ (everything needed to resume exactly),
step_NNNNNN/ (intermediate models) and final/ (the model the next stage loads).
"""

import contextlib
import dataclasses
import json
import math
import os
import resource
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
from torch.distributed.tensor import DTensor, distribute_tensor

import data
import model as gpt


@dataclasses.dataclass
class Settings:
    """Supervised fine-tuning (Preferred-FT): python sft.py --key=value ..."""

    # data
    dataset: str = "hh"  # hh (all four HH-RLHF subsets), hh:helpful-base,harmless-base, or synthetic (the demo)
    max_length: int = 512  # prompt + response tokens, as in the DPO reference code
    max_prompt_length: int = 256  # a longer prompt keeps its last tokens
    truncation: str = "truncate"  # truncate over-long pairs (reference code) or drop them
    train_on: str = "chosen"  # chosen: loss on the chosen response (SFT); all: every token of both conversations
    n_eval: int = 256  # held-out test examples for periodic evaluation (a seeded random subset of the test split)
    group_by_length: bool = True  # batches of similar lengths (less padding); false: random, as the reference code
    sft_targets: str = "every_pair"  # every_pair: every pair's chosen; one_per_prompt: one per prompt (reference)
    # model
    model: str = "gpt2"  # gpt2, gpt2-medium, gpt2-large, gpt2-xl, tiny (random init), or a checkpoint directory
    grad_checkpoint: bool = False  # recompute activations in backward: fits gpt2-large/xl in less memory
    dropout: float = 0.0  # GPT-2 was pretrained with 0.1; fine-tuning recipes (and the reference code) use 0
    compile: bool = False  # torch.compile the model (faster on GPU after a minute of compiling)
    fsdp: bool = False  # under torchrun: shard weights, gradients and optimizer state over the GPUs (FSDP2), not DDP
    offload: bool = False  # with --fsdp: shards and optimizer step on the CPU (gpt2-xl on one 24 GB GPU; slower)
    # optimisation
    optimizer: str = "rmsprop"  # rmsprop (the DPO paper) or adamw (fused on CUDA)
    lr: float = 1e-5  # peak learning rate (the reference code's 5e-7 is for 2.8B models; GPT-2 is 20x smaller)
    weight_decay: float = 0.0  # AdamW only
    warmup_steps: int = 150  # linear warmup from 0 to lr, then constant (DPO paper)
    batch_size: int = 64  # examples per optimizer step, summed over all GPUs (DPO paper: 64)
    micro_batch_size: int = 8  # examples per forward pass per GPU; the rest is gradient accumulation
    epochs: int = 1  # passes over the training set
    max_steps: int = 0  # stop after this many optimizer steps (0 = the epochs decide)
    grad_clip: float = 10.0  # max global gradient norm (reference code: 10)
    # bookkeeping
    eval_every: int = 500  # optimizer steps between evaluations
    save_every: int = 0  # optimizer steps between saved models step_NNNNNN/ (0 = final only)
    checkpoint_every: int = 250  # optimizer steps between resume checkpoints latest/
    out: str = "runs/gpt2/sft"  # run directory
    resume: bool = True  # continue from out/latest if it exists
    seed: int = 0  # data order and initialisation
    device: str = "auto"  # cuda, mps, cpu or auto
    dtype: str = "auto"  # bfloat16, float16, float32 or auto (model.pick_device: bf16 on recent GPUs and bf16-native CPUs)


# ----------------------------------------------------------------------------------------------------------------
# The loss: per-sequence log-probabilities of the response tokens


def sequence_logps(model, batch):
    """Sum of log pi(y_t | x, y_<t) over the response tokens of each row -> (B,) in fp32.

    batch: input_ids (B, T); target_ids (B, T), the inputs shifted left by one; loss_mask (B, T), True where the
    target is a response token. We SUM over tokens, as the paper's log pi(y | x) and the reference code do;
    averaging instead would make every response count as if it were one token long, which removes the pressure
    against long rambling (rejected) answers and changes what beta means.
    """
    mask = batch["loss_mask"]
    # (N, V) fp32 logits at the N masked positions only: GPT.logits projects in fp32 even under bf16 autocast, since
    # casting bf16 logits afterwards would not undo their rounding (~0.1 nat per token at GPT-2's logit sizes).
    logits = model(batch["input_ids"], select=mask)
    # cross_entropy = -log_softmax(logits)[target], fused, in fp32; .float() is a no-op for our GPT and only
    # upcasts other models run through this function (bench.py's transformers wrapper)
    logp = -F.cross_entropy(logits.float(), batch["target_ids"][mask], reduction="none")  # (N,)
    rows = mask.nonzero()[:, 0]  # the row of each masked position, in the same (row-major) order as x[mask]
    return torch.zeros(mask.shape[0], device=logp.device).index_add(0, rows, logp)  # (B,)


def sft_loss(model, batch):
    """-log pi(y_w | x) for each row, and the per-token negative log-likelihood to read as a metric."""
    logps = sequence_logps(model, batch)
    n_tokens = batch["loss_mask"].sum(-1).clamp(min=1)
    return -logps, {"nll_per_token": -logps.detach() / n_tokens}


# ----------------------------------------------------------------------------------------------------------------
# Distributed setup, optimizer, checkpoints


def setup(s: Settings):
    """(rank, world_size, local_rank, device, dtype, reason). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK and we
    join the process group (NCCL on GPUs, gloo on CPUs); a plain `python` run is rank 0 of 1. Settings that cannot
    work with this launch stop here, on every rank alike, before any collective could wait for a missing rank."""
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
    device, dtype, reason = gpt.pick_device(f"cuda:{local_rank}" if on_gpu else s.device, s.dtype)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return rank, world, local_rank, device, dtype, reason


def shard(model, s: Settings, device, dtype):
    """FSDP2 in place: each Block is one unit of sharding, the root (embeddings, ln_f, the head tied to wte) another.

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
    for block in [m for m in model.modules() if isinstance(m, gpt.Block)]:
        fully_shard(block, mesh=mesh, mp_policy=mixed, offload_policy=offload)
    fully_shard(model, mesh=mesh, offload_policy=offload)  # a tied weight stays one parameter: one shard, one grad
    return model


def make_optimizer(s: Settings, model, device):
    params = [p for p in model.parameters() if p.requires_grad]
    if s.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=s.lr)
    if s.optimizer == "adamw":
        fused = device.type == "cuda" and not s.offload  # offloaded shards step on the CPU
        return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay, fused=fused)
    raise SystemExit(f"--optimizer must be rmsprop or adamw, got {s.optimizer!r}")


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


def write_weights(model, directory: Path, meta: dict, weights: dict) -> None:
    """Whole `weights` of `model` into `directory`: model.save_model for a GPT-2; a model that is more than a GPT-2
    (reward.py's trunk + head) brings its own `save`, and `load` for the way back (read_weights)."""
    if hasattr(model, "save"):
        model.save(directory, meta=meta, state_dict=weights)
    else:
        gpt.save_model(model, directory, meta=meta, state_dict=weights)


def read_weights(model, directory: Path) -> dict:
    """The whole tensors write_weights wrote, keyed as model.state_dict()."""
    return model.load(directory) if hasattr(model, "load") else gpt.load_model(str(directory)).state_dict()


def save_weights(model, directory: Path, meta: dict, master: bool) -> None:
    """final/ and step_N/: the hub-layout model.safetensors, whole; every rank calls it, rank 0 writes."""
    weights = full_state_dict(model, master)
    if master:
        write_weights(model, directory, meta, weights)


def save_checkpoint(directory: Path, model, optimizer, step: int, settings: dict, master: bool = True) -> None:
    """Everything an exact resume needs, without pickle: weights and optimizer tensors as safetensors, the rest
    as JSON. Written to a temporary directory and swapped in, so a kill never leaves a broken latest/. Every rank
    calls it: FSDP's shards are gathered into whole tensors, so DDP, FSDP and one process write the same files,
    and a run resumes under any of them, with any number of processes."""
    weights = full_state_dict(model, master)
    state = optimizer.state_dict()  # state: {param index: {"step", "square_avg" or "exp_avg", ...}}
    tensors = {f"{i}.{k}": gather(v, master) for i, st in state["state"].items() for k, v in st.items()}
    if not master:
        return
    tmp = directory.with_name(directory.name + ".tmp")
    write_weights(model, tmp, {"step": step, "settings": settings}, weights)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    gpt.write_safetensors(tmp / "optimizer.safetensors", tensors)
    (tmp / "state.json").write_text(json.dumps({"step": step, "param_groups": state["param_groups"]}))
    gpt.replace_dir(tmp, directory)


def load_checkpoint(directory: Path, model, optimizer) -> int:
    """Restore weights, optimizer state and RNG from save_checkpoint's directory; returns the step."""
    if not (directory / "state.json").exists() and directory.with_name(directory.name + ".old").exists():
        directory = directory.with_name(directory.name + ".old")  # killed mid-swap: the previous one is whole
    saved = json.loads((directory / "config.json").read_text())["meta"]["settings"]["optimizer"]
    if saved != type(optimizer).__name__.lower():
        raise SystemExit(f"{directory} holds {saved} state; resume with --optimizer={saved}, or --resume=false")
    current = model.state_dict()  # FSDP: DTensor shards, which each take their part of the whole saved tensor
    model.load_state_dict({k: local_like(t, current[k]) for k, t in read_weights(model, directory).items()})
    meta = json.loads((directory / "state.json").read_text())
    tensors, _ = gpt.read_safetensors(directory / "optimizer.safetensors")
    torch.set_rng_state(tensors.pop("rng.torch"))
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors.pop("rng.cuda"))
    tensors.pop("rng.cuda", None)
    params = [p for group in optimizer.param_groups for p in group["params"]]  # the indices of state_dict()
    state: dict = {}
    for key, t in tensors.items():
        i, name = key.split(".", 1)
        p = params[int(i)]
        state.setdefault(int(i), {})[name] = local_like(t, p) if t.shape == p.shape else t  # moments; not "step"
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta["step"]


def state_bytes(model, optimizer) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state that THIS process holds: an FSDP DTensor counts its local
    shard only. Not counted: DDP's gradient buckets, autocast's bf16 weight copies, activations (see bench.py)."""

    def nbytes(tensors) -> int:
        local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
        return sum(t.numel() * t.element_size() for t in local)

    params = list(model.parameters())  # a tied weight once
    return {"params": nbytes(params), "grads": nbytes(p.grad for p in params if p.grad is not None),
            "optimizer": nbytes(v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v))}


def peak_memory_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB: peak RSS


# ----------------------------------------------------------------------------------------------------------------
# The training loop


def train(s: Settings, model, loss_fn, train_batch, eval_batch, n_eval: int, lengths, stage: str):
    """Train `model` with `loss_fn(model, batch) -> (per-example losses (B,), {metric: (B,)})`.

    train_batch(indices) / eval_batch(indices) -> dict of tensors (input_ids, target_ids, loss_mask, ...) for
    those training / held-out examples; a seeded random subset of min(n_eval, s.n_eval) of the n_eval held-out
    examples (data.eval_subset) is evaluated, the same one at every evaluation.
    `lengths` (one per training example) drive the length-grouped, seeded, resumable batch order of data.py.
    """
    rank, world, local_rank, device, dtype, reason = setup(s)
    master = rank == 0
    out = Path(s.out)
    if master:
        print(f"device {device}, {dtype}: {reason}; {world} process(es)")
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(gpt.settings_dict(s), indent=2))
    if s.eval_every and min(s.n_eval, n_eval) < world:  # every rank must evaluate something (all_reduce shapes)
        raise SystemExit(f"--n_eval={s.n_eval} (held-out set: {n_eval}) must be at least the number of processes {world}")
    if s.fsdp:
        shard(model, s, device, dtype)  # each rank's shards go to its GPU (to the CPU with --offload)
    else:
        model.to(device)
    optimizer = make_optimizer(s, model, device)  # after sharding: it must hold the sharded parameters
    step = 0
    if s.resume and any((out / d / "state.json").exists() for d in ("latest", "latest.old")):
        step = load_checkpoint(out / "latest", model, optimizer)
        if master:
            print(f"resumed from {out / 'latest'} at step {step}")
    # fp16 has too little range for small gradients: scale the loss up, unscale before clipping (off otherwise)
    # (FSDP: each rank sees only its shards' gradients, so the sharded scaler agrees on overflow with the others)
    scaler = (ShardedGradScaler if s.fsdp else torch.amp.GradScaler)(device.type, enabled=dtype == torch.float16)
    raw_model = model  # what we save: never the compiled or DDP wrapper, so checkpoint keys stay plain
    if s.compile:
        model = torch.compile(model)
    if world > 1 and not s.fsdp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)

    order = (0, data.epoch_batches(lengths, s.batch_size, s.seed, 0, s.group_by_length))  # (epoch, its batches)
    batches_per_epoch = len(order[1])
    total = s.max_steps or s.epochs * batches_per_epoch
    if batches_per_epoch == 0:
        raise SystemExit(f"{len(lengths)} training examples make no batch of {s.batch_size}; lower --batch_size")
    metrics_file = out / "metrics.jsonl"
    settings = gpt.settings_dict(s)

    def to_device(batch):
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    def evaluate():
        """Mean loss and metrics over the held-out examples, sharded over ranks and summed with all_reduce."""
        model.eval()
        sums, count = {}, torch.zeros((), device=device)
        with torch.no_grad():
            n = min(s.n_eval, n_eval)
            ids = data.eval_subset(n_eval, s.n_eval, s.seed).tolist()[rank::world]  # a seeded subset
            chunks = [ids[i : i + s.micro_batch_size] for i in range(0, len(ids), s.micro_batch_size)]
            if s.fsdp:  # each forward gathers weights from every rank: all ranks run as many, extras count nothing
                chunks += [[]] * (math.ceil(math.ceil(n / world) / s.micro_batch_size) - len(chunks))
            for chunk in chunks:
                with gpt.autocast(device, dtype):
                    losses, metrics = loss_fn(model, to_device(eval_batch(chunk or ids[:1])))
                if chunk:
                    count += add_sums(sums, losses, metrics)
        model.train()
        return reduce_mean(sums, count, world)

    def log(record):
        if master:
            with open(metrics_file, "a") as f:
                f.write(json.dumps(record) + "\n")

    def log_eval():
        stats = evaluate()
        log({"step": step, "split": "eval", **stats})
        if master:
            print(f"{stage} step {step}: eval  " + "  ".join(f"{k} {v:.4f}" for k, v in stats.items()), flush=True)

    def checkpoint(at_step):
        save_checkpoint(out / "latest", raw_model, optimizer, at_step, settings, master)

    def log_state_bytes():
        held = state_bytes(raw_model, optimizer)
        largest = torch.tensor(list(held.values()), device=device)
        if world > 1:
            dist.all_reduce(largest, op=dist.ReduceOp.MAX)  # uneven shards: the fullest rank is what must fit
        held = dict(zip(held, largest.tolist()))
        log({"step": step + 1, "split": "memory", "processes": world, "fsdp": s.fsdp, **held})
        if master:
            where = "CPU" if s.offload or device.type == "cpu" else "GPU"
            print(f"state per process ({where}, largest of {world}): " + ", ".join(f"{k} {v / 2**20:,.1f} MiB"
                  for k, v in held.items()) + f"; total {sum(held.values()) / 2**30:.2f} GiB", flush=True)

    model.train()
    t0, tokens_seen, start_step = time.time(), 0, step
    # Ctrl-C: finish the current step, save latest/, exit (SIGINT as an exception mid-step could land anywhere)
    stop = {"now": False}
    previous_handler = signal.signal(signal.SIGINT, lambda *_: stop.update(now=True)) if master and world == 1 else None
    try:
        while step < total:
            epoch, index = divmod(step, batches_per_epoch)
            if epoch != order[0]:
                order = (epoch, data.epoch_batches(lengths, s.batch_size, s.seed, epoch, s.group_by_length))
            batch_ids = order[1][index]  # the global batch of this step, e.g. (64,) example indices
            lr = s.lr * min(1.0, (step + 1) / max(1, s.warmup_steps))  # linear warmup, then constant
            for group in optimizer.param_groups:
                group["lr"] = lr

            if s.eval_every and step % s.eval_every == 0:
                log_eval()
            if s.save_every and step % s.save_every == 0 and step > 0:
                save_weights(raw_model, out / f"step_{step:06d}", {"stage": stage, "step": step, "settings": settings}, master)

            # Each rank takes every world-th example of the global batch and runs it in micro-batches.
            mine = batch_ids[rank::world]
            micro = [mine[i : i + s.micro_batch_size] for i in range(0, len(mine), s.micro_batch_size)]
            sums, count = {}, torch.zeros((), device=device)
            for i, ids in enumerate(micro):
                batch = to_device(train_batch(ids))
                tokens_seen += batch["input_ids"].numel() * world
                # DDP all-reduces gradients in backward; only the last micro-batch needs to (no_sync skips it)
                last = i == len(micro) - 1
                sync = contextlib.nullcontext() if last or world == 1 or s.fsdp else model.no_sync()
                if s.fsdp:
                    # FSDP's no_sync: until the last micro-batch keep the weights gathered after backward and the
                    # gradients whole and unreduced, so a step costs one reduce-scatter and fewer all-gathers, for
                    # the memory of whole bf16 weights + fp32 gradients meanwhile. --offload is there to save
                    # memory: it reduces and reshards after every micro-batch.
                    reduce = last or s.offload
                    raw_model.set_requires_gradient_sync(reduce)
                    raw_model.set_reshard_after_backward(reduce)
                with sync:
                    with gpt.autocast(device, dtype):
                        losses, metrics = loss_fn(model, batch)
                    # Gradient of the mean over the global batch: each micro-batch contributes sum / rows of the
                    # global batch. DDP and FSDP average over ranks (divide by world): multiply by world to undo it.
                    rows_per_example = len(losses) // len(ids)  # 2 when train_on=all: chosen and rejected rows
                    loss = losses.sum() * world / (len(batch_ids) * rows_per_example)
                    scaler.scale(loss).backward()
                count += add_sums(sums, losses, metrics)
            stats = reduce_mean(sums, count, world)
            if not math.isfinite(stats["loss"]):
                raise RuntimeError(f"non-finite loss ({stats['loss']}) at step {step}; latest/ keeps the last good "
                                   "checkpoint. Lower --lr, or try --dtype=float32 to rule out fp16 overflow.")
            scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip).item()
            scaler.step(optimizer)
            scaler.update()
            if step == start_step:  # once, while gradients and optimizer state exist: what each process holds
                log_state_bytes()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            elapsed = time.time() - t0
            tok_s = tokens_seen / elapsed
            eta = (total - step) * elapsed / (step - start_step)
            log({"step": step, "split": "train", "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tok_s,
                 "mem_gb": peak_memory_gb(device), **stats})
            if master:
                shown = "  ".join(f"{k} {v:.4f}" for k, v in stats.items())
                print(f"{stage} step {step}/{total}  {shown}  lr {lr:.2e}  {tok_s:,.0f} tok/s  ETA {eta / 60:.1f} min",
                      flush=True)
            if s.checkpoint_every and step % s.checkpoint_every == 0:
                checkpoint(step)
            if stop["now"]:
                print(f"interrupted: saving {out / 'latest'} at step {step}; run the same command to resume")
                checkpoint(step)
                sys.exit(130)
        if s.eval_every:
            log_eval()
        checkpoint(step)
        save_weights(raw_model, out / "final", {"stage": stage, "step": step, "settings": settings}, master)
        if master:
            print(f"saved {out / 'final'}")
        if world > 1:  # leave together: a rank exiting while another still talks to it aborts the group
            dist.barrier()
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)
        if world > 1:
            dist.destroy_process_group()
    if world > 1:
        # A sharded or DDP model keeps references to the process group's finished work; freed during the
        # interpreter's teardown, gloo's worker threads can abort the process (SIGABRT, "terminate called without an
        # active exception"; pytorch#179291) after the run has finished and saved. Everything is written and
        # flushed, and the scripts have nothing left to do after training: leave without that teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return raw_model


def add_sums(sums: dict, losses, metrics: dict) -> int:
    """Add a micro-batch's per-example losses and metrics to running sums; returns its number of examples."""
    for k, v in {"loss": losses, **metrics}.items():
        sums[k] = sums.get(k, 0) + v.detach().float().sum()
    return len(losses)


def reduce_mean(sums: dict, count, world: int) -> dict[str, float]:
    """Per-example sums -> means over every example of every rank."""
    keys = sorted(sums)
    packed = torch.stack([sums[k] for k in keys] + [count.float()])
    if world > 1:
        dist.all_reduce(packed)
    return {k: (packed[i] / packed[-1]).item() for i, k in enumerate(keys)}


# ----------------------------------------------------------------------------------------------------------------


def load_policy(s: Settings):
    """The model to train: a preset (hub weights or random tiny) or a checkpoint, with this run's dropout and
    activation checkpointing."""
    torch.manual_seed(s.seed)
    m = gpt.load_model(s.model)
    m.config.grad_checkpoint = s.grad_checkpoint
    for module in m.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = s.dropout
        if isinstance(module, gpt.CausalSelfAttention):
            module.dropout = s.dropout
    m.config.dropout = s.dropout
    return m


def prepare(settings_class, argv, stage: str):
    """Parse settings and tokenize the data; None when the run already finished (stages skip done work)."""
    s = gpt.parse_settings(settings_class, argv)
    if (Path(s.out) / "final" / "model.safetensors").exists():
        print(f"{s.out}/final exists: {stage} already done (delete it to train again)")
        return None
    print(json.dumps(gpt.settings_dict(s), indent=2))
    kw = dict(max_length=s.max_length, max_prompt_length=s.max_prompt_length, truncation=s.truncation)
    with rank_zero_first(s):
        return s, data.tokenize_dataset(s.dataset, "train", **kw), data.tokenize_dataset(s.dataset, "test", **kw)


@contextlib.contextmanager
def rank_zero_first(s: Settings):
    """Rank 0 fills the shared caches (downloads, tokenized arrays) while the other ranks wait at a barrier; then
    they find the files ready. Without it every rank of a fresh multi-GPU run downloads and writes the same files."""
    rank, world = setup(s)[:2]
    if rank != 0:
        dist.barrier()
    yield
    if rank == 0 and world > 1:
        dist.barrier()


def main(argv=None):
    prepared = prepare(Settings, argv, "training")
    if prepared is None:
        return
    s, train_data, eval_data = prepared
    if s.train_on not in ("chosen", "all"):
        raise SystemExit(f"--train_on must be chosen or all, got {s.train_on!r}")
    on, stage = ("response", "sft") if s.train_on == "chosen" else ("all", "pretrain")
    if s.sft_targets not in ("every_pair", "one_per_prompt"):
        raise SystemExit(f"--sft_targets must be every_pair or one_per_prompt, got {s.sft_targets!r}")
    if s.sft_targets == "one_per_prompt":  # the reference code's SFT set: one chosen response per prompt
        train_data = data.select_examples(train_data, data.one_per_prompt(train_data))
        print(f"--sft_targets=one_per_prompt: {data.n_examples(train_data)} training examples, one per prompt")
    train(s, load_policy(s), sft_loss, lambda ids: data.sft_batch(train_data, ids, on=on),
          lambda ids: data.sft_batch(eval_data, ids, on=on), data.n_examples(eval_data),
          data.example_lengths(train_data, "sft" if on == "response" else "pref"), stage)

if __name__ == "__main__":
    main()
