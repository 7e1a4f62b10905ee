"""bench/timing.py, what the benchmarks share: the baselines they race must be what they claim to be.

naive_generate is the no-cache baseline of bench/generate.py and gpu_check's generation oracle; the head swaps stand
in for GPT.forward's head in three scripts and must give it back afterwards."""

import torch
import torch.nn.functional as F

from bench import timing
from machinery import vocab_head
from tests.helpers import small_model


def test_naive_generate_is_greedy_decoding():
    """Catches a baseline that decodes something else (the wrong position's logits, tokens appended in the wrong
    place), which would make every "KV cache vs none" ratio and gpu_check's oracle meaningless."""
    model = small_model().eval()
    prompt = [[5, 6, 7, 8, 9]]
    got = timing.naive_generate(model, torch.tensor(prompt), 6)[0].tolist()
    assert got == model.generate(prompt, 6, temperature=0, eos_id=-1)[0], got


def test_head_swapped_replaces_the_head_and_puts_it_back():
    """Catches a swap that leaves the plain or low-precision head in place after its block: every later
    measurement in the same process would time the wrong head. Also: the plain head's log-probs are the real ones."""
    model, batch = small_model(), timing.make_batch(2, 16, 512, "cpu", seed=0)
    original = vocab_head.response_logprobs
    with timing.head_swapped(timing.plain_head):
        assert vocab_head.response_logprobs is timing.plain_head
        plain = model(batch["input_ids"], select=batch["loss_mask"], targets=batch["target_ids"][batch["loss_mask"]])
    assert vocab_head.response_logprobs is original
    logits = model(batch["input_ids"], select=batch["loss_mask"])
    want = -F.cross_entropy(logits.float(), batch["target_ids"][batch["loss_mask"]], reduction="none")
    assert torch.allclose(plain, want, atol=1e-5), (plain - want).abs().max()
