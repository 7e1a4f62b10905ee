"""The tokenized pairs' ragged arrays: every row of a part end to end, and where each row starts.

    python data.py --dataset=synthetic      # data.tokenize_pairs builds them; data.py re-exports these accessors

What it guards (and speeds up): a tokenized set is six flat numpy arrays, `{part}_ids` (uint16) and
`{part}_offsets` (int64) for part in prompt, chosen, rejected, where row i of a part is ids[offsets[i]:offsets[i+1]].
np.savez stores them without pickle and loads all of HH in about a second (common.cached_arrays), where a list of
Python lists would take GBs and minutes.
"""

import numpy as np

from machinery import common

PARTS = ("prompt", "chosen", "rejected")


def pack(rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Ragged rows -> (all ids end to end, offsets): row i is ids[offsets[i]:offsets[i+1]]."""
    ids = np.concatenate(rows) if rows else np.zeros(0, dtype=np.uint16)
    return ids, np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)


def n_examples(tok: dict) -> int:
    return len(tok["prompt_offsets"]) - 1


def example(tok: dict, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prompt_ids, chosen_ids, rejected_ids) of pair i; each response ends with EOT unless truncation cut it."""
    return tuple(tok[f"{part}_ids"][tok[f"{part}_offsets"][i]: tok[f"{part}_offsets"][i + 1]] for part in PARTS)


def example_lengths(tok: dict, kind: str) -> np.ndarray:
    """Tokens per example: "sft" = prompt + chosen, "pref" = prompt + the longer response (its padded length)."""
    common.check_choice(kind, ("sft", "pref"), "length kind")
    prompt, chosen, rejected = (np.diff(tok[f"{part}_offsets"]) for part in PARTS)
    return prompt + (chosen if kind == "sft" else np.maximum(chosen, rejected))


def select_examples(tok: dict, indices) -> dict[str, np.ndarray]:
    """The pairs `indices` of a tokenized set (in that order), as a tokenized set of their own."""
    sub = {"summary": tok["summary"]} if "summary" in tok else {}
    for part in PARTS:
        ids, offsets = tok[f"{part}_ids"], tok[f"{part}_offsets"]
        sub[f"{part}_ids"], sub[f"{part}_offsets"] = pack([ids[offsets[i]: offsets[i + 1]] for i in indices])
    return sub
