"""machinery/batch_order.py: the held-out subset and the batch order, as sft.train uses them. Tiny models, fp32 on
the CPU. Each test's docstring names the bug it would catch.
"""


import pytest

import data
import sft
from machinery import batch_order
from tests.helpers import category_pairs, settings, small_model

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny tensors run faster on one thread


def spy_batches(tok, calls: list):
    """A batch function that records the example indices of every batch it builds."""
    def fn(ids):
        calls.append([int(i) for i in ids])
        return data.sft_batch(tok, ids)
    return fn


def test_evaluation_uses_the_same_seeded_subset_of_the_whole_split(tmp_path):
    """Catches evaluating the first n_eval held-out pairs (HH's test split is read subset by subset, so its first
    256 pairs are all harmless-base: the eval curves would describe one subset), and a subset that changes between
    evaluations (the curve would mix noise from different pairs into its trend)."""
    tok, evaluated = category_pairs(32), []
    s = settings(out=str(tmp_path), n_eval=8, eval_every=1, max_steps=2, micro_batch_size=8)
    sft.train(s, small_model(), sft.sft_loss, lambda ids: data.sft_batch(tok, ids), spy_batches(tok, evaluated), 32,
              data.example_lengths(tok, "sft"), "sft")
    want = batch_order.eval_subset(32, 8, s.seed).tolist()
    assert evaluated == [want] * 3, f"evaluated {evaluated} at steps 0, 1, 2; want {want} each time"
    assert want != list(range(8)) and max(want) >= 16, f"subset {want} is not spread over the 32 held-out pairs"
    assert batch_order.eval_subset(32, 8, 1).tolist() != want and batch_order.eval_subset(5, 8, 0).tolist() == list(range(5))


@pytest.mark.parametrize("group_by_length", [True, False])
def test_group_by_length_switch_sets_the_batch_order(tmp_path, group_by_length):
    """Catches --group_by_length not reaching the sampler (the reference code's random batches could then not be
    reproduced): the training batches must be exactly batch_order.epoch_batches' with that flag."""
    tok, trained = category_pairs(32), []
    s = settings(out=str(tmp_path), max_steps=3, micro_batch_size=8, group_by_length=group_by_length)
    lengths = data.example_lengths(tok, "sft")
    sft.train(s, small_model(), sft.sft_loss, spy_batches(tok, trained), None, 32, lengths, "sft")
    want = [b.tolist() for b in batch_order.epoch_batches(lengths, 8, s.seed, 0, group_by_length=group_by_length)[:3]]
    assert trained == want, f"group_by_length={group_by_length}: trained on {trained}, want {want}"
