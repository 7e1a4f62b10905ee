"""GPT-2 from scratch: the network, sampling with a KV cache, and its weights in the safetensors format.

    python model.py --model=gpt2 --prompt="Hello, I am"      # download GPT-2 small and sample from it

The GPT-2 network (Radford et al. 2019), in the layout of nanoGPT:

    tokens (B, T) ──> wte + wpe ──> [ Block ] x n_layer ──> ln_f ──> lm_head (= wte^T) ──> logits (B, T, V)
    Block:  x = x + attn(ln_1(x))      causal multi-head self-attention (pre-LayerNorm)
            x = x + mlp(ln_2(x))       Linear(d, 4d) -> GELU(tanh) -> Linear(4d, d)

Reading order: the layers, the KV cache, `GPT` (logits for every position, or for the few a loss needs) and its
`generate` (batched, left-padded, KV-cached sampling), then loading the hub's weights: the key map, our checkpoints.

It leans on the machinery package below it: common.py (downloads, device, settings, atomic directory swaps, content
hashes), safetensors_file.py (the file format, by hand) and vocab_head.py (training's exact log-probs in bounded
memory). machinery/fast_generate.py is the fast way to call `generate` (weights cast and packed once per call, the
decode step compiled): sampling.py samples through it; tests/machinery/test_fast_generate.py checks it gives
generate's tokens.
"""

import dataclasses
import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from machinery import common, transformers_files, vocab_head
from machinery.safetensors_file import read_safetensors, write_safetensors

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


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int = 0):
        super().__init__()
        self.n_head, self.n_embd, self.dropout, self.layer = config.n_head, config.n_embd, config.dropout, layer
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x, mask=None, cache=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:  # generation: this step's keys and values join the cached ones, (B, nh, S, hs)
            k, v = cache.update(self.layer, k, v)
        # softmax(q k^T / sqrt(hs)) v; with no mask the kernel applies the causal mask itself (flash path on GPU).
        # q, k, v are already in the dtype to use (under autocast, the projection's), or the cache's.
        dropout = self.dropout if self.training else 0.0
        with torch.autocast(x.device.type, enabled=False):
            y = F.scaled_dot_product_attention(q.to(k.dtype), k, v, attn_mask=mask, is_causal=mask is None,
                                               dropout_p=dropout).to(q.dtype)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # GPT-2 was trained with the tanh GELU


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int = 0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, mask=None, cache=None):
        x = x + self.drop(self.attn(self.ln_1(x), mask, cache))
        return x + self.drop(self.mlp(self.ln_2(x)))


class KVCache:
    """The keys and values of every layer at every position so far, allocated once per generate call. Without it
    each new token re-runs the whole sequence; with it a step computes only the new token's q, k, v (O(S), not S^2)."""

    def __init__(self, config: GPTConfig, batch: int, max_len: int, device, dtype):
        shape = (batch, config.n_head, max_len, config.n_embd // config.n_head)  # per layer (B, nh, S, hs)
        # zeros until written: those positions are masked, but 0 * NaN in uninitialised memory would still be NaN
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.pos = 0  # positions filled so far; GPT.forward advances it after the last layer

    def update(self, layer: int, k, v):
        """Store this call's keys and values (B, nh, T, hs) after the filled ones -> all of them so far (B, nh, S, hs)."""
        end = self.pos + k.shape[2]
        self.k[layer][:, :, self.pos : end], self.v[layer][:, :, self.pos : end] = k, v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def select(self, rows):
        """Keep these batch rows, in this order (an index may repeat: a prompt's cache copied to its N samples)."""
        self.k, self.v = [k[rows] for k in self.k], [v[rows] for v in self.v]


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token embeddings
        self.wpe = nn.Embedding(config.block_size, config.n_embd)  # learned position embeddings
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
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
        """A hub preset ("gpt2" ... "gpt2-xl", downloaded), "tiny", a .safetensors file or a directory: load_model."""
        return load_model(name_or_path)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied lm_head counted once; wpe included, as HF does

    # machinery/checkpoints.py saves and restores any model through these two (reward.py's has its own)
    def save(self, directory: Path, meta: dict | None = None, state_dict: dict | None = None) -> None:
        save_model(self, directory, meta, state_dict)

    def load(self, directory: Path) -> dict:
        return load_model(str(directory)).state_dict()

    def forward(self, idx, attention_mask=None, cache: KVCache | None = None, select=None, hidden: bool = False,
                targets=None):
        """idx (B, T) token ids -> logits (B, T, V) for every position, or (N, V) for the N positions where the
        bool mask `select` (B, T) is True: the vocabulary projection is the largest matmul of a small GPT-2 (and its
        (B, T, 50257) output the largest tensor), so training computes it only where a loss needs it. Or, given
        targets (N,), log pi(target) at those positions, (N,) fp32, exactly and in bounded memory (vocab_head.py);
        or with hidden=True, the final hidden states (after ln_f), on which a reward model puts its own head.
        Training passes idx, select and targets (right-padded batches need no mask: causal attention never looks
        right). Generation passes a KV cache (its first `cache.pos` positions filled, this call's T tokens next) and
        attention_mask (B, S), True at the real tokens of the left-padded rows among the S positions attended."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
        # positions of these T tokens in the sequence (and the cache): after the cached ones, if any
        where = torch.arange(T, device=idx.device) + (cache.pos if cache is not None else 0)  # (T,)
        mask, pos = None, where  # (T,): without a mask, every row's positions are the same
        if attention_mask is not None:
            # Left padding shifts each row, so a row's positions count its real tokens: 0, 1, 2, ...
            pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0).index_select(1, where)  # (B, T)
            key = torch.arange(attention_mask.shape[1], device=idx.device)  # key positions (S,)
            # attend to real keys at or before the query; a padding query attends to itself so no row is empty
            mask = (attention_mask[:, None, None, :] & (key <= where[:, None])) | (key == where[:, None])  # (B,1,T,S)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for block in self.h:
            if self.config.grad_checkpoint and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, mask, cache, use_reentrant=False)
            else:
                x = block(x, mask, cache)
        if cache is not None:
            cache.pos += T
        x = self.ln_f(x if select is None else x[select])  # (B, T, C) or (N, C)
        if targets is not None:
            return vocab_head.response_logprobs(x, self.lm_head.weight, targets)  # (N,)
        return x if hidden else self.logits(x)  # (B, T, V) or (N, V)

    def logits(self, x):
        """Final hidden states (..., C) -> logits (..., V), always in fp32, outside any autocast. GPT-2's logits are
        large (tens to ~100), where bf16 can only represent steps of 0.25-0.5: bf16 logits put ~0.1 nat of error
        into every token's log-prob, a nat or more over a response, which beta = 0.1 turns into reward noise the
        size of DPO's early signal. An fp32 hidden state and weight keep the log-probs, and the softmax that
        samples, exact to fp32; `select=` limits the cost to the rows needed."""
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), self.lm_head.weight.float())

    # ------------------------------------------------------------------------------------------------------------
    # 2. Generation

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, eos_id: int = EOT,
                 stop: tuple[str, ...] = (), decode=None, generator: torch.Generator | None = None,
                 num_samples: int = 1, cache_dtype: torch.dtype | None = None, stream=None) -> list[list[int]]:
        """Sample continuations of a batch of token-id prompts; returns only the new tokens of each.

        Prompts of different lengths are LEFT-padded so that every row's next token sits in the same column:

            [pad pad  p0  p1  p2 | n0 n1 ...]      attention_mask = [0 0 1 1 1 | 1 1 ...]
            [ p0  p1  p2  p3  p4 | n0 n1 ...]                       [1 1 1 1 1 | 1 1 ...]

        The mask hides the padding and positions restart at 0 on each row's first real token (forward), so a row
        comes out as if generated alone. One pass over the prompts fills the KV cache (prefill), then each step
        feeds one token per row. A row ends at `eos_id` (not returned) or at a stop string (cut off), and leaves
        the batch. num_samples > 1 draws n answers per prompt (Best of N) from one prefill, copied: prompt i's are
        rows i*n ... i*n + n - 1. temperature 0 is greedy. cache_dtype: default, the compute dtype. stream(answers),
        if given, sees the answers so far after every step (chat.py prints them as they come)."""
        self.eval()
        device = self.wte.weight.device
        if num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {num_samples}")
        B, P = len(prompts), max(len(p) for p in prompts)
        if P + max_new_tokens > self.config.block_size:
            raise ValueError(f"prompt ({P}) + max_new_tokens ({max_new_tokens}) > block_size {self.config.block_size}")
        idx, mask = left_pad(prompts, P + max_new_tokens, device)  # (B, P), (B, P + max_new_tokens)
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else self.wte.weight.dtype
        cache = KVCache(self.config, B, P + max_new_tokens, device, cache_dtype or dtype)
        last = torch.zeros((B, P), dtype=torch.bool, device=device)
        last[:, -1] = True  # only the last position's logits are needed
        logits = self(idx, attention_mask=mask[:, :P], cache=cache, select=last)  # prefill: (B, V)
        if num_samples > 1:  # a prompt's keys and values are the same for all its samples: copied, not recomputed
            cache.select(torch.arange(B, device=device).repeat_interleave(num_samples))
            mask, logits = mask.repeat_interleave(num_samples, 0), logits.repeat_interleave(num_samples, 0)
            B = B * num_samples
        out = [[] for _ in range(B)]
        rows = list(range(B))  # which answer each row of the batch holds
        for t in range(max_new_tokens):
            # one uniform draw per answer, ended or not: an answer's draws never depend on when others end
            u = 1.0 - torch.rand((B, 1), generator=generator, device=device)  # (0, 1]
            nxt = sample_next(logits, temperature, top_k, top_p, u=u[rows])  # (b,) for the b rows
            live = take_tokens(out, rows, nxt.tolist(), eos_id, stop, decode)
            if stream is not None:
                stream(out)
            if not live or t == max_new_tokens - 1:
                break
            if len(live) < len(rows):  # drop ended rows: answers vary in length, the batch need not wait
                keep = torch.tensor(live, device=device)
                cache.select(keep)
                mask, nxt, rows = mask[keep], nxt[keep], [rows[j] for j in live]
            mask[:, P + t] = True
            logits = self(nxt[:, None], attention_mask=mask[:, : P + t + 1], cache=cache)[:, -1]  # (b, V)
        return out


def left_pad(prompts: list[list[int]], length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id prompts -> idx (B, P), right-aligned (P: the longest), and mask (B, length), True at prompt tokens."""
    B, P = len(prompts), max(len(p) for p in prompts)
    idx = torch.zeros((B, P), dtype=torch.long, device=device)  # padding id is irrelevant: it is masked
    mask = torch.zeros((B, length), dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        idx[i, P - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, P - len(p) : P] = True
    return idx, mask


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


def take_tokens(out: list[list[int]], rows: list, tokens: list[int], eos_id: int, stop: tuple[str, ...], decode):
    """A step's sampled token for each batch row j, appended to its answer out[rows[j]]. A row whose answer ends
    (at eos_id, or at a stop string, cut off with what follows) gets None in `rows`. Returns the rows still going."""
    for j, token in enumerate(tokens):
        i = rows[j]
        if i is None:
            continue
        if token == eos_id:
            rows[j] = None
            continue
        out[i].append(token)
        # stop strings: only the last few tokens can complete one, so decode just those
        if stop and any(s in decode(out[i][-2 * max(map(len, stop)) :]) for s in stop):
            out[i], rows[j] = cut_at_stop(out[i], stop, decode), None
    return [j for j, i in enumerate(rows) if i is not None]


def cut_at_stop(tokens: list[int], stop: tuple[str, ...], decode) -> list[int]:
    """Drop the stop string and what follows; tokens are cut at the last boundary before the stop text."""
    text = decode(tokens)
    at, k = min(text.find(s) for s in stop if s in text), len(tokens)
    while k and len(decode(tokens[:k])) > at:
        k -= 1
    return tokens[:k]


# ----------------------------------------------------------------------------------------------------------------
# 3. Loading Hugging Face GPT-2 weights and our checkpoints
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
        if key.endswith((".attn.bias", ".attn.masked_bias")) or key == "score.weight":  # score: a reward head
            continue
        sd[key] = t.t() if key.endswith(CONV1D) else t
    lm_head = sd.pop("lm_head.weight", None)
    if lm_head is not None and "wte.weight" in sd and not torch.equal(lm_head, sd["wte.weight"]):
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


def weights_file(path) -> Path:
    """The weights of a checkpoint directory (its model.safetensors), or the .safetensors file given."""
    return Path(path) / "model.safetensors" if Path(path).is_dir() else Path(path)


def weights_id(name_or_path: str) -> str:
    """What identifies a model's weights, for every cache that depends on them: "preset:<name>" for a preset (hub
    weights are fixed; "tiny" is a random init seeded by --seed), else "sha256:<16 hex>" of the weights' content
    (common.content_id): retraining into the same path must never bring back results of the old weights."""
    return f"preset:{name_or_path}" if name_or_path in PRESETS else common.content_id(weights_file(name_or_path))


def load_model(name_or_path: str) -> GPT:
    """A hub preset name ("gpt2", ...) downloads; "tiny" is a random init; otherwise a local file or directory."""
    if name_or_path in HUB_MODELS:
        url = common.hf_url(f"openai-community/{name_or_path}/resolve/main/model.safetensors")
        path = common.download(url, common.cache_dir() / "models" / name_or_path / "model.safetensors")
    elif name_or_path in PRESETS:
        return GPT(PRESETS[name_or_path])
    else:
        path = weights_file(name_or_path)
        if not path.exists():
            raise FileNotFoundError(f"no model at {path}: give a preset ({', '.join(PRESETS)}), a .safetensors "
                                    "file or a directory holding model.safetensors")
    sd = hf_to_ours(read_safetensors(path)[0], path)
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


def save_model(model: GPT, directory: Path, meta: dict | None = None, state_dict: dict | None = None,
               score=None) -> None:
    """Write model.safetensors (hub layout), config.json and the tokenizer's files into `directory`, atomically, so
    that transformers opens it as it is (machinery/transformers_files.py). `state_dict`: the weights to write instead
    of model.state_dict() (a sharded model's, gathered whole); `score`: a reward model's head (1, C) (reward.py)."""
    with common.new_dir(directory) as tmp:
        hf = ours_to_hf(model, state_dict) | ({} if score is None else {"score.weight": score})
        write_safetensors(tmp / "model.safetensors", hf, {"format": "pt"})
        ours = dataclasses.asdict(model.config)  # GPT2Config's keys first, ours beside them: we read "model"
        config = transformers_files.gpt2_config(ours, score is not None) | {"model": ours, "meta": meta or {}}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        transformers_files.write_tokenizer_files(tmp)


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
    s = common.parse_settings(Settings)
    device, _, _ = common.pick_device(s.device)
    enc = common.get_tokenizer()
    gpt = load_model(s.model).to(device)
    gen = torch.Generator(device).manual_seed(s.seed)
    out = gpt.generate([enc.encode(s.prompt)], s.max_new_tokens, s.temperature, top_p=s.top_p,
                       stop=("\n\nHuman:",), decode=enc.decode, generator=gen)
    print(s.prompt + enc.decode(out[0]))
