"""DPO's reference log-probs, computed once before training and cached, instead of by a second model at every step.

    python dpo.py ...            # prints "reference log-probs (train): ..." once; later runs load the cache

What it speeds up: pi_ref never changes, so log pi_ref(y|x) of every training pair is computed in one no-grad pass
and read from a table after; the reference model is then freed. A DPO step then runs one forward and backward
instead of also a reference forward: 1.27x faster, 135 MiB less memory (`make bench`; README "Speed").
What it guards: the cache is keyed by the reference weights' content (model.weights_id: a model retrained into the
same path is a new key), the tokens themselves and every setting that changes them, so neither a retrained SFT model
nor an edited data.py nor a re-downloaded dataset ever reads a stale table (tests/machinery/test_reference_logps.py);
with several processes each computes a share and one all_reduce assembles the table. dpo.py passes in what it
needs from above: the batches, the log-prob function and the weights' identity.
"""

import hashlib
import json

import numpy as np
import torch

from machinery import common


def precompute(s, run, reference, weights_id: str, tok: dict, split: str, batch_fn, logps_fn) -> np.ndarray:
    """(N, 2) float32: log pi_ref(y_w|x), log pi_ref(y_l|x) for every pair of `tok`, cached on disk.

    s: dpo.Settings; run: distributed.Run; weights_id: model.weights_id of the reference; tok: the tokenized pairs
    (data.py's ragged arrays, hashed for the key); batch_fn(ids) -> a [chosen; rejected] batch of those pairs;
    logps_fn(model, batch) -> the summed response log-probs of its chosen and of its rejected rows, (B,) each.
    With several processes each computes every world-th pair and an all_reduce of the zero-filled rest assembles the
    whole table."""
    device = run.device
    tokens = hashlib.sha256()
    for name in sorted(k for k in tok if k.endswith(("_ids", "_offsets"))):
        tokens.update(np.ascontiguousarray(tok[name]))
    key = json.dumps([weights_id, s.seed, tokens.hexdigest(), s.dataset, split, s.max_length, s.max_prompt_length,
                      s.truncation, str(run.dtype)])
    path = common.cache_dir() / "reference_logps" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.npy"
    if path.exists():
        return np.load(path, allow_pickle=False)
    n = len(tok["prompt_offsets"]) - 1
    table = torch.zeros(n, 2, dtype=torch.float64, device=device)
    reference.to(device).eval()
    ids = list(range(n))[run.rank :: run.world]
    step = 2 * s.micro_batch_size  # no gradients, so larger batches fit
    with torch.no_grad():
        for i in range(0, len(ids), step):
            chunk = ids[i : i + step]
            batch = common.to_device(batch_fn(chunk), device)
            with common.autocast(device, run.dtype):
                table[chunk] = torch.stack(logps_fn(reference, batch), 1).double()  # (b, 2): chosen, rejected
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
