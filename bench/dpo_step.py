"""What do DPO's design choices cost in a training step? Fused [chosen; rejected] forward (dpo.concatenated_forward)
vs two forwards, precomputed vs live reference, and an SFT step on the same rows alongside: tokens/s, MFU against
the measured matmul peak, HFU and peak memory (bench/timing.py says how it races).

    python -m bench.dpo_step                                 # part of make bench (CPU: ~1 min)
    python -m bench.dpo_step --model=gpt2 --batch=4          # 2 pairs of gpt2 (random weights)
"""

import copy
import dataclasses
import time

import torch

import data
import dpo
import sft
from bench import timing
from machinery import common


@dataclasses.dataclass
class Settings:
    """DPO step, fused vs two forwards, precomputed vs live reference: python -m bench.dpo_step --key=value ..."""

    model: str = "auto"  # auto (gpt2 on CUDA, small elsewhere), small (6 x 384, 30M), a preset, or a checkpoint
    batch: int = 8  # rows per training step: batch/2 pairs
    seq: int = 0  # tokens per row, the first half prompt (0: 512 on CUDA, 128 elsewhere)
    steps: int = 0  # timed rounds per measurement, the median is reported (0: 10 on CUDA, 3 elsewhere)
    device: str = "auto"  # cuda, mps, cpu or auto
    dtype: str = "auto"  # bfloat16, float16, float32 or auto (common.pick_device: bf16 on recent GPUs and bf16-native CPUs)
    seed: int = 0  # weights and inputs


def bench_dpo(model, batch, device, dtype, peak, repeats) -> list[str]:
    (rows, T), N = batch["input_ids"].shape, model.num_params()
    reference = copy.deepcopy(model).requires_grad_(False).eval()
    with torch.no_grad(), common.autocast(device, dtype):
        ref_chosen, ref_rejected = dpo.concatenated_forward(reference, batch)[:2]
    batch = {**batch, "reference_chosen_logps": ref_chosen.float(), "reference_rejected_logps": ref_rejected.float()}
    settings = dpo.Settings()

    def two_forwards(model, batch):
        """The unfused step (e.g. rasbt's ch07): the chosen rows, then the rejected rows, each its own forward."""
        halves = {k: data.split_pairs(batch[k]) for k in ("input_ids", "target_ids", "loss_mask")}
        chosen, rejected = ({k: half[i] for k, half in halves.items()} for i in (0, 1))
        losses, _, _ = dpo.dpo_loss(sft.sequence_logps(model, chosen), sft.sequence_logps(model, rejected),
                                    batch["reference_chosen_logps"], batch["reference_rejected_logps"], settings.beta)
        return losses, {}

    sft_step, fused, two, live = "SFT, same rows", "DPO fused, precomputed ref", "DPO two forwards, precomputed", "DPO fused, live ref"
    losses = {sft_step: sft.sft_loss, fused: dpo.make_loss(settings), two: two_forwards,
              live: dpo.make_loss(settings, reference)}
    fns = {name: timing.train_step(model, loss_fn, batch, device, dtype) for name, loss_fn in losses.items()}
    model_flops = {name: (8 if name == live else 6) * N * rows * T for name in fns}  # live: + the reference's forward
    times, memory, _ = timing.step_table(f"DPO step, {rows // 2} pairs = {rows} rows x {T} tokens", fns, model_flops,
                                         rows * T, peak, repeats, device)
    return [f"DPO step        fused vs two forwards: {times[two] / times[fused]:.2f}x; precomputed vs live reference: "
            f"{times[live] / times[fused]:.2f}x (memory {timing.mib(memory[fused])} vs {timing.mib(memory[live])}); "
            f"DPO {rows * T / times[fused]:,.0f} vs SFT {rows * T / times[sft_step]:,.0f} tokens/s"]


def main(argv=None):
    start, s = time.time(), common.parse_settings(Settings, argv)
    device, dtype, model, repeats = timing.setup(s)
    seq = s.seq or (512 if device.type == "cuda" else 128)
    peak = timing.matmul_peak(device, dtype)
    batch = timing.make_batch(s.batch, seq, model.config.vocab_size, device, s.seed, pairs=True)
    timing.summary(bench_dpo(model, batch, device, dtype, peak, repeats), start)


if __name__ == "__main__":
    main()
