"""bench/head_memory.py: its estimate of the head's GPU share is the README's table. (The measured part runs two
gpt2 steps of ~4 GiB each in fresh processes: too slow for the suite.)"""

from bench import head_memory


def test_head_shares_are_the_readmes():
    """Catches a changed FLOP count or datasheet peak: the README quotes these numbers."""
    rows = {row[0]: row[1:] for row in head_memory.head_shares()}
    assert rows["gpt2"] == ["78%", "83%", "37%", "2.87x", "77%", "82%", "37%", "2.70x"], rows
    assert rows["gpt2-xl"] == ["30%", "37%", "7%", "1.34x", "29%", "35%", "7%", "1.31x"], rows
