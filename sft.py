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
over the processes instead (FSDP2): 12 bytes per parameter become 12 / world. --offload=true also moves the shards
and the optimizer step to the CPU. Checkpoints are the same files in every mode.

Machinery it leans on, so that `train` reads as the loop alone: distributed.py (processes, DDP, FSDP2, offload,
gradient sync, memory accounting) and checkpoints.py (exact resume, atomic saves, Ctrl-C); common.py for the
settings parser, the device and dtype, and autocast.

A run directory holds config.json (the settings), metrics.jsonl, latest/ (everything needed to resume exactly),
step_NNNNNN/ (intermediate models) and final/ (the model the next stage loads).
"""

import dataclasses
import functools
import json
import math
import sys
import time
from pathlib import Path

import torch

import data
import model as gpt
from machinery import batch_order, checkpoints, common, distributed


@dataclasses.dataclass
class Settings:
    """Supervised fine-tuning (Preferred-FT): python sft.py --key=value ..."""

    # data
    dataset: str = "hh"  # hh (all four HH subsets), hh:helpful-base,..., shp, shp:askculinary,..., synthetic (the demo), pairs.jsonl[,test.jsonl]
    max_length: int = 512  # prompt + response tokens, as in the DPO reference code
    max_prompt_length: int = 256  # a longer prompt keeps its last tokens
    truncation: str = "truncate"  # truncate over-long pairs (reference code) or drop them
    train_on: str = "chosen"  # chosen: loss on the chosen response (SFT); all: every token of both conversations
    n_eval: int = 256  # held-out test examples for periodic evaluation (a seeded random subset of the test split)
    group_by_length: bool = True  # batches of similar lengths (less padding); false: random, as the reference code
    sft_targets: str = "auto"  # every_pair: every pair's chosen; one_per_prompt: one per prompt (reference); auto: one_per_prompt on shp (a post's best answer), else every_pair
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
    dtype: str = "auto"  # bfloat16, float16, float32 or auto (common.pick_device: bf16 on recent GPUs and bf16-native CPUs)


# ----------------------------------------------------------------------------------------------------------------
# The loss: per-sequence log-probabilities of the response tokens


def token_logps(model, batch):
    """log pi(y_t | x, y_<t) at each response position, (N,) fp32, in the row-major order of loss_mask's True entries.

    batch: input_ids (B, T); target_ids (B, T), the inputs shifted left by one; loss_mask (B, T), True where the
    target is a response token. The head projects in fp32 (or as exactly, in split bf16 on a GPU) even under bf16
    autocast, since casting bf16 logits afterwards would not undo their rounding (~0.1 nat per token at GPT-2's
    logit sizes); it computes only these N positions, and never holds all N rows of logits at once
    (machinery/vocab_head.py)."""
    mask = batch["loss_mask"]
    return model(batch["input_ids"], select=mask, targets=batch["target_ids"][mask])  # (N,)


def per_row(values, mask):
    """Per-position values (N,), in the order of mask's True entries -> their sum in each row (B,)."""
    rows = mask.nonzero()[:, 0]  # the row of each masked position, in the same (row-major) order as x[mask]
    return torch.zeros(mask.shape[0], device=values.device).index_add(0, rows, values.float())  # (B,)


def sequence_logps(model, batch):
    """log pi(y | x) = sum of log pi(y_t | x, y_<t) over the response tokens of each row -> (B,) in fp32. We SUM
    over tokens, as the paper's log pi(y | x) and the reference code do; averaging instead would make every response
    count as if it were one token long, which removes the pressure against long rambling (rejected) answers and
    changes what beta means."""
    return per_row(token_logps(model, batch), batch["loss_mask"])


def sft_loss(model, batch):
    """-log pi(y_w | x) for each row, and the per-token negative log-likelihood to read as a metric."""
    logps = sequence_logps(model, batch)
    n_tokens = batch["loss_mask"].sum(-1).clamp(min=1)
    return -logps, {"nll_per_token": -logps.detach() / n_tokens}


# ----------------------------------------------------------------------------------------------------------------
# The training loop


def make_optimizer(s: Settings, model, device):
    params = [p for p in model.parameters() if p.requires_grad]
    if s.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=s.lr)
    if s.optimizer == "adamw":
        fused = device.type == "cuda" and not s.offload  # offloaded shards step on the CPU
        return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay, fused=fused)
    raise SystemExit(f"--optimizer must be rmsprop or adamw, got {s.optimizer!r}")


def train(s: Settings, model, loss_fn, train_batch, eval_batch, n_eval: int, lengths, stage: str, run=None):
    """Train `model` with `loss_fn(model, batch) -> (per-example losses (B,), {metric: (B,)})`. train_batch(indices)
    and eval_batch(indices) -> dict of tensors (input_ids, target_ids, loss_mask, ...) for those training / held-out
    examples (n_eval of them; `evaluate` takes a seeded subset). `lengths`, one per training example, drive the
    length-grouped, seeded, resumable batch order (batch_order.py). run: prepare's distributed.Run (built here if
    not given)."""
    run = run or distributed.setup(s)
    master, out, settings = run.rank == 0, Path(s.out), common.settings_dict(s)
    if master:
        print(f"device {run.device}, {run.dtype}: {run.reason}; {run.world} process(es)")
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(settings, indent=2))
    if s.eval_every and min(s.n_eval, n_eval) < run.world:  # every rank must evaluate something (all_reduce shapes)
        raise SystemExit(f"--n_eval={s.n_eval} (held-out set: {n_eval}) must be at least the number of processes {run.world}")
    raw_model = distributed.place(model, s, run, gpt.Block)  # what we save: never the compiled or DDP wrapper, so keys stay plain
    optimizer = make_optimizer(s, raw_model, run.device)  # after sharding: it must hold the sharded parameters
    step = checkpoints.resume(out, raw_model, optimizer, master) if s.resume else 0
    scaler = distributed.grad_scaler(s, run)  # fp16 only: scales the loss up, unscales the gradients before clipping
    model = distributed.wrap(torch.compile(raw_model) if s.compile else raw_model, s, run)  # DDP with several processes
    epoch_order = functools.lru_cache(maxsize=1)(  # the batches of an epoch, in order: (seed, epoch) decide them
        lambda epoch: batch_order.epoch_batches(lengths, s.batch_size, s.seed, epoch, s.group_by_length))
    batches_per_epoch = len(epoch_order(0))
    total = s.max_steps or s.epochs * batches_per_epoch

    def log(record):  # one line of metrics.jsonl, by rank 0
        if master:
            common.append_jsonl(out / "metrics.jsonl", [record])

    def log_eval():
        stats = evaluate(model, loss_fn, eval_batch, n_eval, s, run)
        log({"step": step, "split": "eval", **stats})
        if master:
            print(f"{stage} step {step}: eval  " + "  ".join(f"{k} {v:.4f}" for k, v in stats.items()), flush=True)

    model.train()
    t0, tokens_seen, start_step = time.time(), 0, step
    with distributed.process_group(run), checkpoints.ctrl_c_finishes_the_step(master and run.world == 1) as interrupted:
        while step < total:
            epoch, index = divmod(step, batches_per_epoch)
            batch_ids = epoch_order(epoch)[index]  # the global batch of this step, e.g. (64,) example indices
            lr = s.lr * min(1.0, (step + 1) / max(1, s.warmup_steps))  # linear warmup, then constant
            for group in optimizer.param_groups:
                group["lr"] = lr

            if s.eval_every and step % s.eval_every == 0:
                log_eval()
            if s.save_every and step % s.save_every == 0 and step > 0:
                meta = {"stage": stage, "step": step, "settings": settings}
                checkpoints.save_weights(raw_model, out / f"step_{step:06d}", meta, master)

            # Each rank takes every world-th example of the global batch and runs it in micro-batches.
            mine = batch_ids[run.rank :: run.world]
            micro = [mine[i : i + s.micro_batch_size] for i in range(0, len(mine), s.micro_batch_size)]
            sums, count = {}, torch.zeros((), device=run.device)
            for i, ids in enumerate(micro):
                batch = common.to_device(train_batch(ids), run.device)
                tokens_seen += batch["input_ids"].numel() * run.world
                with distributed.gradient_sync(model, raw_model, s, run, last=i == len(micro) - 1):
                    with common.autocast(run.device, run.dtype):
                        losses, metrics = loss_fn(model, batch)
                    # Gradient of the mean over the global batch: each micro-batch contributes sum / rows of the
                    # global batch. DDP and FSDP average over ranks (divide by world): multiply by world to undo it.
                    rows_per_example = len(losses) // len(ids)  # 2 when train_on=all: chosen and rejected rows
                    loss = losses.sum() * run.world / (len(batch_ids) * rows_per_example)
                    scaler.scale(loss).backward()
                count += add_sums(sums, losses, metrics)
            stats = distributed.reduce_mean(sums, count, run)
            if not math.isfinite(stats["loss"]):
                raise RuntimeError(f"non-finite loss ({stats['loss']}) at step {step}; latest/ keeps the last good "
                                   "checkpoint. Lower --lr, or try --dtype=float32 to rule out fp16 overflow.")
            scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip).item()
            scaler.step(optimizer)
            scaler.update()
            if step == start_step:  # once, while gradients and optimizer state exist: what each process holds
                distributed.log_state(raw_model, optimizer, s, run, step + 1, log)
            optimizer.zero_grad(set_to_none=True)
            step += 1

            # progress: this step's mean loss and metrics over the global batch, tokens per second, time left
            elapsed = time.time() - t0
            tok_s, eta = tokens_seen / elapsed, (total - step) * elapsed / (step - start_step)
            log({"step": step, "split": "train", "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tok_s,
                 "mem_gb": distributed.peak_memory_gb(run.device), **stats})
            if master:
                shown = "  ".join(f"{k} {v:.4f}" for k, v in stats.items())
                print(f"{stage} step {step}/{total}  {shown}  lr {lr:.2e}  {tok_s:,.0f} tok/s  ETA {eta / 60:.1f} min",
                      flush=True)
            if s.checkpoint_every and step % s.checkpoint_every == 0 or interrupted():
                checkpoints.save_checkpoint(out / "latest", raw_model, optimizer, step, settings, master)
            if interrupted():
                print(f"interrupted: saved {out / 'latest'} at step {step}; run the same command to resume")
                sys.exit(130)
        if s.eval_every:
            log_eval()
        checkpoints.save_checkpoint(out / "latest", raw_model, optimizer, step, settings, master)
        checkpoints.save_weights(raw_model, out / "final", {"stage": stage, "step": step, "settings": settings}, master)
        if master:
            print(f"saved {out / 'final'}")
    return raw_model


def evaluate(model, loss_fn, eval_batch, n_eval: int, s: Settings, run) -> dict[str, float]:
    """Mean loss and metrics over the seeded held-out subset, each rank a share of it, summed over the ranks."""
    model.eval()
    sums, count = {}, torch.zeros((), device=run.device)
    ids = batch_order.eval_subset(n_eval, s.n_eval, s.seed).tolist()[run.rank :: run.world]  # a seeded subset
    with torch.no_grad():
        for chunk in distributed.eval_chunks(ids, s.micro_batch_size, min(s.n_eval, n_eval), run, s.fsdp):
            with common.autocast(run.device, run.dtype):
                losses, metrics = loss_fn(model, common.to_device(eval_batch(chunk or ids[:1]), run.device))
            if chunk:  # an empty chunk only keeps FSDP's ranks in step
                count += add_sums(sums, losses, metrics)
    model.train()
    return distributed.reduce_mean(sums, count, run)


def add_sums(sums: dict, losses, metrics: dict) -> int:
    """Add a micro-batch's per-example losses and metrics to running sums; returns its number of examples."""
    for k, v in {"loss": losses, **metrics}.items():
        sums[k] = sums.get(k, 0) + v.detach().float().sum()
    return len(losses)


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
    """Parse settings, join the processes (distributed.Run, built once here and passed down) and tokenize the data;
    None when the run already finished (stages skip done work)."""
    s = common.parse_settings(settings_class, argv)
    if gpt.weights_file(Path(s.out) / "final").exists():
        print(f"{s.out}/final exists: {stage} already done (delete it to train again)")
        return None
    print(json.dumps(common.settings_dict(s), indent=2))
    run = distributed.setup(s)
    kw = dict(max_length=s.max_length, max_prompt_length=s.max_prompt_length, truncation=s.truncation)
    with distributed.rank_zero_first(run):
        return s, run, data.tokenize_dataset(s.dataset, "train", **kw), data.tokenize_dataset(s.dataset, "test", **kw)


def main(argv=None):
    prepared = prepare(Settings, argv, "training")
    if prepared is None:
        return
    s, run, train_data, eval_data = prepared
    if s.train_on not in ("chosen", "all"):
        raise SystemExit(f"--train_on must be chosen or all, got {s.train_on!r}")
    on, stage = ("response", "sft") if s.train_on == "chosen" else ("all", "pretrain")
    if s.sft_targets not in ("every_pair", "one_per_prompt", "auto"):
        raise SystemExit(f"--sft_targets must be every_pair, one_per_prompt or auto, got {s.sft_targets!r}")
    if s.sft_targets == "auto":  # SHP's loader puts each post's best-scored answer last, which one_per_prompt keeps
        s.sft_targets = "one_per_prompt" if data.dataset_source(s.dataset)[0] == "shp" else "every_pair"
    if s.sft_targets == "one_per_prompt":  # the reference code's SFT set: one chosen response per prompt
        train_data = data.select_examples(train_data, data.one_per_prompt(train_data))
        print(f"--sft_targets=one_per_prompt: {data.n_examples(train_data)} training examples, one per prompt")
    train(s, load_policy(s), sft_loss, lambda ids: data.sft_batch(train_data, ids, on=on),
          lambda ids: data.sft_batch(eval_data, ids, on=on), data.n_examples(eval_data),
          data.example_lengths(train_data, "sft" if on == "response" else "pref"), stage, run)

if __name__ == "__main__":
    main()
