"""The vocabulary head for training: exact log-probs of the response tokens, in bounded memory, at bf16 speed on GPUs.

    python -m machinery.vocab_head   # the error table below, measured
    python -m bench.head_memory      # peak memory of a gpt2 DPO step, plain vs chunked head; the head's GPU share

Every log-prob that DPO, SFT and the scorers use is log pi(y_t | ...) = z[y_t] - logsumexp(z), with z = h W^T the
logits of one response position: h (C,) the final hidden state, W (V, C) the head (tied to the embeddings).

Precision. GPT-2's logits are large (tens to ~100), where bf16 rounds to steps of 0.25-0.5. The error of a
log-prob summed over 128 positions, against fp64, on hidden states and a head with GPT-2's logit sizes (`python -m
machinery.vocab_head` measures it; one dominant hidden dimension, as GPT-2's final hidden states have):

    z = h W^T computed as                                                   error (nat)
    fp32 matmul (what we use on CPUs, and on GPUs without out_dtype)         0.0003
    bf16 inputs, fp32 accumulate and output                                  0.31
    TF32 inputs                                                              0.15
    split bf16: h = h_hi + h_lo, W = W_hi + W_lo (each part bf16),           0.0024
        z = h_hi W_hi^T + h_hi W_lo^T + h_lo W_hi^T, fp32 accumulate and out

A GPU runs the split product as three bf16 tensor-core matmuls with fp32 output (torch.mm(..., out_dtype=fp32)):
on paper 3/16 of the time of one fp32 matmul on an A100 (3 products at 312 vs one at 19.5 TFLOP/s), about 1/5
on an H100 (989 vs 67). The dropped
term h_lo W_lo^T is ~2^-16 of z. The backward's products (gradients, not log-probs) run in plain bf16 there, as the
rest of a bf16 step does.

Memory. The plain way materialises the logits of all N response positions, their log-softmax and its gradient:
three (N, V) fp32 tensors, 3 x 4 x 2,048 x 50,257 bytes = 1.2 GB for a DPO micro-batch of 4 pairs x 512 tokens (half
of them response). Here rows go through in chunks of CHUNK_ROWS: a chunk's logits live only while its log-probs are
taken, and backward computes them again, keeping between the passes only h, one logsumexp per row, the last
chunk's logits, and as many others as KEEP_BYTES allows. On a GPU that is none: memory is what is short there, and
the split products are cheap, so at most two (CHUNK_ROWS, V) fp32 tensors exist at a time, 2 x 4 x 512 x 50,257
bytes = 206 MB, whatever N is; the price is one more head product for every chunk but the last (4 instead of 3).
On a CPU, where memory is plentiful and an fp32 product is the step's largest cost, up to 1 GiB of logits is kept
(all of them for the demo and for 4 pairs x 512 tokens): bounded still, and no slower than the plain way.

Tests (tests/machinery/test_vocab_head.py): log-probs and gradients equal the plain unchunked fp32 computation, for
chunk sizes that do and do not divide N; the split product, emulated on CPU, stays within 0.05 nat per sequence
where bf16 does not. On a GPU, `make gpu-check` times the three products and measures the split one's error there.
"""

import functools

import torch

CHUNK_ROWS = 512  # response positions per chunk: (512, 50257) fp32 logits are 103 MB
KEEP_BYTES = {"cuda": 0, "cpu": 2**30}  # chunks of logits forward may keep for backward, beside the last (see above)


def split_bf16(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (hi, lo), both bf16, with hi + lo = x to about 16 bits of mantissa (bf16 alone keeps 8)."""
    hi = x.float().to(torch.bfloat16)
    return hi, (x.float() - hi.float()).to(torch.bfloat16)


def split_product(h: torch.Tensor, w_parts: tuple[torch.Tensor, torch.Tensor], mm) -> torch.Tensor:
    """z = h W^T (n, V), fp32, from bf16 parts: h_hi W_hi^T + h_hi W_lo^T + h_lo W_hi^T. mm(a, b) = a b^T in fp32 from
    bf16 inputs: torch.mm with out_dtype on CUDA (cuda_mm); the tests emulate it on CPU."""
    (h_hi, h_lo), (w_hi, w_lo) = split_bf16(h), w_parts
    return (mm(w_hi, h_hi) + mm(w_lo, h_hi) + mm(w_hi, h_lo)).t()  # computed as (W h^T)^T, as `project` does


def cuda_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.mm(a, b.t(), out_dtype=torch.float32)


@functools.cache
def has_out_dtype(device: torch.device) -> bool:
    """Whether torch.mm takes out_dtype (bf16 in, fp32 out) on this device: CUDA in recent PyTorch, not the CPU."""
    if device.type != "cuda":
        return False
    try:
        a = torch.ones(16, 16, device=device, dtype=torch.bfloat16)
        return cuda_mm(a, a).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError, AssertionError) as e:  # AssertionError: a CPU-only torch
        print(f"vocab_head.py: no bf16-in, fp32-out torch.mm on {device} (torch {torch.__version__}: {e}); the vocabulary "
              "head runs in fp32 there, exact but without tensor cores")
        return False


def project(h: torch.Tensor, w, split: bool) -> torch.Tensor:
    """Logits z = h W^T, (n, V) fp32: w is W in fp32, or its bf16 parts with split=True. Computed as (W h^T)^T, a
    transposed view: the CPU matmul runs that orientation ~1.4x faster than h W^T at these shapes
    (python -m bench.head_memory)."""
    return split_product(h, w, cuda_mm) if split else (w @ h.float().t()).t()


class ResponseLogprobs(torch.autograd.Function):
    """log_softmax(h W^T)[targets], chunk by chunk. Backward goes through the chunks in reverse and computes their
    logits again, except the last chunk's and any others forward kept within KEEP_BYTES."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, split: bool):
        w = split_bf16(weight) if split else weight.float()  # W's bf16 parts are made once per call
        logps = torch.empty(len(targets), dtype=torch.float32, device=hidden.device)  # (N,)
        lse = torch.empty_like(logps)  # (N,) logsumexp of each row's logits: what backward needs besides h and W
        budget, ctx.kept = KEEP_BYTES.get(hidden.device.type, 0), {}  # chunk start -> its logits, for backward
        for i in range(0, len(targets), chunk):
            z = project(hidden[i : i + chunk], w, split)  # (n, V)
            lse[i : i + chunk] = z.logsumexp(-1)
            logps[i : i + chunk] = z.gather(1, targets[i : i + chunk, None])[:, 0] - lse[i : i + chunk]
            if 4 * z.numel() * (len(ctx.kept) + 1) <= budget:
                ctx.kept[i] = z
        ctx.kept[i] = z  # the last chunk's logits are at hand when backward starts
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk, ctx.split, ctx.w = chunk, split, w
        return logps

    @staticmethod
    def backward(ctx, grad):  # grad (N,): dL/dlogp of each row
        hidden, weight, targets, lse = ctx.saved_tensors
        # d logp / dz = onehot(target) - softmax(z); z = h W^T, so dL/dh = g W and dL/dW = g^T h, with g (n, V).
        # On a GPU (split) g's products run in bf16, as autocast runs the rest of the step's backward.
        low = torch.bfloat16 if ctx.split else torch.float32
        w = weight.to(low)
        grad_hidden = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)  # (N, C)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)  # (V, C)
        for i in reversed(range(0, len(targets), ctx.chunk)):
            rows, go = slice(i, i + ctx.chunk), grad[i : i + ctx.chunk, None]  # go (n, 1)
            z = ctx.kept.pop(i, None)  # kept by forward (and freed once used), or computed again
            z = project(hidden[rows], ctx.w, ctx.split) if z is None else z  # (n, V)
            g = (z - lse[rows, None]).exp_().mul_(-go)  # -softmax(z) dL/dlogp
            g = g.scatter_add_(1, targets[rows, None], go).to(low)  # + onehot(target) dL/dlogp
            grad_hidden[rows] = g @ w
            if ctx.split:
                grad_weight += cuda_mm(g.t(), hidden[rows].to(low).t())
            else:
                grad_weight.addmm_(g.t(), hidden[rows].float())  # accumulated in place: no (V, C) temporary
        ctx.w = None
        return grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype), None, None, None


def response_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                      chunk: int = CHUNK_ROWS) -> torch.Tensor:
    """log pi(target | ...) at each of N positions, fp32 (N,): hidden (N, C), the final hidden states (after ln_f);
    weight (V, C), the head; targets (N,) token ids. The split-bf16 product on CUDA under bf16 autocast, where torch
    has it (has_out_dtype); the fp32 product elsewhere. Autocast itself is off inside: the head sets its precision."""
    device = hidden.device.type
    split = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.bfloat16 and \
        has_out_dtype(hidden.device)
    with torch.autocast(device, enabled=False):
        return ResponseLogprobs.apply(hidden, weight, targets, chunk, split)


# ----------------------------------------------------------------------------------------------------------------
# The error table, measured


def gpt2_sized(rows: int, seed: int = 0, device="cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden (rows, 768), head (50257, 768), targets (rows,)) with GPT-2's logit sizes: logits around -93 with a
    spread of ~6 per row, set by one dominant hidden dimension (~-300, as GPT-2's final hidden states have one) times
    a head column near 0.31; targets drawn from the softmax, so each is a token the model finds likely."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(50257, 768, generator=g) * 0.1
    weight[:, 0] = 0.31 + 0.02 * torch.randn(50257, generator=g)
    hidden = torch.randn(rows, 768, generator=g)
    hidden[:, 0] = -300 + torch.randn(rows, generator=g)
    probs = (hidden.double() @ weight.double().t()).softmax(-1)
    targets = torch.multinomial(probs.float(), 1, generator=g)[:, 0]
    return hidden.to(device), weight.to(device), targets.to(device)


def summed_error(logits: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> float:
    """|sum of log-probs of `targets` under `logits` - the same under fp64 logits|, in nats."""
    logp = lambda z: z.double().log_softmax(-1).gather(1, targets[:, None]).sum()  # noqa: E731
    return abs(logp(logits) - logp(hidden.double() @ weight.double().t())).item()


if __name__ == "__main__":
    h, w, t = gpt2_sized(128)
    emulated = lambda a, b: a.float() @ b.float().t()  # noqa: E731  (bf16 inputs, fp32 products and sums)
    tf32 = lambda x: (x.float().view(torch.int32) + 0x1000 & ~0x1FFF).view(torch.float32)  # noqa: E731  (10-bit mantissa)
    rows = {"fp32 matmul": h @ w.t(), "bf16 inputs, fp32 accumulate": emulated(h.bfloat16(), w.bfloat16()),
            "TF32 inputs": tf32(h) @ tf32(w).t(), "split bf16 (3 products)": split_product(h, split_bf16(w), emulated)}
    print("error of a log-prob summed over 128 positions, vs fp64 (nat):")
    for name, logits in rows.items():
        print(f"  {name:30} {summed_error(logits, h, w, t):.4f}")
