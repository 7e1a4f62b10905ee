"""What judge.py keeps on disk, so that nothing is sampled or paid for twice and nothing stale is ever reused.

    python judge.py ...       # a second run with the same settings samples nothing and sends no request

What it guards (tests/test_judge.py and tests/test_reward.py check each): answers, the Best-of-N pool and verdicts
are appended as they come, so a killed run loses at most one batch and resumes where it stopped (a torn last line
is cut off: common.append_jsonl). Stored answers are reused only when the same weights made them, told by the
content hash of model.safetensors (not its path, nor its mtime: retraining into the same run directory must not
bring back the old model's answers), and the same generation settings; anything else is sampled again, with a
one-line reason. A verdict is reused only for the byte-identical request (judge.py's judgment keys).
"""

import hashlib
import json
from pathlib import Path

import common
import model as gpt
import reward


def weights_fingerprint(path: str) -> str:
    """What identifies a model's weights: "sha256:<16 hex digits>" of its model.safetensors, or "preset:<name>" for
    a preset (hub weights are fixed; "tiny" is a random init seeded by --seed). Hashing reads the file once (seconds
    for gpt2-xl); the hash is cached under the file's path, size, mtime and inode, which any rewrite changes."""
    if path in gpt.PRESETS:
        return f"preset:{path}"
    file = Path(path) / "model.safetensors" if Path(path).is_dir() else Path(path)
    if not file.exists():
        raise FileNotFoundError(f"no model at {file}: give a preset, a .safetensors file or a checkpoint directory")
    st = file.stat()
    stamp = json.dumps([str(file.resolve()), st.st_size, st.st_mtime_ns, st.st_ino])
    cached = common.cache_dir() / "fingerprints" / f"{hashlib.sha256(stamp.encode()).hexdigest()[:16]}.txt"
    if cached.exists():
        return cached.read_text()
    fingerprint = "sha256:" + common.sha256_file(file)[:16]
    common.atomic_write(cached, lambda f: f.write(fingerprint.encode()))
    return fingerprint


def scorer_fingerprint(spec: str) -> str | None:
    """weights_fingerprint of the checkpoint a --scorer spec reads, or None when there is none (load_scorer says why)."""
    path = Path(reward.parse_scorer(spec)[1])
    return weights_fingerprint(str(path)) if (path / "model.safetensors").exists() else None


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

