"""machinery/tokenized_pairs.py: the ragged arrays of tokenized pairs, against plain Python lists. Each docstring
names the bug the test would catch."""

import numpy as np

from machinery import tokenized_pairs as tp


def ragged(rows_by_part: dict[str, list[list[int]]]) -> dict[str, np.ndarray]:
    tok = {}
    for part, rows in rows_by_part.items():
        tok[f"{part}_ids"], tok[f"{part}_offsets"] = tp.pack([np.array(r, dtype=np.uint16) for r in rows])
    return tok


ROWS = {"prompt": [[1, 2, 3], [4], [5, 6]], "chosen": [[7], [8, 9, 10], [11]], "rejected": [[12, 13], [14], []]}


def test_rows_come_back_as_they_went_in():
    """Catches an off-by-one offset (a row losing its first or last token to its neighbour), an empty row breaking
    the offsets, a subset that reorders or mixes rows, and lengths that count the wrong response."""
    tok = ragged(ROWS)
    assert tp.n_examples(tok) == 3
    for i in range(3):
        assert [r.tolist() for r in tp.example(tok, i)] == [ROWS[p][i] for p in tp.PARTS], i
    sub = tp.select_examples(tok, [2, 0])
    assert [[r.tolist() for r in tp.example(sub, i)] for i in range(2)] == [
        [ROWS[p][j] for p in tp.PARTS] for j in (2, 0)]
    assert tp.example_lengths(tok, "sft").tolist() == [4, 4, 3]  # prompt + chosen
    assert tp.example_lengths(tok, "pref").tolist() == [5, 4, 3]  # prompt + the longer response
    assert tp.pack([])[0].dtype == np.uint16 and tp.pack([])[1].tolist() == [0]
