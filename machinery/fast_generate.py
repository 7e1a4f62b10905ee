"""Fast sampling: the tokens of model.GPT.generate, sooner. judge.py samples through `generate` here.

    python -m bench.decode                 # times the decode step: ours vs model.generate and transformers.generate

What it speeds up, and by how much (gpt2, 8 prompts x 64 tokens, 64 new tokens, 2-core Zen 5 CPU, one run of the
command above; README "Speed"): the decode step takes 23.4 ms in bf16 and 33.9 ms in fp32 through here, 57.5 and
76.9 ms through the plain model.generate (2.5x and 2.3x), against transformers.generate's 39.0 and 87.3 ms. How:
  1. Prepared weights. For the length of one call each Linear's weight is cast once to the dtype its products run
     in (autocast would cast it again at every product), the vocabulary head once to fp32, and on CPU each is
     packed into oneDNN's blocked layout for the batch's row count. Given a plain weight, the CPU matmul re-lays it
     out at every product, which for a decode step's few rows costs more than the multiply.
  2. An fp32 KV cache on CPU, where attention for one query per row runs ~3x faster than over a bf16 cache.
  3. compiled=True (judge.py --compile=true): the decode step through torch.compile over a cache whose shapes never
     change, on CUDA replayed as one CUDA graph instead of ~300 kernel launches per token. On CPU it is slower than
     (1) and only tested; its GPU speed is for `make gpu-check` to measure.

Every path gives the plain generate's tokens (tests/machinery/test_fast_generate.py). This file uses private
PyTorch APIs on purpose (torch.ops.mkldnn for the packed matmul, torch._dynamo for static addresses): that is why it
is not model.py.
"""

import contextlib
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from machinery import common


def model_module(net):
    """The module that defines `net`'s class (model.py): its KVCache, EOT and decoding helpers are read from the
    network passed in, never imported, so that this layer below the lesson files does not reach up into them."""
    return sys.modules[type(net).__module__]


def prepare_linear(weight, bias, dtype: torch.dtype, rows: int, pack: bool):
    """(y = x W^T + b with W and b cast to `dtype` once and, with pack=True, W in the oneDNN layout for products of
    `rows` rows; the prepared tensors)."""
    w, b = weight.detach().to(dtype), None if bias is None else bias.detach().to(dtype)
    if pack:  # oneDNN's packed layout has its own matmul op (the one torch.compile's CPU backend emits)
        w = torch.ops.mkldnn._reorder_linear_weight(w, rows)
        return (lambda x: torch.ops.mkldnn._linear_pointwise(x.to(w.dtype), w, b, "none", [], "")), (w, b)
    return (lambda x: F.linear(x.to(w.dtype), w, b)), (w, b)


@contextlib.contextmanager
def prepared(net, dtype: torch.dtype, rows: int, pack: bool = True):
    """Within this block every Linear of `net` multiplies by its weight prepared once (see prepare_linear): cast to
    `dtype`, the dtype the products run in (bf16 under autocast or for a bf16 model); the vocabulary head cast to
    fp32 (GPT.logits says why); on CPU, unless pack=False (torch.compile cannot trace a packed weight), packed for
    `rows` rows. Instance attributes shadow each Linear's forward and GPT.logits, and are removed on the way out,
    also after an error: training never sees a stale, detached weight. Yields the prepared tensors."""
    cpu = pack and net.lm_head.weight.device.type == "cpu" and torch.backends.mkldnn.is_available()
    native = {torch.float32: cpu, torch.bfloat16: cpu and common.cpu_bf16_flag() is not None}  # oneDNN runs these
    linears = [m for m in net.modules() if isinstance(m, nn.Linear) and m is not net.lm_head]
    tensors = []
    try:
        for m in linears:
            m.forward, held = prepare_linear(m.weight, m.bias, dtype, rows, native.get(dtype, False))
            tensors += held
        head, held = prepare_linear(net.lm_head.weight, None, torch.float32, rows, native[torch.float32])
        tensors += held

        def logits(x):  # GPT.logits with the fp32 head prepared once, outside any autocast
            with torch.autocast(x.device.type, enabled=False):
                return head(x)

        net.logits = logits
        yield [t for t in tensors if t is not None]
    finally:
        for m in linears:
            m.__dict__.pop("forward", None)
        net.__dict__.pop("logits", None)


@torch.no_grad()
def generate(net, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None, stop: tuple[str, ...] = (),
             decode=None, generator: torch.Generator | None = None, num_samples: int = 1,
             compiled: bool = False) -> list[list[int]]:
    """net.generate(...)'s answers, with the weights prepared for the call and, on CPU, an fp32 KV cache;
    compiled=True decodes through `compiled_generate` instead. eos_id: default, the model's <|endoftext|>."""
    device = net.wte.weight.device
    eos_id = model_module(net).EOT if eos_id is None else eos_id
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else net.wte.weight.dtype
    cache_dtype = torch.float32 if device.type == "cpu" else dtype
    kwargs = dict(temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id, stop=stop, decode=decode,
                  generator=generator, num_samples=num_samples, cache_dtype=cache_dtype)
    with prepared(net, dtype, len(prompts) * num_samples, pack=not compiled) as weights:
        if compiled:
            return compiled_generate(net, weights, prompts, max_new_tokens, **kwargs)
        return net.generate(prompts, max_new_tokens, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# compiled=True: one decode step with fixed shapes, compiled once per batch size and cache length


class StaticKVCache:
    """model.KVCache with shapes that never change: written in place at a position tensor (index_copy_), and
    attention reads all its S positions at every step (the mask hides those not yet written), so a compiled step
    runs the same kernels at every token and does not recompile per position. It keeps the model's own cache (the
    same buffers, (B, nh, S, hs) per layer, and its `select`) and replaces only how a step writes into it."""

    def __init__(self, cache):
        self.cache = cache
        self.pos = torch.zeros(1, dtype=torch.long, device=cache.k[0].device)  # GPT.forward advances it in place

    k = property(lambda self: self.cache.k)
    v = property(lambda self: self.cache.v)

    def select(self, rows):
        self.cache.select(rows)

    def update(self, layer: int, k, v):
        where = self.pos + torch.arange(k.shape[2], device=k.device)  # (T,) positions of this call's tokens
        return (self.k[layer].index_copy_(2, where, k.to(self.k[layer].dtype)),
                self.v[layer].index_copy_(2, where, v.to(self.v[layer].dtype)))


def compile_step(net, cache: StaticKVCache, weights: list[torch.Tensor]):
    """net through torch.compile ("reduce-overhead", i.e. CUDA graphs, on CUDA). The tensors the step reads or
    updates in place (the cache, the prepared weights) are marked as fixed addresses without a guard, so the next
    generate call, with new ones, re-records the graph instead of recompiling."""
    for t in [*cache.k, *cache.v, cache.pos, *weights]:
        torch._dynamo.mark_static_address(t, guard=False)
    cuda = cache.pos.device.type == "cuda"
    return torch.compile(net, mode="reduce-overhead" if cuda else "default", dynamic=False, fullgraph=True)


def compiled_generate(net, weights: list[torch.Tensor], prompts: list[list[int]], max_new_tokens: int,
                      temperature, top_k, top_p, eos_id, stop, decode, generator, num_samples,
                      cache_dtype) -> list[list[int]]:
    """GPT.generate's loop with fixed shapes: ended rows stay in the batch (their tokens are ignored), every step
    attends over the whole cache, and the cache length is rounded up to a multiple of 128 so that few shapes, and
    few compiles, ever occur. The uniform draws are generate's, so the same seed gives the same answers."""
    device, gpt = net.wte.weight.device, model_module(net)
    B, P = len(prompts), max(len(p) for p in prompts)
    if P + max_new_tokens > net.config.block_size:
        raise ValueError(f"prompt ({P}) + max_new_tokens ({max_new_tokens}) > block_size {net.config.block_size}")
    S = min(-(-(P + max_new_tokens) // 128) * 128, net.config.block_size)
    idx, mask = gpt.left_pad(prompts, S, device)  # (B, P), (B, S)
    cache = StaticKVCache(gpt.KVCache(net.config, B, S, device, cache_dtype))
    last = torch.zeros((B, P), dtype=torch.bool, device=device)
    last[:, -1] = True
    logits = net(idx, attention_mask=mask, cache=cache, select=last)  # prefill, eager: (B, V)
    if num_samples > 1:
        cache.select(torch.arange(B, device=device).repeat_interleave(num_samples))
        mask, logits = mask.repeat_interleave(num_samples, 0), logits.repeat_interleave(num_samples, 0)
        B = B * num_samples
    step = compile_step(net, cache, weights)
    out, rows = [[] for _ in range(B)], list(range(B))
    for t in range(max_new_tokens):
        u = 1.0 - torch.rand((B, 1), generator=generator, device=device)  # (0, 1], one per answer as in generate
        nxt = gpt.sample_next(logits, temperature, top_k, top_p, u=u)  # (B,)
        if not gpt.take_tokens(out, rows, nxt.tolist(), eos_id, stop, decode) or t == max_new_tokens - 1:
            break
        mask[:, P + t] = True
        logits = step(nxt[:, None], attention_mask=mask, cache=cache)[:, -1]  # (B, V)
    return out
