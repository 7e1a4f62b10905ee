"""machinery/batch_order.py: the epoch sampler, the held-out subset, and both as sft.train uses them. Tiny models, fp32 on
the CPU. Each test's docstring names the bug it would catch.
"""


import random

import numpy as np
import pytest
import torch

import data
import sft
from machinery import batch_order
from tests.helpers import category_pairs, settings, small_model

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny tensors run faster on one thread



# ----------------------------------------------------------------------------------------------------------------
# The epoch sampler


LENGTHS = np.random.default_rng(0).integers(10, 500, size=1003)


@pytest.mark.parametrize("group_by_length", [True, False])
def test_every_example_exactly_once_per_epoch(group_by_length):
    """Catches: examples lost or repeated by the chunk sort or the batch shuffle, and drop_last ignored."""
    batches = batch_order.epoch_batches(LENGTHS, 16, seed=1, epoch=0, group_by_length=group_by_length, drop_last=False)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(LENGTHS)))
    dropped = batch_order.epoch_batches(LENGTHS, 16, seed=1, epoch=0, group_by_length=group_by_length)
    assert all(len(b) == 16 for b in dropped) and len(dropped) == len(LENGTHS) // 16


def test_order_is_a_pure_function_of_seed_and_epoch():
    """Catches: order depending on global random state (resume would replay different batches), the same order
    every epoch, and resume from step k not matching the uninterrupted run."""
    run = batch_order.epoch_batches(LENGTHS, 16, seed=1, epoch=3)
    np.random.seed(123)
    random.seed(123)
    torch.manual_seed(123)
    resumed = batch_order.epoch_batches(LENGTHS, 16, seed=1, epoch=3)[20:]  # the loop restarted at step 20
    assert all(np.array_equal(a, b) for a, b in zip(run[20:], resumed, strict=True))
    other_epoch = batch_order.epoch_batches(LENGTHS, 16, seed=1, epoch=4)
    other_seed = batch_order.epoch_batches(LENGTHS, 16, seed=2, epoch=3)
    assert not np.array_equal(np.concatenate(run), np.concatenate(other_epoch))
    assert not np.array_equal(np.concatenate(run), np.concatenate(other_seed))


def test_rank_shards_are_disjoint_and_cover_the_batch():
    """Catches: ranks training on overlapping rows or skipping some, when each takes batch[rank::world_size]."""
    for batch in batch_order.epoch_batches(LENGTHS, 16, seed=0, epoch=0, drop_last=False):
        shards = [batch[rank::4] for rank in range(4)]
        assert sorted(np.concatenate(shards).tolist()) == sorted(batch.tolist())


def test_grouping_by_length_cuts_padding_but_keeps_batch_order_random():
    """Catches: grouping that does not sort (or sorts the wrong thing) and so saves no padding, and sorted batches
    left in length order (every epoch would start with its shortest batches)."""
    batches = batch_order.epoch_batches(LENGTHS, 16, seed=0, epoch=0)
    grouped = batch_order.padding_fraction(LENGTHS, batches)
    longest = [LENGTHS[batch].max() for batch in batches]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)
    mixed = batch_order.padding_fraction(LENGTHS, batch_order.epoch_batches(LENGTHS, 16, seed=0, epoch=0, group_by_length=False))
    assert grouped < 0.05 < 0.3 < mixed, f"padding grouped {grouped:.3f}, random {mixed:.3f}"
    assert batch_order.padding_fraction([5, 5, 10], [np.array([0, 2]), np.array([1])]) == pytest.approx(5 / 25)


# ----------------------------------------------------------------------------------------------------------------
# As sft.train uses it: the held-out subset, the batch order


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
