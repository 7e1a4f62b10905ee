"""What the benchmarks in bench/ share: a fair race between alternatives, memory peaks, the measured limits (the
matmul peak MFU divides by, the read bandwidth a decode step is bound by), and the models, batches and baselines
several of them run. Each script beside it answers one question; `make bench` runs them in turn.

    python -m bench.timing    # this machine's limits: the matmul peak in each native dtype, the read bandwidth

A race runs ours and the alternative in one process, interleaved (A B, B A, A B, ...), and reports the median of
--steps rounds: a busy or throttled machine slows both alike, so the RATIOS hold where the absolute numbers wander.
A ratio says how many times faster the first-named is (> 1.0x: it wins). On a CPU that other processes also use,
every op waits for its slower OpenMP thread and absolute numbers can drop several-fold (each script warns).

MFU (model FLOPs utilisation; Chowdhery et al. 2022, arXiv:2204.02311, App. B) = 6 N tokens / time / peak, N the
parameters, embedding included; a live reference adds its forward, 2 N tokens. The numerator is the same for ours
and theirs, so work that ours skips (the vocabulary projection at prompt positions) raises its MFU, even past 100%
for a small model whose embedding is most of N. HFU divides the FLOPs really executed (torch.utils.flop_counter)
instead: the hardware's true utilisation.
"""
import contextlib
import ctypes
import os
import statistics
import threading
import time
from unittest import mock

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import model as gpt
from machinery import common, vocab_head

try:  # optional: without it the comparisons print "skipped"
    import transformers
except ImportError:
    transformers = None

# ----------------------------------------------------------------------------------------------------------------
# The clock, the memory, and the measured limits


def sync(device):
    """GPU kernels run asynchronously: wait for them, or the clock stops before the work does."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def race(fns: dict, repeats: int, device, once=()) -> tuple[dict, dict, dict]:
    """(median seconds, peak memory, FLOPs) per call of each fn, over `repeats` interleaved rounds. The first call
    is an untimed warm-up (lazy init, allocator growth, kernel choice) that also measures memory and counts FLOPs,
    both of which would slow a timed call. Names in `once` (slow baselines) are timed in round 0 only, no warm-up."""
    memory, flops = {}, {}
    for name in [name for name in fns if name not in once]:
        with FlopCounterMode(display=False) as counter:  # every matmul and attention FLOP, backward included
            memory[name] = peak_memory(fns[name], device)
        flops[name] = counter.get_total_flops()
    times = {name: [] for name in fns}
    for r in range(repeats):
        for name in list(fns) if r % 2 == 0 else list(fns)[::-1]:  # alternate who goes first: no position bias
            if name in once and r > 0:
                continue
            sync(device)
            t0 = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}, memory, flops


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")  # 2nd field: resident pages


def peak_memory(fn, device) -> float:
    """Bytes one call needs above what is held before it (activations, gradients, temporaries; not the weights).

    CUDA: the caching allocator's peak counter. Elsewhere: the process's resident set, sampled every 0.2 ms by a
    thread, peak minus start (ru_maxrss will not do: one high-water mark per process, never reset). Free heap, which
    pick_device tells glibc to keep, is first returned to the OS (malloc_trim), else reusing it would not show as
    growth; still a lower bound."""
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    if not os.path.exists("/proc/self/statm"):
        fn()
        return float("nan")  # not Linux: no cheap RSS reading, the table says n/a
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    base, peak, done = rss_bytes(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(2e-4)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return max(peak[0], rss_bytes()) - base


def table(title: str, header: list[str], rows: list[list]) -> None:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    print(f"\n{title}")
    for row in [header, *rows]:
        print("  " + "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths))))


def mib(b: float) -> str:
    return "n/a" if b != b else f"{b / 2**20:,.0f} MiB"


def matmul_peak(device, dtype) -> float:
    """FLOP/s of a square matmul, best of 10 short timings: a peak is the quietest moment of a noisy machine."""
    n, reps = (8192, 10) if device.type == "cuda" else (2048, 2)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in "ab")
    a @ b  # warm-up
    best = float("inf")
    for _ in range(10):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - t0) / reps)
    print(f"\nmatmul peak: ({n}, {n}) @ ({n}, {n}) in {dtype}: {2 * n**3 / best / 1e9:,.0f} GFLOP/s")
    return 2 * n**3 / best


def memory_bandwidth(device) -> float:
    """Bytes/s that a sum over 512 MiB (1 GiB on CUDA) reads, best of 10: the rate that bounds a decode step and
    the optimizer, which touch every weight once and do little arithmetic per byte."""
    x = torch.ones((2**30 if device.type == "cuda" else 2**29) // 4, device=device)
    best = float("inf")
    for _ in range(10):
        sync(device)
        t0 = time.perf_counter()
        x.sum()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best


def native_dtypes(device, dtype: str = "auto") -> list[torch.dtype]:
    """dtype "auto": bf16 where the hardware multiplies it natively (common.pick_device's test), and always fp32."""
    if dtype != "auto":
        return [getattr(torch, dtype)]
    native = device.type == "cuda" and torch.cuda.is_bf16_supported() or device.type == "cpu" and common.cpu_bf16_flag()
    return [torch.bfloat16, torch.float32] if native else [torch.float32]


# ----------------------------------------------------------------------------------------------------------------
# Models, batches and steps


def build_model(name: str) -> gpt.GPT:
    if name == "small":  # GPT-2's vocabulary, 30M parameters (19M of them wte)
        return gpt.GPT(gpt.GPTConfig(n_layer=6, n_head=6, n_embd=384))
    if name in gpt.PRESETS:  # random weights: no download, and a matmul takes as long whatever the numbers are
        return gpt.GPT(gpt.PRESETS[name])
    return gpt.load_model(name)


def setup(s) -> tuple[torch.device, torch.dtype, gpt.GPT, int]:
    """Device, dtype, the model s.model ("auto": gpt2 on CUDA, small elsewhere) seeded by s.seed, and the rounds
    per race (s.steps, 0: 10 on CUDA, 3 elsewhere); prints what runs where, and a warning on a busy CPU."""
    device, dtype, reason = common.pick_device(s.device, s.dtype)
    cuda = device.type == "cuda"
    name = s.model if s.model != "auto" else ("gpt2" if cuda else "small")
    torch.manual_seed(s.seed)
    model = build_model(name).to(device)
    c = model.config
    print(f"device {device} ({torch.get_num_threads()} CPU threads), {dtype}: {reason}\nmodel {name}: {c.n_layer} "
          f"layers x {c.n_embd} wide, vocab {c.vocab_size}, {model.num_params() / 1e6:.1f}M parameters; torch "
          f"{torch.__version__}, transformers {transformers.__version__ if transformers else 'absent'}")
    if not cuda and os.getloadavg()[0] > 0.5:
        print(f"WARNING: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores before we start: other "
              "processes use the CPU, so absolute numbers can be several times slower and ratios are noisier "
              "(OMP_NUM_THREADS=1 gives steadier, slower numbers)")
    return device, dtype, model, s.steps or (10 if cuda else 3)


def make_batch(rows: int, T: int, V: int, device, seed: int, pairs: bool = False) -> dict[str, torch.Tensor]:
    """Random tokens in data.pad_rows's layout, no padding; the first half of each row is prompt (no loss there).
    pairs=True: row i and row rows/2 + i share their prompt, as chosen and rejected do in data.preference_batch."""
    seq = torch.randint(V, (rows, T + 1), generator=torch.Generator().manual_seed(seed))
    if pairs:
        seq[rows // 2 :, : T // 2] = seq[: rows // 2, : T // 2]
    mask = torch.zeros(rows, T, dtype=torch.bool)
    mask[:, T // 2 - 1 :] = True  # target t is seq[t + 1]: the first response token is the target at T/2 - 1
    return common.to_device({"input_ids": seq[:, :-1], "target_ids": seq[:, 1:], "loss_mask": mask}, device)


def train_step(model, loss_fn, batch, device, dtype):
    """Forward + backward. No optimizer step: it costs the same whichever model code computed the gradients."""
    def step():
        model.train()
        with common.autocast(device, dtype):
            losses, _ = loss_fn(model, batch)
        losses.sum().backward()
        model.zero_grad(set_to_none=True)  # so every step starts from the weights alone: memory counts gradients
    return step


def step_table(title: str, fns: dict, model_flops: dict, tokens: int, peak: float, repeats: int, device):
    """Race training steps; print ms, tokens/s, MFU (model_flops[name] / time / peak), HFU and memory."""
    times, memory, flops = race(fns, repeats, device)
    mfu = {name: model_flops[name] / t / peak for name, t in times.items()}
    table(f"{title}, forward + backward, median of {repeats}",
          ["", "ms/step", "tokens/s", "MFU (6N)", "HFU (counted)", "peak memory"],
          [[name, f"{1e3 * t:,.0f}", f"{tokens / t:,.0f}", f"{mfu[name]:.1%}", f"{flops[name] / t / peak:.1%}",
            mib(memory[name])] for name, t in times.items()])
    print("  peak memory: " + ("CUDA allocator peak above the start of the step" if device.type == "cuda" else
                               "peak RSS growth during the step, sampled (a lower bound)"))
    return times, memory, mfu


def summary(lines: list[str], start: float) -> None:
    print("\nsummary:\n" + "".join(f"  {line}\n" for line in lines) + f"took {(time.time() - start) / 60:.1f} min")


# ----------------------------------------------------------------------------------------------------------------
# The alternatives ours is raced against


class Theirs(torch.nn.Module):
    """transformers' GPT2LMHeadModel behind our forward's signature, so sft.sequence_logps runs on it unchanged. It
    computes logits at every position (B, T, V) and `select` can only pick rows afterwards: the difference we time."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, idx, select=None, targets=None):
        logits = self.hf(idx, use_cache=False).logits  # no KV cache in training: it would only cost time
        logits = logits if select is None else logits[select]
        return logits if targets is None else -F.cross_entropy(logits.float(), targets, reduction="none")


def to_transformers(model: gpt.GPT, device) -> Theirs:
    """GPT2LMHeadModel with our weights; ours_to_hf writes the hub layout (Conv1D weights transposed)."""
    c = model.config
    cfg = transformers.GPT2Config(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, vocab_size=c.vocab_size,
                                  n_positions=c.block_size, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = transformers.GPT2LMHeadModel(cfg)
    result = hf.transformer.load_state_dict(gpt.ours_to_hf(model), strict=False)
    bad = [k for k in result.missing_keys if not k.endswith((".attn.bias", ".attn.masked_bias"))]  # old mask buffers
    assert not bad and not result.unexpected_keys, f"missing {bad}, unexpected {result.unexpected_keys}"
    hf.generation_config.eos_token_id = None  # always max_new_tokens, as eos_id=-1 in ours
    hf.generation_config.pad_token_id = gpt.EOT
    return Theirs(hf.to(device))


@torch.no_grad()
def naive_generate(model, idx, new_tokens: int):
    """Greedy decoding without a cache: each token re-runs the whole sequence, O(T^2) work where the cache does O(T)."""
    for _ in range(new_tokens):
        last = torch.zeros_like(idx, dtype=torch.bool)
        last[:, -1] = True  # logits at the last position only, as generate does: the cache is the only difference
        idx = torch.cat([idx, model(idx, select=last).argmax(-1)[:, None]], dim=1)
    return idx[:, -new_tokens:]


def head_swapped(fn):
    """GPT.forward's training head, vocab_head.response_logprobs(hidden, weight, targets), replaced by fn in a with block."""
    return mock.patch.object(vocab_head, "response_logprobs", fn)


def plain_head(hidden, weight, targets):
    """The head before vocab_head.py: all N rows of fp32 logits at once and autograd's log-softmax, three (N, V) tensors."""
    with torch.autocast(hidden.device.type, enabled=False):
        return -F.cross_entropy(F.linear(hidden.float(), weight.float()), targets, reduction="none")


def low_precision_head(hidden, weight, targets):
    """The projection in the autocast dtype (rounded logits: what transformers and TRL compute), then fp32."""
    return -F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="none")


if __name__ == "__main__":
    device, _, reason = common.pick_device()
    print(f"device {device} ({torch.get_num_threads()} CPU threads): {reason}")
    for dtype in native_dtypes(device):
        matmul_peak(device, dtype)
    print(f"memory bandwidth: {memory_bandwidth(device) / 1e9:.1f} GB/s (read)")
