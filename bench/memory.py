"""How much memory does each GPT-2 size need per GPU under DDP, FSDP and FSDP + CPU offload? Bytes of parameters,
gradients and optimizer state, computed from the parameter shapes (FSDP over 2 and --world GPUs), plus the
activations and whole-weight copies of a bf16 step; under torchrun the state is also measured on the real tensors
of one training step (distributed.state_bytes) beside the computed numbers.

    python -m bench.memory --world=8                                    # = make memory (seconds)
    torchrun --standalone --nproc_per_node=2 -m bench.memory            # ... and the state measured on real shards
"""

import dataclasses
import math
import os

import torch

import model as gpt
import sft
from bench import timing
from machinery import common, distributed, vocab_head


@dataclasses.dataclass
class Settings:
    """Memory per GPU, DDP vs FSDP vs FSDP + offload: python -m bench.memory --key=value ..."""

    world: int = 8  # GPUs that FSDP shards over in the table
    device: str = "auto"  # under torchrun: where the measured step runs (cuda, cpu or auto)
    dtype: str = "auto"  # under torchrun: the measured step's autocast dtype (common.pick_device)


CARDS = (24, 40, 80)  # GB: the usual GPU sizes
ROWS, TOKENS = 8, 512  # a micro-batch at the defaults: 8 SFT examples or 4 DPO pairs, at --max_length=512


def state_per_rank(model, world: int, fsdp: bool, optimizer: str = "rmsprop") -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state on the fullest rank, from the parameters' SHAPES (a model on
    the meta device costs nothing), all fp32. DDP: every rank holds everything. FSDP2 cuts dim 0 of each parameter
    into `world` chunks of ceil(rows / world) rows (the last ones shorter or empty): rank 0 holds the most. The
    optimizer adds RMSprop's square_avg (AdamW: two moments) per element and a 4-byte step count per parameter."""
    params = list(model.parameters())  # a tied weight once
    rows = lambda p: math.ceil(p.shape[0] / world) if fsdp else p.shape[0]  # noqa: E731
    shard = sum(rows(p) * (p.numel() // p.shape[0]) * 4 for p in params)
    moments = {"rmsprop": 1, "adamw": 2}[optimizer]
    return {"params": shard, "grads": shard, "optimizer": moments * shard + 4 * len(params)}


def working_bytes(model, mode: str, grad_checkpoint: bool, accumulate: bool) -> int:
    """What a bf16 training step on a GPU adds to the state: activations saved for backward, the logits, and each
    mode's whole copies of weights or gradients. An estimate from shapes; the allocator's slack is not in it."""
    c, P = model.config, model.num_params()
    blocks = sum(p.numel() for p in model.h.parameters())
    root = P - blocks  # wte (tied head), wpe, ln_f
    tokens = ROWS * TOKENS
    # Saved per token and block (bf16 autocast, fp32 residual stream, SDPA keeps no T x T scores), our count in
    # units of C bytes: both LayerNorm inputs in fp32 (8), the bf16 inputs of c_attn (2), attention's c_proj (2),
    # c_fc (2) and the MLP's c_proj (8), q, k, v and the attention output (8), the GELU input (8): 38.
    per_token = 38 * c.n_embd
    # --grad_checkpoint keeps only each block's fp32 input, and recomputes one block at a time in backward
    acts = tokens * (4 * c.n_embd * c.n_layer + per_token if grad_checkpoint else per_token * c.n_layer)
    logits = 2 * 4 * vocab_head.CHUNK_ROWS * c.vocab_size  # vocab_head.py: at most two chunks of fp32 logits at a time
    if mode == "ddp":  # autocast's bf16 copy of every block weight, saved for backward; DDP's fp32 gradient buckets
        copies = 2 * blocks + 4 * P
    elif accumulate:  # FSDP between micro-batches: bf16 blocks and the fp32 root stay gathered, gradients whole
        copies = 2 * blocks + 4 * root + 4 * P
    else:  # FSDP reducing every micro-batch (--offload): the root whole in fp32, two blocks (bf16 + fp32 grads) in flight
        copies = 8 * root + 2 * 6 * blocks // c.n_layer
    return acts + logits + copies


def memory_rows(name: str, world: int) -> list[list]:
    """Per-GPU GB of one GPT-2 size under DDP, FSDP over 2 and `world` GPUs, and FSDP + offload on one GPU (at the
    DPO defaults: 64 pairs per step, 4 per micro-batch, so FSDP accumulates unless --offload)."""
    with torch.device("meta"):
        model = timing.build_model(name)
    rows = []
    for label, mode, n in [("DDP", "ddp", world), ("FSDP", "fsdp", 2), ("FSDP", "fsdp", world), ("FSDP + offload", "offload", 1)]:
        state = sum(state_per_rank(model, n, fsdp=mode != "ddp").values())
        on_gpu = 0 if mode == "offload" else state
        accumulate = mode != "offload" and 64 // (4 * n) > 1
        totals = [on_gpu + working_bytes(model, mode, ckpt, accumulate) for ckpt in (False, True)]
        # the smallest card that holds it, with activation checkpointing if it needs it; 10% left for allocator slack
        fits = next((f"{card} GB" + ("" if totals[0] <= 0.9 * card * 1e9 else ", ckpt") for card in CARDS
                     if totals[1] <= 0.9 * card * 1e9), "no")
        rows.append([name, f"{label} x{n}" if mode != "offload" else label, f"{on_gpu / 1e9:.1f}",
                     f"{(state if mode == 'offload' else 0) / 1e9:.1f}", f"{totals[0] / 1e9:.1f}", f"{totals[1] / 1e9:.1f}", fits])
    return rows


def measure_state(device, dtype) -> None:
    """Under torchrun: one training step of the small model under DDP and under FSDP, and the bytes each rank
    really holds (distributed.state_bytes on the sharded tensors) beside state_per_rank's numbers from shapes."""
    world, rows = torch.distributed.get_world_size(), []
    with torch.device("meta"):
        shapes = timing.build_model("small")
    for fsdp in (False, True):
        torch.manual_seed(0)
        model, s = timing.build_model("small"), sft.Settings(fsdp=fsdp, device=device.type)
        distributed.shard(model, s, device, dtype, gpt.Block) if fsdp else model.to(device)
        wrapped = model if fsdp else torch.nn.parallel.DistributedDataParallel(model)
        optimizer = sft.make_optimizer(s, model, device)
        losses, _ = sft.sft_loss(wrapped, timing.make_batch(2, 32, model.config.vocab_size, device, seed=0))
        losses.sum().backward()
        optimizer.step()
        held = torch.tensor(list(distributed.state_bytes(model, optimizer).values()), device=device)
        torch.distributed.all_reduce(held, op=torch.distributed.ReduceOp.MAX)
        computed = state_per_rank(shapes, world, fsdp)
        rows.append(["FSDP" if fsdp else "DDP", *(f"{b / 2**20:,.2f} / {computed[k] / 2**20:,.2f}"
                                                    for b, k in zip(held.tolist(), computed))])
    if torch.distributed.get_rank() == 0:
        timing.table(f"state per rank, small model ({shapes.num_params() / 1e6:.0f}M) on {world} processes: measured "
                     "on the real tensors / computed from shapes, MiB", ["", "params", "grads", "optimizer (RMSprop)"],
                     rows)


def main(argv=None):
    s = common.parse_settings(Settings, argv)
    if "RANK" in os.environ:
        run = distributed.setup(sft.Settings(device=s.device, dtype=s.dtype))
        measure_state(run.device, run.dtype)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        if run.rank != 0:
            return
    rows = [row for name in gpt.HUB_MODELS for row in memory_rows(name, s.world)]
    timing.table(f"memory per GPU, computed (not measured): fp32 weights, gradients and RMSprop state, bf16 autocast, "
                 f"micro-batch {ROWS} x {TOKENS} tokens, DPO defaults (64 pairs per step)",
                 ["model", "setup", "state on GPU, GB", "on CPU", "total GB", "with --grad_checkpoint", "fits on"], rows)


if __name__ == "__main__":
    main()
