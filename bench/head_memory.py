"""How much memory does machinery/vocab_head.py's chunked head save, and what share of a GPU step is the head?
The peak memory of one gpt2 DPO step (4 pairs x 512 tokens) with the plain head and with vocab_head.py's, each
measured in a fresh process (a high-water mark only rises); then the head's share of a bf16 DPO step on an A100 and
an H100, AN ESTIMATE from datasheet peaks (no GPU measured it).

    python -m bench.head_memory                     # CPU: ~1 min, peak RSS ~4 GiB
    python -m bench.head_memory --device=cuda       # the CUDA allocator's peak instead
"""

import contextlib
import dataclasses
import resource
import subprocess
import sys
from pathlib import Path

import torch

import dpo
import model as gpt
import sft
from bench import timing
from machinery import common


@dataclasses.dataclass
class Settings:
    """The vocabulary head's peak memory, plain vs vocab_head.py, and its GPU share: python -m bench.head_memory ..."""

    device: str = "auto"  # cuda, mps, cpu or auto
    dtype: str = "auto"  # bfloat16, float16, float32 or auto (common.pick_device)
    seed: int = 0  # weights
    step: str = ""  # internal: "plain" or "chunked" runs one DPO step with that head in this fresh process


GPU_PEAKS = {"A100": (312e12, 19.5e12), "H100": (989e12, 67e12)}  # dense bf16 and fp32 (TF32 off) FLOP/s, datasheets


def head_step(s) -> None:
    """One DPO optimizer step of gpt2 (random weights), micro-batch 4 pairs x 512 tokens, half of them response (2,048
    head rows), reference log-probs given, RMSprop, with the s.step head ("plain" or "chunked"), in this fresh
    process; prints the peak: RSS on CPU (the process's high-water mark), the allocator's peak on CUDA."""
    device, dtype, _ = common.pick_device(s.device, s.dtype)
    torch.manual_seed(s.seed)
    model = timing.build_model("gpt2").to(device).train()
    batch = timing.make_batch(8, 512, model.config.vocab_size, device, seed=3, pairs=True)
    batch |= {"reference_chosen_logps": torch.zeros(4, device=device), "reference_rejected_logps": torch.zeros(4, device=device)}
    optimizer = sft.make_optimizer(dpo.Settings(), model, device)
    with timing.head_swapped(timing.plain_head) if s.step == "plain" else contextlib.nullcontext():
        with common.autocast(device, dtype):
            losses, _ = dpo.make_loss(dpo.Settings())(model, batch)
        losses.sum().backward()
    optimizer.step()
    cuda = device.type == "cuda"
    peak = torch.cuda.max_memory_allocated(device) if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"head_step {s.step} peak_bytes {peak}")


def head_shares() -> list[list]:
    """The head's share of a bf16 DPO step on each GPU, on paper: every matmul at its dtype's datasheet peak, half the
    tokens response. Per response token the head costs 2 V C FLOPs per product: 3 fp32 products before vocab_head.py
    (forward, two in backward); with vocab_head.py, the recomputation adds one (4 fp32) or, split, 3 + 3 + 2 bf16 ones."""
    rows = []
    for name in gpt.HUB_MODELS:
        with torch.device("meta"):
            model = gpt.GPT(gpt.PRESETS[name])
        c = model.config
        body, vc = 6 * (model.num_params() - c.vocab_size * c.n_embd), 2 * c.vocab_size * c.n_embd  # per token
        cells = []
        for bf16, fp32 in GPU_PEAKS.values():
            t = {"fp32": 0.5 * 3 * vc / fp32, "chunked": 0.5 * 4 * vc / fp32, "split": 0.5 * 8 * vc / bf16}
            base = body / bf16
            cells += [f"{t[k] / (base + t[k]):.0%}" for k in t] + [f"{(base + t['fp32']) / (base + t['split']):.2f}x"]
        rows.append([name] + cells)
    return rows


def bench_head(s) -> None:
    device, _, reason = common.pick_device(s.device, s.dtype)
    peaks = {}
    for kind in ("plain", "chunked"):  # each in a fresh process: a high-water mark only rises
        run = subprocess.run([sys.executable, "-m", "bench.head_memory", f"--step={kind}", f"--device={s.device}",
                              f"--dtype={s.dtype}", f"--seed={s.seed}"], cwd=Path(__file__).resolve().parents[1],
                             capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, f"head step ({kind}) failed:\n{run.stdout[-1500:]}\n{run.stderr[-1500:]}"
        peaks[kind] = int(run.stdout.split("peak_bytes ")[1].split()[0])
    logits = 4 * 2048 * gpt.PRESETS["gpt2"].vocab_size
    what = "peak RSS of the process" if device.type == "cpu" else "torch.cuda.max_memory_allocated"
    timing.table(f"one gpt2 DPO step, 4 pairs x 512 tokens (2,048 head rows), {reason}: {what}, each in a fresh process",
                 ["head", "peak GiB"], [[k, f"{v / 2**30:.2f}"] for k, v in peaks.items()])
    print(f"  vocab_head.py saves {(peaks['plain'] - peaks['chunked']) / 2**30:.2f} GiB; one (2048, 50257) fp32 tensor is "
          f"{logits / 2**30:.2f} GiB, the plain head's three {3 * logits / 2**30:.2f} GiB")
    timing.table("the head's share of a bf16 DPO step, AN ESTIMATE from datasheet peaks (no GPU measured it): fp32 "
                 "before vocab_head.py, fp32 chunked, split bf16; and the step's speed-up from split bf16",
                 ["model"] + [f"{gpu} {k}" for gpu in GPU_PEAKS for k in ("fp32", "chunked", "split", "speed-up")],
                 head_shares())


def main(argv=None):
    s = common.parse_settings(Settings, argv)
    if s.step:
        return head_step(s)
    bench_head(s)


if __name__ == "__main__":
    main()
