"""DPO's reference log-probs, computed once before training and cached, instead of by a second model at every step.

    python dpo.py ...            # prints "reference log-probs (train): ..." once; later runs load the cache

What it speeds up: pi_ref never changes, so log pi_ref(y|x) of every training pair is computed in one no-grad pass
and read from a table after; the reference model is then freed. A DPO step then runs one forward and backward
instead of also a reference forward: 1.27x faster, 135 MiB less memory (`make bench`, section 4; README "Speed").
What it guards: the cache is keyed by the reference weights, the tokens themselves and every setting that changes
them, so an edited data.py or a re-downloaded dataset never reads a stale table (tests/test_train.py); with several
processes each computes a share and one all_reduce assembles the table.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

import common
import data
import parallel
import sft


def reference_logps(s, reference, tok: dict, split: str) -> np.ndarray:
    """(N, 2) float32: log pi_ref(y_w|x), log pi_ref(y_l|x) for every pair, cached on disk. s: dpo.Settings.

    The cache key covers the reference weights (size and mtime of the file and its config), every setting that
    changes the tokens, and the tokens themselves: an edited data.py or a re-downloaded dataset changes them under
    the same settings. With several processes each computes every world-th pair and an all_reduce of the
    zero-filled rest assembles the whole table."""
    run = parallel.setup(s)
    device = run.device
    weights = Path(s.model) / "model.safetensors" if Path(s.model).is_dir() else Path(s.model)
    stamp = [str(weights.resolve()), weights.stat().st_size, weights.stat().st_mtime_ns] if weights.exists() else [s.model, s.seed]
    tokens = hashlib.sha256()
    for name in sorted(k for k in tok if k.endswith(("_ids", "_offsets"))):
        tokens.update(np.ascontiguousarray(tok[name]))
    key = json.dumps([stamp, tokens.hexdigest(), s.dataset, split, s.max_length, s.max_prompt_length, s.truncation,
                      str(run.dtype)])
    path = common.cache_dir() / "reference_logps" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.npy"
    if path.exists():
        return np.load(path, allow_pickle=False)
    n = data.n_examples(tok)
    table = torch.zeros(n, 2, dtype=torch.float64, device=device)
    reference.to(device).eval()
    ids = list(range(n))[run.rank :: run.world]
    step = 2 * s.micro_batch_size  # no gradients, so larger batches fit
    with torch.no_grad():
        for i in range(0, len(ids), step):
            chunk = ids[i : i + step]
            batch = {k: v.to(device) for k, v in data.preference_batch(tok, chunk).items()}
            with common.autocast(device, run.dtype):
                logps = sft.sequence_logps(reference, batch)  # (2B,): [chosen; rejected], one forward
            table[chunk] = logps.view(2, -1).t().double()
            if run.rank == 0 and (i // step) % 50 == 0:
                print(f"  reference log-probs ({split}): {min(i + step, len(ids)) * run.world}/{n}", flush=True)
    if run.world > 1:
        torch.distributed.all_reduce(table)
    result = table.float().cpu().numpy()
    if run.rank == 0:
        common.atomic_write(path, lambda f: np.save(f, result))
    return result


def with_reference(batch_fn, table: np.ndarray):
    """Wrap a preference batch function so each batch also carries its pairs' reference log-probs."""

    def fn(ids):
        batch = batch_fn(ids)
        batch["reference_chosen_logps"] = torch.from_numpy(table[ids, 0])
        batch["reference_rejected_logps"] = torch.from_numpy(table[ids, 1])
        return batch

    return fn
