"""What do exact log-probs cost? GPT.logits projects onto the vocabulary in fp32 even under bf16/fp16 autocast
(model.py says why); the alternative is the plain low-precision projection, i.e. rounded logits, as transformers and
TRL compute them. Same SFT and DPO training steps, only the head differs (raced as bench/timing.py says). On fp32
hardware (a CPU without native bf16) there is nothing to compare, so both run under bf16 autocast there.

    python -m bench.fp32_head                    # part of make bench (CPU: ~1 min)
    python -m bench.fp32_head --model=gpt2       # gpt2 (random weights), whose head is 38M of its 124M parameters
"""

import contextlib
import dataclasses
import time

import torch

import dpo
import sft
from bench import timing
from machinery import common


@dataclasses.dataclass
class Settings:
    """Training steps with the vocabulary projection in fp32 vs bf16/fp16: python -m bench.fp32_head --key=value ..."""

    model: str = "auto"  # auto (gpt2 on CUDA, small elsewhere), small (6 x 384, 30M), a preset, or a checkpoint
    batch: int = 8  # rows per training step: batch/2 pairs for DPO
    seq: int = 0  # tokens per row, the first half prompt (0: 512 on CUDA, 128 elsewhere)
    steps: int = 0  # timed rounds per measurement, the median is reported (0: 10 on CUDA, 3 elsewhere)
    device: str = "auto"  # cuda, mps, cpu or auto
    dtype: str = "auto"  # bfloat16, float16, float32 or auto (common.pick_device: bf16 on recent GPUs and bf16-native CPUs)
    seed: int = 0  # weights and inputs


def bench_fp32_head(model, batch, device, dtype, peak, repeats) -> list[str]:
    low = dtype if dtype != torch.float32 else torch.bfloat16
    settings = dpo.Settings()
    with torch.no_grad(), common.autocast(device, low):
        ref_chosen, ref_rejected = dpo.concatenated_forward(model, batch)[:2]
    batch = {**batch, "reference_chosen_logps": ref_chosen, "reference_rejected_logps": ref_rejected}

    def with_head(step, low_head: bool):
        def call():
            with timing.head_swapped(timing.low_precision_head) if low_head else contextlib.nullcontext():
                step()
        return call

    name = str(low).removeprefix("torch.")
    fns = {f"{stage}, {head} head": with_head(timing.train_step(model, loss_fn, batch, device, low), head != "fp32")
           for stage, loss_fn in (("SFT", sft.sft_loss), ("DPO", dpo.make_loss(settings)))
           for head in ("fp32", name)}
    rows, T = batch["input_ids"].shape
    times, _, _ = timing.step_table(f"vocabulary projection in fp32 vs {name}, {name} autocast, {rows} rows x {T} "
                                    "tokens", fns, dict.fromkeys(fns, 6 * model.num_params() * rows * T), rows * T,
                                    peak, repeats, device)
    cost = {stage: times[f"{stage}, fp32 head"] / times[f"{stage}, {name} head"] for stage in ("SFT", "DPO")}
    return [f"fp32 head       step time vs {name} head ({name} autocast): SFT {cost['SFT']:.2f}x, DPO {cost['DPO']:.2f}x"]


def main(argv=None):
    start, s = time.time(), common.parse_settings(Settings, argv)
    device, dtype, model, repeats = timing.setup(s)
    seq = s.seq or (512 if device.type == "cuda" else 128)
    peak = timing.matmul_peak(device, dtype)
    batch = timing.make_batch(s.batch, seq, model.config.vocab_size, device, s.seed, pairs=True)
    timing.summary(bench_fp32_head(model, batch, device, dtype, peak, repeats), start)


if __name__ == "__main__":
    main()
