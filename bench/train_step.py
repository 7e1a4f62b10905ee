"""Is our training step as fast as transformers'? Forward + backward of sft.sft_loss (half of every row is
prompt), ours vs transformers' GPT2LMHeadModel holding the same weights and run through the same loss code, with
tokens/s, MFU against the measured matmul peak, HFU and peak memory (bench/timing.py says how it races).

    python -m bench.train_step                                 # part of make bench (CPU: ~1 min)
    python -m bench.train_step --model=gpt2-medium --batch=16  # any preset; random weights, speed does not depend on them
"""

import dataclasses
import time

import torch

import sft
from bench import timing
from machinery import common


@dataclasses.dataclass
class Settings:
    """Training step, ours vs transformers: python -m bench.train_step --key=value ..."""

    model: str = "auto"  # auto (gpt2 on CUDA, small elsewhere), small (6 x 384, 30M), a preset, or a checkpoint
    batch: int = 8  # rows per training step
    seq: int = 0  # tokens per row, the first half prompt (0: 512 on CUDA, 128 elsewhere)
    steps: int = 0  # timed rounds per measurement, the median is reported (0: 10 on CUDA, 3 elsewhere)
    device: str = "auto"  # cuda, mps, cpu or auto
    dtype: str = "auto"  # bfloat16, float16, float32 or auto (common.pick_device: bf16 on recent GPUs and bf16-native CPUs)
    seed: int = 0  # weights and inputs


def bench_train(model, theirs, batch, device, dtype, peak, repeats) -> list[str]:
    fns = {"ours": timing.train_step(model, sft.sft_loss, batch, device, dtype)}
    if theirs is not None:
        with torch.no_grad():  # same weights, same loss code: the log-probs must agree before speed means anything
            ours_lp, their_lp = sft.sequence_logps(model, batch), sft.sequence_logps(theirs, batch)
        print(f"\nsame log-probs as transformers: max |diff| {(ours_lp - their_lp).abs().max():.1e} "
              f"(values around {ours_lp.mean():.0f})")
        fns["transformers"] = timing.train_step(theirs, sft.sft_loss, batch, device, dtype)
    tokens = batch["input_ids"].numel()
    times, memory, mfu = timing.step_table(f"train step on {tuple(batch['input_ids'].shape)} tokens", fns,
                                           dict.fromkeys(fns, 6 * model.num_params() * tokens), tokens, peak, repeats,
                                           device)
    if theirs is None:
        print("  transformers: skipped (not installed)")
        return [f"train step      ours {tokens / times['ours']:,.0f} tokens/s, MFU {mfu['ours']:.1%}; transformers skipped"]
    return [f"train step      ours vs transformers: {times['transformers'] / times['ours']:.2f}x tokens/s "
            f"(MFU {mfu['ours']:.1%} vs {mfu['transformers']:.1%}; memory {timing.mib(memory['ours'])} vs "
            f"{timing.mib(memory['transformers'])})"]


def main(argv=None):
    start, s = time.time(), common.parse_settings(Settings, argv)
    device, dtype, model, repeats = timing.setup(s)
    seq = s.seq or (512 if device.type == "cuda" else 128)
    peak = timing.matmul_peak(device, dtype)
    theirs = timing.to_transformers(model, device) if timing.transformers is not None else None
    batch = timing.make_batch(s.batch, seq, model.config.vocab_size, device, s.seed)
    timing.summary(bench_train(model, theirs, batch, device, dtype, peak, repeats), start)


if __name__ == "__main__":
    main()
