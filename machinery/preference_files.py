"""Preference data from outside HH: your own JSON-lines files, checked whole, and SHP fetched from the hub (issue 27).

    python data.py --dataset=pairs.jsonl                   # one file: a seeded share of its prompts is held out
    python data.py --dataset=train.jsonl,test.jsonl        # a test file of your own
    python data.py --dataset=shp:askculinary,askbaking     # Stanford Human Preferences, two of its 18 subreddits

What it guards (no speed-up): nothing trains on a file that is half right. Every line is read and checked before a
single pair is returned, and each error names the file, the line and what to do: a byte that is not UTF-8, a line
that is not JSON, a missing key, messages whose roles are out of order or that do not end with an assistant turn, a
file with no usable pair. Lines that are well formed but teach nothing (an empty answer, chosen == rejected) are
counted and skipped, in one summary line. data.py holds the lesson: what each format becomes in HH text, and why.

SHP (Ethayarajh et al., "Understanding Dataset Difficulty with V-Usable Information", ICML 2022): 385K pairs of
Reddit comments to one post, the one with the higher score preferred. The hub holds one folder per subreddit with
train.json, validation.json and test.json, each JSON lines; we fetch them with common.download (resumable,
verified, atomic) as HH's files are, and filter as `shp_pairs` says.
"""

import gzip
import hashlib
import json
import re
import zlib
from collections import Counter, defaultdict
from pathlib import Path

from machinery import common

# ----------------------------------------------------------------------------------------------------------------
# 1. Your own files: read, checked line by line, three formats

ROLES = ("system", "user", "assistant")
HELP = ("every line is one JSON object: {\"prompt\", \"chosen\", \"rejected\"} (strings, or lists of "
        "{\"role\", \"content\"} messages), or {\"chosen\", \"rejected\"} holding whole conversations; "
        "see README, \"Your own data\"")


class PreferenceFileError(ValueError):
    """A preference file that cannot be used as it is; the message names the file, the line and what to do."""


def dataset_files(dataset: str) -> tuple[Path, ...] | None:
    """--dataset=pairs.jsonl or train.jsonl,test.jsonl (.jsonl.gz too) -> the paths, which must exist; else None."""
    files = tuple(dataset.split(","))
    if len(files) > 2 or not all(f.endswith((".jsonl", ".jsonl.gz")) for f in files):
        return None
    for f in files:
        if not Path(f).is_file():
            raise PreferenceFileError(f"no preference file at {f}: give a .jsonl or .jsonl.gz file (README, "
                                      "\"Your own data\"), or hh, shp or synthetic")
    return tuple(map(Path, files))


def file_text(path: Path) -> str:
    """The whole file as text (.gz decompressed); a byte that is not UTF-8 is an error naming its line."""
    path = Path(path)
    if not path.is_file():
        raise PreferenceFileError(f"no preference file at {path}: give a .jsonl or .jsonl.gz file, 'hh', 'shp' or "
                                  "'synthetic'")
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (gzip.BadGzipFile, EOFError, zlib.error) as e:
            raise PreferenceFileError(f"{path}: not a whole gzip file ({e}); compress it again, or give the .jsonl")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise PreferenceFileError(f"{path}, line {line}: byte 0x{raw[e.start]:02x} at column {column} is not UTF-8; "
                                  "save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 in.jsonl > out.jsonl`)")


def file_format(record: dict) -> str:
    """standard, conversational or implicit (TRL's names), from the keys and their types; ValueError otherwise."""
    missing = [key for key in ("chosen", "rejected") if key not in record]
    if missing:
        raise ValueError(f"missing key {missing[0]!r} (found {sorted(record)}); {HELP}")
    values = [record[key] for key in ("prompt", "chosen", "rejected") if key in record]
    if all(isinstance(v, str) for v in values):
        return "standard" if "prompt" in record else "implicit"
    if all(isinstance(v, list) for v in values):
        return "conversational" if "prompt" in record else "implicit"
    types = {key: type(record[key]).__name__ for key in ("prompt", "chosen", "rejected") if key in record}
    raise ValueError(f"'prompt', 'chosen' and 'rejected' must all be strings or all lists of messages, got {types}")


def check_messages(messages: list, key: str, ends_with: str, answer: bool = False) -> None:
    """Messages {"role", "content"}: an optional system message first, then user and assistant taking turns from a
    user, the last one `ends_with`; an answer (conversational chosen/rejected) is one assistant message."""
    if not messages:
        raise ValueError(f"{key!r} holds no messages")
    for i, m in enumerate(messages, start=1):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"{key!r} message {i} is not {{\"role\": one of {'/'.join(ROLES)}, \"content\": string}}: "
                             f"{json.dumps(m)[:80]}")
    roles = [m["role"] for m in messages]
    if answer:
        if roles != ["assistant"]:
            raise ValueError(f"{key!r} holds roles {roles}: make it one assistant message, the answer to the prompt")
        return
    turns = roles[1:] if roles[0] == "system" else roles
    for i, role in enumerate(turns):
        if role != ("user", "assistant")[i % 2]:
            raise ValueError(f"role out of order in {key!r}: message {i + 1 + len(roles) - len(turns)} is {role!r}, "
                             f"expected {('user', 'assistant')[i % 2]!r} (roles {roles}); after an optional first "
                             "system message, user and assistant take turns, starting with user")
    if not turns or turns[-1] != ends_with:
        raise ValueError(f"{key!r} does not end with an {ends_with} turn (roles {roles}): end it with "
                         + ("the user's turn to be answered" if ends_with == "user" else "the assistant answer rated"))


def read_pairs(path: Path, to_pair) -> tuple[list[dict], Counter, str]:
    """Every line of `path` -> {"prompt", "chosen", "rejected"} through to_pair(format, record), which renders the
    HH text (data.py) and raises ValueError for a line it cannot use. The whole file is read and checked first: an
    error names its line; a pair with an empty answer, or chosen == rejected, is counted and skipped.
    -> (pairs, counts, the file's format)."""
    pairs, counts, first_format = [], Counter(), None
    for line_no, line in enumerate(file_text(path).split("\n"), start=1):  # not splitlines(): JSON may hold U+2028
        if not line.strip():
            continue
        try:
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"not JSON ({e.msg} at column {e.colno}); {HELP}") from None
            if not isinstance(record, dict):
                raise ValueError(f"a JSON {type(record).__name__}, not an object; {HELP}")
            kind = file_format(record)
            first_format = first_format or (kind, line_no)
            if kind != first_format[0]:
                raise ValueError(f"{kind} format, but line {first_format[1]} is {first_format[0]}: use one format "
                                 "per file")
            if kind == "conversational":
                check_messages(record["prompt"], "prompt", ends_with="user")
            for key in ("chosen", "rejected") if kind != "standard" and isinstance(record["chosen"], list) else ():
                check_messages(record[key], key, ends_with="assistant", answer=kind == "conversational")
            pair = to_pair(kind, record)
        except ValueError as e:
            raise PreferenceFileError(f"{path}, line {line_no}: {e}") from None
        counts["lines"] += 1
        if not pair["chosen"].strip() or not pair["rejected"].strip():
            counts["empty"] += 1
        elif pair["chosen"] == pair["rejected"]:
            counts["identical"] += 1
        else:
            pairs.append(pair)
    if not pairs:
        raise PreferenceFileError(f"{path}: no usable pairs ({counts['lines']} lines, {counts['empty']} with an empty "
                                  f"answer, {counts['identical']} with chosen == rejected); {HELP}")
    return pairs, counts, first_format[0]


HELD_OUT, HELD_OUT_SEED = 0.1, 0  # one file given: this share of its prompts (seeded; at least one) is its test split


def load_file(files: tuple[str, ...], split: str, to_pair) -> list[dict]:
    """--dataset=train.jsonl,test.jsonl: the split's file, read whole (read_pairs), one summary line. One file,
    --dataset=pairs.jsonl: HELD_OUT of its prompts are the test split, the rest train (held_out), printed."""
    path = files[("train", "test").index(split)] if len(files) == 2 else files[0]
    pairs, counts, kind = read_pairs(Path(path), to_pair)
    print(f"{path} ({kind} format): {len(pairs)} pairs from {counts['lines']} lines; skipped {counts['empty']} with an "
          f"empty answer, {counts['identical']} with chosen == rejected")
    if len(files) == 2:
        return pairs
    train, test = held_out(pairs, HELD_OUT, HELD_OUT_SEED)
    print(f"{path}: {len(test)} pairs ({HELD_OUT:.0%} of the prompts, seed {HELD_OUT_SEED}) held out as the test split, "
          f"{len(train)} to train on; or give a test file of your own: --dataset={path},test.jsonl")
    return train if split == "train" else test


def held_out(pairs: list[dict], share: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, test) of one file: a seeded `share` of its distinct prompts (at least one) and all their pairs go to
    test, so that no test prompt was seen in training."""
    prompts = sorted({p["prompt"] for p in pairs}, key=lambda p: hashlib.sha256(f"{seed}/{p}".encode()).digest())
    if len(prompts) < 2:
        raise PreferenceFileError(f"all {len(pairs)} pairs share one prompt, so none can be held out for testing; "
                                  "add pairs with other prompts, or give a test file: --dataset=train.jsonl,test.jsonl")
    test = set(prompts[: max(1, round(share * len(prompts)))])
    return [p for p in pairs if p["prompt"] not in test], [p for p in pairs if p["prompt"] in test]


def cache_path(dataset: str, split: str, settings: list, source, code: list) -> Path:
    """Where data.tokenize_dataset caches its arrays: named by a hash of everything they depend on, so an edited
    file, another setting, or an edit to the code (files `code`) tokenizes again instead of loading stale arrays."""
    key = {"dataset": dataset, "split": split, "settings": settings, "source": source,
           "code": [hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in code]}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    name = re.sub(r"[^\w-]+", "_", dataset)[-80:]  # "hh:helpful-base,harmless-base" -> "hh_helpful-base_harmless-base"
    return common.cache_dir() / "tokenized" / f"{name}-{split}-{digest}.npz"


# ----------------------------------------------------------------------------------------------------------------
# 2. The hub's files: HH-RLHF's, and SHP's filtered

HH_SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")


def hh_subsets(subsets: list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """None -> all four; every name is checked before anything is downloaded."""
    subsets = tuple(subsets or HH_SUBSETS)
    for subset in subsets:
        common.check_choice(subset, HH_SUBSETS, "HH subset")
    return subsets


def hh_file(subset: str, split: str) -> Path:
    """One HH file in the cache, downloaded on first use (resumable, retried, atomic: see common.download)."""
    common.check_choice(split, ("train", "test"), "split")
    url = common.hf_url(f"datasets/Anthropic/hh-rlhf/resolve/main/{subset}/{split}.jsonl.gz")
    return common.download(url, common.cache_dir() / "hh-rlhf" / subset / f"{split}.jsonl.gz")




SHP_SUBREDDITS = ("askacademia", "askanthropology", "askbaking", "askcarguys", "askculinary", "askdocs",
                  "askengineers", "askhistorians", "askhr", "askphilosophy", "askphysics", "askscience",
                  "asksciencefiction", "asksocialscience", "askvet", "changemyview", "explainlikeimfive", "legaladvice")
MIN_SCORE_RATIO = 2.0  # the authors' loader drops pairs whose higher score is less than twice the lower
MAX_PAIRS_PER_POST = 5  # the dataset card's advice against overfitting to posts with many comments
SHP_DROPS = {  # counter key -> what it means; the summary line prints each count
    "ratio": f"score ratio < {MIN_SCORE_RATIO:g}",
    "per_post": f"over {MAX_PAIRS_PER_POST} per post",
    "empty": "an empty comment",
    "identical": "identical comments",
}


def shp_subreddits(names: tuple[str, ...] | None) -> tuple[str, ...]:
    """None -> all 18; every name is checked before anything is downloaded."""
    for name in names or ():
        common.check_choice(name, SHP_SUBREDDITS, "SHP subreddit")
    return names or SHP_SUBREDDITS


def shp_file(subreddit: str, split: str) -> Path:
    """<subreddit>/<split>.json of stanfordnlp/SHP in the cache, downloaded on first use (common.download)."""
    common.check_choice(subreddit, SHP_SUBREDDITS, "SHP subreddit")
    common.check_choice(split, ("train", "validation", "test"), "split")
    url = common.hf_url(f"datasets/stanfordnlp/SHP/resolve/main/{subreddit}/{split}.json")
    return common.download(url, common.cache_dir() / "shp" / subreddit / f"{split}.json")


def load_shp(subreddits: tuple[str, ...], split: str, prompt_of, answer_of) -> list[dict]:
    """SHP pairs of these subreddits (shp_pairs), one summary line with the drops by reason."""
    pairs, counts = [], Counter()
    for subreddit in subreddits:
        pairs += shp_pairs(shp_file(subreddit, split), prompt_of, answer_of, counts)
    dropped = ", ".join(f"{counts[key]} {what}" for key, what in SHP_DROPS.items())
    print(f"shp {split} ({len(subreddits)} subreddits): {len(pairs)} pairs from {counts['rows']} rows; dropped {dropped}")
    return pairs


def source_files(kind: str, names: tuple, split: str) -> list[Path]:
    """The files a dataset (data.dataset_source's kind and names) is read from, downloaded if need be; [] for
    synthetic. One preference file and its held-out share, or a train file and a test file: both files."""
    hub = {"hh": hh_file, "shp": shp_file}
    return [hub[kind](name, split) for name in names] if kind in hub else list(names) if kind == "file" else []


def shp_pairs(path: Path, prompt_of, answer_of, counts: Counter) -> list[dict]:
    """SHP's rows of one file -> pairs {"prompt", "chosen", "rejected"}, grouped by post. prompt_of(post text) and
    answer_of(comment) render the HH text (data.py). Dropped, and counted in `counts` (SHP_DROPS):
      - a pair whose scores are less than MIN_SCORE_RATIO apart, as the authors' loader does (their own data
        already holds only ratios >= 2 in the train split, but not in every release);
      - beyond MAX_PAIRS_PER_POST pairs of one post, the pairs with the smallest score ratios (the least sure
        preferences). The dataset card advises this; the authors' loader (preference_datasets.get_shp) keeps all;
      - an empty comment, or two identical ones.
    Each post's pair whose chosen comment has the highest score comes last, so data.one_per_prompt (the last pair
    of each prompt) makes the post's best answer its SFT target, as the authors' loader's sft_target does."""
    posts = defaultdict(list)
    for line_no, line in enumerate(file_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            post, a, b = row["history"], row["human_ref_A"], row["human_ref_B"]
            score_a, score_b, a_wins = float(row["score_A"]), float(row["score_B"]), row["labels"] == 1
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise PreferenceFileError(f"{path}, line {line_no}: not an SHP row ({type(e).__name__}: {e}); delete the "
                                      "file to download it again, or check HF_ENDPOINT") from None
        counts["rows"] += 1
        (chosen, score_c), (rejected, score_r) = ((a, score_a), (b, score_b))[:: 1 if a_wins else -1]
        ratio = max(score_c, score_r) / max(min(score_c, score_r), 1e-9)
        if ratio < MIN_SCORE_RATIO:
            counts["ratio"] += 1
        elif not chosen.strip() or not rejected.strip():
            counts["empty"] += 1
        elif chosen.strip() == rejected.strip():
            counts["identical"] += 1
        else:
            posts[post].append((ratio, score_c, chosen, rejected))
    pairs = []
    for post, rows in posts.items():
        kept = sorted(rows, key=lambda r: -r[0])[:MAX_PAIRS_PER_POST]  # the surest preferences
        counts["per_post"] += len(rows) - len(kept)
        kept.sort(key=lambda r: r[1])  # the best-scored chosen comment last: the post's SFT target
        prompt = prompt_of(post)
        pairs += [{"prompt": prompt, "chosen": answer_of(c), "rejected": answer_of(r)} for _, _, c, r in kept]
    return pairs
