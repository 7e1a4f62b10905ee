"""What judge.py keeps on disk, so that nothing is sampled or paid for twice and nothing stale is ever reused.

    python judge.py ...       # a second run with the same settings samples nothing and sends no request

What it guards (tests/machinery/test_answer_store.py, tests/test_sampling.py and tests/test_judge.py check each):
answers, the Best-of-N pool and verdicts are appended as they come, so a killed run loses at most one batch and
resumes where it stopped (a torn last line is cut off: common.append_jsonl). Stored answers are reused only when the
same weights made them, told by model.weights_id (the content hash of model.safetensors, not its path, nor its
mtime: retraining into the same run directory must not bring back the old model's answers), and the same generation
settings; anything else is sampled again, with a one-line reason. A verdict is reused only for the byte-identical
request (judge.py's judgment keys).
"""

import json
from pathlib import Path

from machinery import common


def stored_answers(name: str, path: str, file: Path, generation: dict) -> dict:
    """Answers in `file` that `path`'s current weights made with these generation settings, keyed by (temperature,
    prompt, chosen). Others (a model retrained into the same directory, another max_new_tokens, shots or seed, a
    file from an older judge.py) are dropped from the file, with a one-line reason, and sampled again."""
    rows = common.read_jsonl(file)
    mine = [r for r in rows if r.get("path") == path]
    stale = [r for r in mine if any(r.get(k) != v for k, v in generation.items())]
    is_stale = {id(r) for r in stale}
    if stale:
        first = stale[0]
        if "fingerprint" not in first:
            why = "an older judge.py (no weights fingerprint)"
        else:
            why = ", ".join(f"{k} {first.get(k)} (now {v})" for k, v in generation.items() if first.get(k) != v)
        print(f"sample {name}: {len(stale)} stored answers in {file} were made with {why}; sampling them again")
        keep = [r for r in rows if id(r) not in is_stale]
        common.atomic_write(file, lambda f: f.write("".join(json.dumps(r) + "\n" for r in keep).encode()))
    return {(r["temperature"], r["prompt"], r["chosen"]): r for r in mine if id(r) not in is_stale}


def stored_pool(file: Path, generation: dict, n: int) -> dict:
    """Rows of the Best-of-N pool in `file` holding n answers each and made with these settings (sampler and scorer
    weights by content hash, max_new_tokens, seed), keyed by (temperature, prompt, chosen); others are ignored and
    sampled again."""
    return {(r["temperature"], r["prompt"], r["chosen"]): r for r in common.read_jsonl(file)
            if len(r["responses"]) == n and all(r.get(k) == v for k, v in generation.items())}

