"""bench/padding.py: the padding it counts, with and without length grouping, is the README's (55% -> 2%)."""

import re

from bench import padding


def test_length_grouping_cuts_padding_as_the_readme_says(capsys):
    """Catches a renamed flag, a broken import, and batch_order.epoch_batches losing its grouping (padding stays
    near 55%) or the count going wrong."""
    padding.main([])
    out = capsys.readouterr().out
    before, after, fewer = re.search(r"padding (\d+)% -> (\d+)%: (\S+)x fewer", out).groups()
    assert (before, after, fewer) == ("55", "2", "2.19"), out
