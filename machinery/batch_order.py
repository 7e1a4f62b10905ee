"""Which examples go into which batch, in which order: length-grouped, seeded, resumable. sft.py's loop reads it.

    python data.py --dataset=hh      # prints the padding of random and of length-grouped batches

What it speeds up, and how much: a random batch pads every row to its longest; grouping similar lengths cut the
padding of HH-like batches of 64 from 55% to 2%, 2.2x fewer tokens computed per epoch (`python -m bench.padding`;
README "Speed"). What it guards: the order is a pure function of (seed, epoch), so a resumed run, or one with
another number of processes, trains on exactly the same batches (tests/machinery/test_batch_order.py).
"""

import numpy as np

# ----------------------------------------------------------------------------------------------------------------
# The epoch sampler: a pure function of (seed, epoch)
#
# Random batches mix short and long examples, and every row is padded to the longest. Grouping similar lengths
# cuts the padding while keeping the order random: shuffle, take chunks of GROUP_BATCHES batches, sort each chunk
# by length, cut it into batches, shuffle the batch order. The training loop keeps only (epoch, step): resuming
# skips the first `step` batches of the epoch, and rank r of W trains on batch[r::W] of each global batch
# (rows sorted by length, so every rank gets similar lengths).

GROUP_BATCHES = 64  # batches per sorted chunk: larger = less padding, less randomness in which rows meet


def epoch_batches(lengths, batch_size: int, seed: int, epoch: int, group_by_length: bool = True,
                  drop_last: bool = True) -> list[np.ndarray]:
    """Index arrays of one epoch's batches; with drop_last=False every example appears exactly once."""
    lengths = np.asarray(lengths)
    if batch_size < 1 or len(lengths) == 0:
        raise ValueError(f"need batch_size >= 1 and examples, got batch_size={batch_size}, {len(lengths)} examples")
    rng = np.random.default_rng([seed, epoch])  # its own generator: global random state cannot change the order
    order = rng.permutation(len(lengths))
    if group_by_length:
        chunk = batch_size * GROUP_BATCHES  # a multiple of batch_size, so no batch straddles two chunks
        pieces = [order[s: s + chunk] for s in range(0, len(order), chunk)]
        order = np.concatenate([piece[np.argsort(lengths[piece], kind="stable")] for piece in pieces])
    batches = [order[s: s + batch_size] for s in range(0, len(order), batch_size)]
    if drop_last and len(batches[-1]) < batch_size:
        batches.pop()
    if not batches:
        raise ValueError(f"{len(lengths)} training examples make no batch of {batch_size}; lower --batch_size")
    if group_by_length:  # else the sorted chunks would hand out short batches first
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def padding_fraction(lengths, batches: list[np.ndarray]) -> float:
    """Share of the padded batch area (rows x longest row) that is padding."""
    lengths = np.asarray(lengths)
    padded = sum(len(batch) * lengths[batch].max() for batch in batches)
    return 1.0 - sum(lengths[batch].sum() for batch in batches) / padded


def eval_subset(n: int, k: int, seed: int) -> np.ndarray:
    """k of n held-out example indices, drawn at random and sorted; all n if k >= n; the same for the same seed.
    Not the first k: HH's test split is read subset by subset (harmless-base first), so the first 256 pairs would
    describe one subset only. sft.py evaluates these, and dpo.py precomputes reference log-probs for these only."""
    if k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))
