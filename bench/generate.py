"""How fast is our generation, and does it give the same tokens? One greedy generate call (EOS off), ours
(machinery/fast_generate.py, KV cache) vs transformers.generate holding the same weights vs greedy decoding that
recomputes the whole sequence per token (timing.naive_generate), raced as bench/timing.py says.

    python -m bench.generate                                 # part of make bench (CPU: ~1 min)
    python -m bench.generate --batch=1 --new_tokens=256      # one prompt, longer answers
"""

import dataclasses
import time

import torch

from bench import timing
from machinery import common, fast_generate


@dataclasses.dataclass
class Settings:
    """Generation, ours vs transformers.generate vs no cache: python -m bench.generate --key=value ..."""

    model: str = "auto"  # auto (gpt2 on CUDA, small elsewhere), small (6 x 384, 30M), a preset, or a checkpoint
    batch: int = 8  # prompts generated at once
    prompt_len: int = 64  # tokens per prompt
    new_tokens: int = 128  # tokens generated per prompt
    steps: int = 0  # timed rounds per measurement, the median is reported (0: 10 on CUDA, 3 elsewhere)
    device: str = "auto"  # cuda, mps, cpu or auto
    dtype: str = "auto"  # bfloat16, float16, float32 or auto (common.pick_device: bf16 on recent GPUs and bf16-native CPUs)
    seed: int = 0  # weights and prompts


def bench_generate(s, model, theirs, device, dtype, repeats) -> list[str]:
    prompts = torch.randint(model.config.vocab_size, (s.batch, s.prompt_len),
                            generator=torch.Generator().manual_seed(s.seed + 1))
    idx, out = prompts.to(device), {}

    def run(name, fn):
        def call():
            with torch.no_grad(), common.autocast(device, dtype):
                out[name] = fn().cpu()
        return call

    ours, hf, naive = "ours (KV cache)", "transformers.generate", "ours, no cache"
    fns = {ours: run(ours, lambda: torch.tensor(fast_generate.generate(model, prompts.tolist(), s.new_tokens,
                                                                       temperature=0, eos_id=-1)))}
    if theirs is not None:
        fns[hf] = run(hf, lambda: theirs.hf.generate(idx, attention_mask=torch.ones_like(idx), do_sample=False,
                                                     max_new_tokens=s.new_tokens)[:, s.prompt_len :])
    fns[naive] = run(naive, lambda: timing.naive_generate(model, idx, s.new_tokens))
    times, _, _ = timing.race(fns, repeats, device, once={naive})  # one no-cache run is already new_tokens forwards
    n = s.batch * s.new_tokens
    timing.table(f"generation: {s.batch} prompts x {s.prompt_len} tokens, {s.new_tokens} new tokens each, greedy",
                 ["", "s", "new tokens/s", "ours is faster", "same tokens as ours"],
                 [[name, f"{t:.2f}", f"{n / t:,.0f}", f"{t / times[ours]:.2f}x",
                   f"{(out[name] == out[ours]).float().mean():.1%}"] for name, t in times.items()])
    vs_hf = f"{times[hf] / times[ours]:.2f}x tokens/s" if theirs is not None else "skipped"
    return [f"generation      ours vs transformers.generate: {vs_hf}; KV cache vs none: {times[naive] / times[ours]:.1f}x"]


def main(argv=None):
    start, s = time.time(), common.parse_settings(Settings, argv)
    device, dtype, model, repeats = timing.setup(s)
    theirs = timing.to_transformers(model, device) if timing.transformers is not None else None
    timing.summary(bench_generate(s, model, theirs, device, dtype, repeats), start)


if __name__ == "__main__":
    main()
