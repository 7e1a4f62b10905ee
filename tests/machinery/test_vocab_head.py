"""machinery/vocab_head.py against what it replaces: the plain fp32 head (all N rows of logits at once, autograd's
log-softmax), and fp64 for the split-bf16 product. Each docstring names the bug its test would catch."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from machinery import vocab_head

EMULATED = lambda a, b: a.float() @ b.float().t()  # noqa: E731  bf16 inputs, fp32 products: torch.mm's out_dtype


def plain(hidden, weight, targets):
    """The head before vocab_head.py: (N, V) fp32 logits, log-softmax, the targets' entries."""
    return -F.cross_entropy(F.linear(hidden.float(), weight.float()), targets, reduction="none")


def grads(fn, hidden, weight, targets, upstream):
    hidden, weight = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    logps = fn(hidden, weight, targets)
    (logps * upstream).sum().backward()
    return logps.detach(), hidden.grad, weight.grad


def small(n: int, seed: int = 0, V: int = 300, C: int = 16):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, C, generator=g), torch.randn(V, C, generator=g) * 0.5, torch.randint(V, (n,), generator=g),
            torch.randn(n, generator=g))


@pytest.mark.parametrize("keep", [0, 2**30], ids=["recomputed", "kept"])
@pytest.mark.parametrize("n, chunk", [(40, 8), (37, 8), (37, 64), (5, 1), (8, 8)])
def test_log_probs_and_gradients_equal_the_plain_head(n, chunk, keep, monkeypatch):
    """Chunk sizes that divide N and that do not, one chunk, one row per chunk; logits computed again in backward (a
    GPU's KEEP_BYTES) or kept from forward (a CPU's). Catches a chunk boundary off by one (rows skipped or done
    twice), a short last chunk lost, kept logits used for the wrong chunk, a sign error in the softmax gradient, the
    target's one-hot term missing, and the head's gradient overwritten by each chunk instead of summed over them."""
    monkeypatch.setattr(vocab_head, "KEEP_BYTES", {"cpu": keep})
    hidden, weight, targets, upstream = small(n)
    want = grads(plain, hidden, weight, targets, upstream)
    got = grads(lambda h, w, t: vocab_head.response_logprobs(h, w, t, chunk), hidden, weight, targets, upstream)
    for name, a, b in zip(("log-probs", "d hidden", "d head"), got, want):
        diff = (a - b).abs().max().item()
        assert diff <= 1e-5 * max(1.0, b.abs().max().item()), f"{name}: max abs diff {diff}"


@pytest.mark.parametrize("keep", [0, 2**30])
def test_no_tensor_holds_more_than_a_chunk_of_logits(keep, monkeypatch):
    """The point of the chunks: no (N, V) tensor is ever alive, in forward or backward. Catches logits (or their
    softmax, or its gradient) computed for all N rows at once, and kept chunks joined into one. Every tensor an op
    creates is inspected."""
    monkeypatch.setattr(vocab_head, "KEEP_BYTES", {"cpu": keep})
    hidden, weight, targets, upstream = small(40)
    V, C, chunk = weight.shape[0], weight.shape[1], 8
    shapes = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            shapes.extend(tuple(t.shape) for t in (out if isinstance(out, (tuple, list)) else [out])
                          if isinstance(t, torch.Tensor))
            return out

    with Record():
        grads(lambda h, w, t: vocab_head.response_logprobs(h, w, t, chunk), hidden, weight, targets, upstream)
    logits_like = [s for s in shapes if V in s and len(s) == 2 and s != (V, C)]
    assert logits_like and all(min(s) <= chunk for s in logits_like), sorted(set(logits_like))
    with Record():  # the check itself can fail: the plain head does hold all rows
        grads(plain, hidden, weight, targets, upstream)
    assert (40, V) in shapes


def test_a_gpu_keeps_only_the_last_chunk_and_a_cpu_keeps_within_its_budget(monkeypatch):
    """What forward keeps for backward: on a GPU (no budget) the last chunk only, so memory stays two chunks whatever
    N is; on a CPU all the chunks that fit KEEP_BYTES. Catches a budget ignored (GPU memory growing with N) or
    never used (CPU paying for recomputation it has the memory to skip)."""
    hidden, weight, targets, upstream = small(40)
    projected = []
    project = vocab_head.project
    monkeypatch.setattr(vocab_head, "project", lambda h, w, split: projected.append(len(h)) or project(h, w, split))
    for keep, products in ((0, [8] * 5 + [8] * 4), (5 * 8 * 300 * 4, [8] * 5), (2 * 8 * 300 * 4, [8] * 5 + [8] * 2)):
        monkeypatch.setattr(vocab_head, "KEEP_BYTES", {"cpu": keep})
        projected.clear()
        grads(lambda h, w, t: vocab_head.response_logprobs(h, w, t, 8), hidden, weight, targets, upstream)
        assert projected == products, (keep, projected)


def test_the_split_product_is_exact_where_bf16_is_not():
    """GPT-2-sized logits (about -93, one dominant hidden dimension), 128 positions: the split product, emulated
    (bf16 parts, fp32 products), within 0.05 nat of fp64 on the summed log-prob, where one bf16 product is not.
    Catches a dropped cross term (h_hi W_lo or h_lo W_hi), a `lo` part rounded from the wrong residual, swapped
    operands, and the oracle's own blindness (bf16 must fail it)."""
    hidden, weight, targets = vocab_head.gpt2_sized(128)
    logits = hidden @ weight.t()
    assert -140 < logits.mean() < -60 and logits.std(-1).mean() > 3, (logits.mean(), logits.std(-1).mean())
    split = vocab_head.summed_error(vocab_head.split_product(hidden, vocab_head.split_bf16(weight), EMULATED), hidden, weight, targets)
    bf16 = vocab_head.summed_error(EMULATED(hidden.bfloat16(), weight.bfloat16()), hidden, weight, targets)
    fp32 = vocab_head.summed_error(logits, hidden, weight, targets)
    assert split <= 0.05 < bf16, f"summed log-prob error: split {split:.4f}, bf16 {bf16:.4f} (fp32 {fp32:.4f})"
    # each logit too: the dropped h_lo W_lo term is ~2^-16 of |z|, where dropping any other term costs ~2^-8 of it
    each = (vocab_head.split_product(hidden, vocab_head.split_bf16(weight), EMULATED).double() - hidden.double() @ weight.double().t())
    assert each.abs().max() < 0.01, f"split product's largest logit error {each.abs().max():.4f}"
    hi, lo = vocab_head.split_bf16(weight)
    assert hi.dtype == lo.dtype == torch.bfloat16 and (hi.float() + lo.float() - weight).abs().max() < 1e-4


def test_the_split_product_is_chosen_only_where_out_dtype_exists(monkeypatch, capsys):
    """The split path needs torch.mm(..., out_dtype=fp32): on the CPU it must not be chosen (fp32 instead, exact),
    nor on CUDA without it (a clear message); with it, under bf16 autocast only. Runs the split path end to end on
    the CPU with the product emulated: catches its backward (bf16 products, fp32 sums) breaking the gradients."""
    assert not vocab_head.has_out_dtype(torch.device("cpu"))
    if not torch.cuda.is_available():
        assert not vocab_head.has_out_dtype.__wrapped__(torch.device("cuda"))
        assert "runs in fp32 there" in capsys.readouterr().out
    hidden, weight, targets = vocab_head.gpt2_sized(64)
    upstream = torch.ones(64)
    exact = grads(vocab_head.response_logprobs, hidden, weight, targets, upstream)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # on the CPU: still the fp32 product, so the same numbers
        assert torch.equal(grads(vocab_head.response_logprobs, hidden, weight, targets, upstream)[0], exact[0])

    calls = []
    monkeypatch.setattr(vocab_head, "has_out_dtype", lambda device: True)
    monkeypatch.setattr(vocab_head, "cuda_mm", lambda a, b: calls.append(a.dtype) or EMULATED(a, b))
    grads(vocab_head.response_logprobs, hidden, weight, targets, upstream)  # no autocast: fp32
    with torch.autocast("cpu", dtype=torch.float16):
        grads(vocab_head.response_logprobs, hidden, weight, targets, upstream)  # fp16 autocast: fp32 too
    assert calls == [], calls
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logps, d_hidden, d_weight = grads(vocab_head.response_logprobs, hidden, weight, targets, upstream)
    assert calls and set(calls) == {torch.bfloat16}, calls
    assert (logps.sum() - exact[0].sum()).abs() <= 0.05, (logps.sum(), exact[0].sum())
    for name, a, b in (("d hidden", d_hidden, exact[1]), ("d head", d_weight, exact[2])):
        cos = F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
        assert cos > 0.999, f"{name}: cosine {cos:.5f} with the fp32 gradient (bf16 products keep ~0.9999)"


@pytest.mark.parametrize("keep", [0, 2**30], ids=["recomputed", "kept"])
def test_the_split_path_sums_the_heads_gradient_over_its_chunks(keep, monkeypatch):
    """The split-bf16 path (chosen on CUDA where torch.mm has out_dtype; emulated here: bf16 inputs, fp32 products)
    over 5 chunks of 8 rows, against the same path in one chunk and against the plain fp32 head; forward under bf16
    autocast and backward after it, as sft.train runs them. Catches the head's gradient overwritten by each chunk
    instead of summed over them (only one chunk's share would be left: the other test of this path has one chunk),
    a chunk's d hidden written to another chunk's rows, and logits kept for the wrong chunk on this path."""
    monkeypatch.setattr(vocab_head, "KEEP_BYTES", {"cpu": keep})
    monkeypatch.setattr(vocab_head, "has_out_dtype", lambda device: True)
    calls = []
    monkeypatch.setattr(vocab_head, "cuda_mm", lambda a, b: calls.append(a.dtype) or EMULATED(a, b))
    hidden, weight, targets, upstream = small(40)

    def split_path(chunk: int):
        h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logps = vocab_head.response_logprobs(h, w, targets, chunk)
        (logps * upstream).sum().backward()
        return logps.detach(), h.grad, w.grad

    exact, one, five = grads(plain, hidden, weight, targets, upstream), split_path(40), split_path(8)
    assert calls and set(calls) == {torch.bfloat16}, calls  # the split path ran, in bf16
    for name, a, b, c in zip(("log-probs", "d hidden", "d head"), five, one, exact):
        chunks = ((a - b).norm() / b.norm()).item()  # the same products, summed in another order
        fp32 = ((a - c).norm() / c.norm()).item()  # bf16 products against the fp32 head
        assert chunks <= 1e-4 and fp32 <= 0.02, \
            f"{name}: relative error of 5 chunks vs 1 chunk {chunks:.2e}, vs the fp32 head {fp32:.2e}"
