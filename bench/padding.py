"""How much padding do length-grouped batches save? machinery/batch_order.epoch_batches with and without
group_by_length, on HH-like lengths: counted, no clock needed.

    python -m bench.padding          # part of make bench (a second)
"""

import dataclasses
import time

import numpy as np

from bench import timing
from machinery import batch_order, common


@dataclasses.dataclass
class Settings:
    """Padding with and without length grouping: python -m bench.padding --key=value ..."""

    seed: int = 0  # the lengths and the batch order


def bench_padding(s) -> list[str]:
    # HH-like lengths (prompt + longer response): lognormal around 200 tokens, cut at max_length 512
    lengths = np.clip(np.random.default_rng(s.seed).lognormal(np.log(200), 0.6, 16000), 8, 512).astype(int)
    fraction = {g: batch_order.padding_fraction(lengths, batch_order.epoch_batches(lengths, 64, s.seed, 0, group_by_length=g))
                for g in (False, True)}
    padded = {g: 1 / (1 - f) for g, f in fraction.items()}  # tokens computed per real token
    timing.table("padding: 16,000 HH-like lengths (median 200, max 512), batches of 64", ["", "padding", "tokens computed"],
                 [[f"group_by_length={g}", f"{fraction[g]:.1%}", f"{padded[g] / padded[True]:.2f}x"] for g in (False, True)])
    return [f"length grouping padding {fraction[False]:.0%} -> {fraction[True]:.0%}: "
            f"{padded[False] / padded[True]:.2f}x fewer tokens computed"]


def main(argv=None):
    start, s = time.time(), common.parse_settings(Settings, argv)
    timing.summary(bench_padding(s), start)


if __name__ == "__main__":
    main()
