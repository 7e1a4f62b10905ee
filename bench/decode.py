"""How close is a decode step to its memory limit, and how does it compare? gpt2 (124M, random weights), greedy, in
bf16 (where this hardware multiplies it natively) and fp32: machinery/fast_generate.generate vs the plain KV-cached
model.generate vs transformers.generate (and, on CUDA, the compiled CUDA-graph step), each against the bytes a
step must read at the measured memory bandwidth (raced as bench/timing.py says).

    python -m bench.decode                          # part of make bench (CPU: ~2 min)
    python -m bench.decode --dtype=float32          # one dtype only
"""

import copy
import dataclasses
import time

import torch

from bench import timing
from machinery import common, fast_generate


@dataclasses.dataclass
class Settings:
    """Decode step against its memory limit, ours vs transformers.generate: python -m bench.decode --key=value ..."""

    model: str = "gpt2"  # a preset (random weights) or a checkpoint; small (6 x 384, 30M)
    batch: int = 8  # prompts decoded at once
    prompt_len: int = 64  # tokens per prompt
    new_tokens: int = 64  # tokens generated per prompt; a step's time is (time for all - time for 1) / (new_tokens - 1)
    steps: int = 0  # timed rounds per measurement, the median is reported (0: 10 on CUDA, 3 elsewhere)
    device: str = "auto"  # cuda, mps, cpu or auto
    dtype: str = "auto"  # the weights' dtype: auto (bf16 where native, and fp32), bfloat16 or float32
    seed: int = 0  # weights


def stream_rate(dtype, n: int = 3072, k: int = 768) -> float:
    """Bytes/s at which generation's own matmul on CPU (8 rows times a weight packed as fast_generate.prepared packs it)
    streams weights that are not in cache: the practical ceiling of a decode step, below the bandwidth of a sum."""
    count = 2**28 // (n * k * torch.finfo(dtype).bits // 8)
    weights = [fast_generate.prepare_linear(torch.randn(n, k), None, dtype, rows=8, pack=True)[0] for _ in range(count)]
    x, best = torch.randn(8, k, dtype=dtype), float("inf")
    with torch.no_grad():
        for _ in range(3):
            t0 = time.perf_counter()
            for w in weights:
                w(x)
            best = min(best, time.perf_counter() - t0)
    return len(weights) * n * k * torch.finfo(dtype).bits // 8 / best


def bench_decode(s, model, device, dtype, bandwidth, repeats) -> tuple[float, list[str]]:
    """B prompts x P tokens, N new, greedy, both models' weights in `dtype`: ours vs transformers.generate. A decode
    step's time is (time for N tokens - time for 1) / (N - 1), which takes out the prefill; its limit is the bytes
    it must read at the measured bandwidth: every weight once (our vocabulary head in fp32, see GPT.logits; theirs
    in `dtype`) and the KV cache (half full on average)."""
    B, P, N = s.batch, s.prompt_len, s.new_tokens
    ours = copy.deepcopy(model).to(dtype).eval()
    theirs = timing.to_transformers(ours, device).hf.to(dtype) if timing.transformers is not None else None
    prompts = torch.randint(model.config.vocab_size, (B, P), generator=torch.Generator().manual_seed(1))
    idx = prompts.to(device)
    fns = {}
    for n in (N, 1):
        fns[f"ours {n}"] = lambda n=n: fast_generate.generate(ours, prompts.tolist(), n, temperature=0, eos_id=-1)
        fns[f"plain {n}"] = lambda n=n: ours.generate(prompts.tolist(), n, temperature=0, eos_id=-1)  # model.py alone
        if device.type == "cuda":  # the decode step through torch.compile, as CUDA graphs (compiled before the race)
            fns[f"compiled {n}"] = lambda n=n: fast_generate.generate(ours, prompts.tolist(), n, temperature=0,
                                                                      eos_id=-1, compiled=True)
            fns[f"compiled {n}"]()
        if theirs is not None:
            fns[f"theirs {n}"] = lambda n=n: theirs.generate(idx, attention_mask=torch.ones_like(idx), do_sample=False,
                                                             max_new_tokens=n)
    times, _, _ = timing.race(fns, repeats, device, once=[name for name in fns if name.startswith("compiled")])
    c, size = model.config, torch.finfo(dtype).bits // 8
    head, body = c.vocab_size * c.n_embd, model.num_params() - c.vocab_size * c.n_embd - c.block_size * c.n_embd
    kv = 2 * c.n_layer * B * (P + N / 2) * c.n_embd * size  # keys and values, all layers
    ours_bytes = body * size + head * 4 + kv * (4 / size if device.type == "cpu" else 1)  # fp32 head; CPU cache fp32
    limit = {"ours": ours_bytes / bandwidth, "compiled": ours_bytes / bandwidth,
             "plain": (body * size + head * 4 + kv) / bandwidth, "theirs": (body * size + head * size + kv) / bandwidth}
    step = {who: (times[f"{who} {N}"] - times[f"{who} 1"]) / (N - 1) for who in limit if f"{who} 1" in times}
    name = str(dtype).removeprefix("torch.")
    label = {"ours": "ours (fast_generate.generate)", "compiled": "ours, compiled", "plain": "ours, plain model.generate",
             "theirs": "transformers.generate"}
    timing.table(f"decode step, {name} weights: {B} prompts x {P} tokens, {N} new, median of {repeats}",
                 ["", "ms/step", "new tokens/s", "read limit (ms)", "of limit"],
                 [[label[w], f"{1e3 * t:.1f}", f"{B / t:,.0f}", f"{1e3 * limit[w]:.1f}", f"{limit[w] / t:.0%}"]
                  for w, t in step.items()])
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        rate = stream_rate(dtype)
        print(f"  the packed matmul alone streams weights at {rate / 1e9:.0f} GB/s ({rate / bandwidth:.0%} of the sum's "
              f"rate): at that rate ours could take {1e3 * ours_bytes / rate:.1f} ms/step, and takes "
              f"{step['ours'] / (ours_bytes / rate):.2f}x that")
    vs = f"{step['theirs'] / step['ours']:.2f}x transformers.generate" if "theirs" in step else "transformers skipped"
    return step["ours"], [f"decode {name:8}  {1e3 * step['ours']:.1f} ms/step = {limit['ours'] / step['ours']:.0%} of its "
                          f"memory limit; {vs} (whole call, {N} tokens: {times[f'theirs {N}'] / times[f'ours {N}']:.2f}x)"
                          if "theirs" in step else f"decode {name:8}  {1e3 * step['ours']:.1f} ms/step; {vs}"]


def main(argv=None):
    start, s = time.time(), common.parse_settings(Settings, argv)
    device, _, model, repeats = timing.setup(s)
    bandwidth = timing.memory_bandwidth(device)
    print(f"\nmemory bandwidth {bandwidth / 1e9:.1f} GB/s (read)")
    lines, step = [], {}
    for dtype in timing.native_dtypes(device, s.dtype):
        step[dtype], more = bench_decode(s, model, device, dtype, bandwidth, repeats)
        lines += more
    if len(step) == 2:
        lines.append(f"bf16 vs fp32    decode step {step[torch.float32] / step[torch.bfloat16]:.2f}x faster in bf16")
    timing.summary(lines, start)


if __name__ == "__main__":
    main()
