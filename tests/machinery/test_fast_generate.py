"""machinery/fast_generate.py against the plain path it speeds up: gpt.GPT.generate, and the decoder that re-runs
everything.

Every fast path must give the plain generate's tokens: the prepared (cast, on CPU packed) weights, the fp32 CPU cache
and the compiled decode step. Each docstring names the bug its test would catch."""

import pytest
import torch

import model as gpt
from machinery import fast_generate
from tests.helpers import SMALL_VOCAB as SMALL
from tests.helpers import greedy_without_cache, small_with_biases

PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [8, 9], [10, 11, 12, 13]]


def seeded(seed: int = 3) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("kwargs", [dict(temperature=0), dict(temperature=1.0, top_k=20),
                                    dict(temperature=0.7, top_p=0.9), dict(temperature=1.0, num_samples=3)])
def test_fast_generate_gives_the_plain_generates_tokens(kwargs):
    """The default sampler of judge.py (prepared weights, packed on CPU, fp32 cache) against gpt.generate. Catches a
    prepared Linear that drops its bias or uses another layer's weight, a head left out of the preparation (or cast
    to the compute dtype), the cache not copied per sample, and a row ending early that disturbs the others."""
    m = small_with_biases()
    eos = m.generate(PROMPTS, 12, temperature=0, eos_id=-1)[1][2]  # row 1 ends early, the others go on
    want = m.generate(PROMPTS, 12, eos_id=eos, generator=seeded(), **kwargs)
    got = fast_generate.generate(m, PROMPTS, 12, eos_id=eos, generator=seeded(), **kwargs)
    assert got == want, kwargs
    if kwargs["temperature"] == 0:
        assert len(got[1]) <= 2 and len(got[0]) == 12  # greedy: row 1 ended early, and left the batch


def test_compiled_generation_matches_eager():
    """generate(compiled=True) decodes through torch.compile over the whole fixed-size cache (on CUDA, replayed as a
    CUDA graph) and keeps ended rows in its batch, where eager drops them. Catches cache positions not yet written
    that the mask fails to hide, a cache position that does not advance, an ended row leaking into the others, and
    random draws that depend on which rows have ended (the same seed must give the same answers). Two compiles."""
    m = small_with_biases()
    eos = m.generate(PROMPTS, 12, temperature=0, eos_id=-1)[1][2]  # row 1 ends early, the others go on
    for kwargs in (dict(temperature=0), dict(temperature=1.0, top_k=20)):  # seeded: the same draws in both
        want = m.generate(PROMPTS, 12, eos_id=eos, generator=seeded(), **kwargs)
        got = fast_generate.generate(m, PROMPTS, 12, eos_id=eos, generator=seeded(), compiled=True, **kwargs)
        assert got == want, kwargs
        assert len(got[0]) == 12 and len(got[1]) <= 2  # row 1 ends early in both (with these seeds)
    # judge.py's paths: an fp32 model sampled under bf16 autocast, several answers per prompt (Best of N)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kwargs = dict(temperature=1.0, num_samples=2)
        want = fast_generate.generate(m, PROMPTS, 12, generator=seeded(), **kwargs)
        assert fast_generate.generate(m, PROMPTS, 12, generator=seeded(), compiled=True, **kwargs) == want


def test_prepared_weights_live_for_the_call_only():
    """fast_generate.generate casts (on CPU also packs) every weight once per call; catches prepared copies that outlive the
    call, also one that fails midway: training would then run on detached copies and its gradients would never reach
    the weights."""
    m = small_with_biases()
    fast_generate.generate(m, [[1, 2, 3]], 4, temperature=0)

    def fail(tokens):
        raise RuntimeError("decode failed")

    with pytest.raises(RuntimeError, match="decode failed"):
        fast_generate.generate(m, [[1, 2, 3]], 4, temperature=0, stop=("x",), decode=fail)
    assert "logits" not in m.__dict__ and not any("forward" in lin.__dict__ for lin in m.modules())
    m.train()
    m(torch.tensor([[1, 2, 3, 4]])).logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in m.parameters() if p.dim() == 2 and p.shape[0] != SMALL.block_size)


def test_generate_with_bf16_weights_samples_from_fp32_logits():
    """A bf16 model's generate upcasts the head once per call (not per token): catches a head left in bf16 (the
    logits then round to steps of ~0.25 and, in F.linear with the fp32 hidden state, raise a dtype error) and a
    cached fp32 head that drifts from the per-call logits path (GPT.forward, which the no-cache decoder uses)."""
    torch.manual_seed(0)
    m = gpt.GPT(SMALL).eval().to(torch.bfloat16)
    prompts = [[1, 2, 3, 4, 5], [8, 9]]
    for generate in (m.generate, lambda *a, **k: fast_generate.generate(m, *a, **k)):
        for p, got in zip(prompts, generate(prompts, 8, temperature=0, eos_id=-1)):
            assert got == greedy_without_cache(m, p, 8), (got, greedy_without_cache(m, p, 8))
    assert m.lm_head.weight.dtype == torch.bfloat16  # the fp32 copy is the call's own, not a change to the model


def test_the_cpu_cache_is_fp32_and_the_body_runs_in_the_autocast_dtype(monkeypatch):
    """The speed choices fast_generate.generate makes, wired as its docstring says: under bf16 autocast on CPU the weights
    are prepared in bf16 (not left in fp32, which autocast would cast again at every product), the head in fp32, and
    the KV cache is fp32 (attention over one query per row is ~3x faster there). Catches a swapped cache dtype and
    weights prepared in the wrong dtype, which give the same tokens and so pass the tests above."""
    m = small_with_biases()
    dtypes = []
    init = gpt.KVCache.__init__
    monkeypatch.setattr(gpt.KVCache, "__init__", lambda self, *a: dtypes.append(a[-1]) or init(self, *a))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast_generate.generate(m, PROMPTS, 4)
        with fast_generate.prepared(m, torch.bfloat16, rows=3) as weights:
            body, head = weights[0], weights[-1]
    assert dtypes == [torch.float32], dtypes
    assert body.dtype == torch.bfloat16 and head.dtype == torch.float32, (body.dtype, head.dtype)
