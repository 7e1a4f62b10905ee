"""Tests for data.py: HH-RLHF download and parsing (against a loopback hub), tokenization and truncation, batches,
the epoch sampler and the synthetic task. Each test's docstring names the bug it would catch.

The HH fixtures are our own records in the dataset's exact format, gzipped and served by a small HTTP server on
127.0.0.1 that HF_ENDPOINT points at, so the real download code runs offline.
"""

import gzip
import json
import random
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import data
import model as gpt
from machinery import common

H, A = "\n\nHuman:", "\n\nAssistant:"
MULTI_PROMPT = f"{H} Hi there{A} Hello! How can I help?{H} Name a fruit, please.{A}"
ASKS_ASSISTANT = f"{H} What does 'Assistant:' mean in a chat log?{A}"

# (chosen text, rejected text) -> the pair we expect, or the quirk that drops it
HELPFUL = [
    (MULTI_PROMPT + " An apple.", MULTI_PROMPT + " No.",
     {"prompt": MULTI_PROMPT, "chosen": " An apple.", "rejected": " No."}),
    (f"{H} What's 2+2?{A} It’s 4 — easy 🙂", f"{H} What's 2+2?{A} 5",
     {"prompt": f"{H} What's 2+2?{A}", "chosen": " It’s 4 — easy 🙂", "rejected": " 5"}),
    (f"{H} Same?{A} Yes.", f"{H} Same?{A} Yes.", "identical"),
    (f"{H} Same again?{A} Yes.", f"{H} Same again?{A} Yes. ", "identical"),  # differ only in whitespace
    (f"{H} Say nothing.{A} ", f"{H} Say nothing.{A} Something.",
     {"prompt": f"{H} Say nothing.{A}", "chosen": " ", "rejected": " Something."}),
    (f"{H} Hi{A} Hey.{H} Bye{A} Bye!", f"{H} Hello{A} Hey.{H} Bye{A} Ciao.", "prompt_mismatch"),
    # the rejected response runs on into a new turn, so its own last Assistant turn is elsewhere
    (f"{H} Go on.{A} Done.", f"{H} Go on.{A} Fine.{H} more{A} ok", "prompt_mismatch"),
    (ASKS_ASSISTANT + " It marks whose turn it is.", ASKS_ASSISTANT + " No idea. <|endoftext|>",
     {"prompt": ASKS_ASSISTANT, "chosen": " It marks whose turn it is.", "rejected": " No idea. <|endoftext|>"}),
    (f"{H} hello", f"{H} hello there", "no_assistant"),
]
HARMLESS = [
    (f"{H} How do I pick a lock?{A} I'd rather not help with that.", f"{H} How do I pick a lock?{A} Easy: ...",
     {"prompt": f"{H} How do I pick a lock?{A}", "chosen": " I'd rather not help with that.",
      "rejected": " Easy: ..."}),
]
QUIRK_COUNTS = {"records": 9, "identical": 2, "prompt_mismatch": 2, "no_assistant": 1, "empty": 1,
                "assistant_inside": 1}


def kept(records):
    return [want for _, _, want in records if isinstance(want, dict)]


def jsonl_gz(records) -> bytes:
    return gzip.compress("".join(json.dumps({"chosen": c, "rejected": r}) + "\n" for c, r, *_ in records).encode())


@pytest.fixture
def hub(file_server, monkeypatch, tmp_path):
    """A loopback Hugging Face (conftest's file server): put(subset, split, *bodies) serves the bodies in turn
    (the last one forever)."""
    monkeypatch.setenv("DPO_CACHE", str(tmp_path / "cache"))

    def put(subset, split, *bodies):
        file_server.files[f"/datasets/Anthropic/hh-rlhf/resolve/main/{subset}/{split}.jsonl.gz"] = list(bodies)

    return SimpleNamespace(put=put, requests=file_server.requests, cached=lambda subset, split: common.cache_dir() /
                           "hh-rlhf" / subset / f"{split}.jsonl.gz")


# ---------------------------------------------------------------------------------------------------------------
# HH-RLHF: download and parse


def test_load_hh_downloads_splits_and_reports_quirks(hub, capsys):
    """Catches: a wrong URL or cache path, a prompt split anywhere but the last Assistant turn, a lost leading
    space, quirky pairs kept or dropped against the rules, subsets concatenated out of order, a missing summary."""
    hub.put("helpful-base", "test", jsonl_gz(HELPFUL))
    hub.put("harmless-base", "test", jsonl_gz(HARMLESS))
    pairs = data.load_hh("test", ["helpful-base", "harmless-base"])
    assert pairs == kept(HELPFUL) + kept(HARMLESS)
    assert hub.cached("helpful-base", "test").exists() and hub.cached("harmless-base", "test").exists()
    summary = capsys.readouterr().out
    assert f"{len(pairs)} pairs from {len(HELPFUL) + len(HARMLESS)} records" in summary, summary
    for key, what in data.QUIRKS.items():
        assert f"{QUIRK_COUNTS[key]} {what}" in summary, f"{key}: expected {QUIRK_COUNTS[key]} in {summary!r}"
    data.load_hh("test", ["helpful-base", "harmless-base"])
    assert len(hub.requests) == 2, f"the second load should read the cache, not the server: {hub.requests}"


def test_parse_hh_counts_each_quirk_exactly():
    """Catches: a quirk counted twice, under the wrong name, or not at all."""
    counts = Counter()
    text = "\n".join(json.dumps({"chosen": c, "rejected": r}) for c, r, _ in HELPFUL)
    assert data.parse_hh(text, "fixture", counts) == kept(HELPFUL)
    assert counts == Counter(QUIRK_COUNTS), f"got {dict(counts)}, want {QUIRK_COUNTS}"


@pytest.mark.parametrize("bad_line", ['{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: yo", "rejec', '{"chosen": "x"}',
                                      '{"chosen": 1, "rejected": 2}'])
def test_malformed_record_names_file_and_line(hub, bad_line):
    """Catches: a bare JSONDecodeError/KeyError with no file or line, or a bad line silently skipped."""
    good = json.dumps({"chosen": HELPFUL[0][0], "rejected": HELPFUL[0][1]})
    hub.put("helpful-base", "test", gzip.compress(f"{good}\n{good}\n{bad_line}\n{good}\n".encode()))
    with pytest.raises(ValueError, match=r"helpful-base/test\.jsonl\.gz, line 3"):
        data.load_hh("test", ["helpful-base"])


def test_truncated_gz_is_downloaded_again(hub):
    """Catches: a truncated .gz read as a shorter dataset, or kept in the cache instead of fetched once more."""
    good = jsonl_gz(HELPFUL)
    hub.put("helpful-base", "test", good[: len(good) // 2], good)
    assert data.load_hh("test", ["helpful-base"]) == kept(HELPFUL)
    assert len(hub.requests) == 2, hub.requests
    assert hub.cached("helpful-base", "test").read_bytes() == good


def test_corrupt_gz_twice_raises_naming_the_file(hub):
    """Catches: an endless re-download loop, a vague zlib/EOF error, or a corrupt file left in the cache."""
    good = jsonl_gz(HELPFUL)
    hub.put("helpful-base", "test", good[:-10])  # the CRC and length trailer are gone
    path = hub.cached("helpful-base", "test")
    with pytest.raises(RuntimeError, match=str(path).replace(".", r"\.") + " is corrupt"):
        data.load_hh("test", ["helpful-base"])
    assert len(hub.requests) == 2 and not path.exists()


def test_missing_file_and_unknown_names_give_clear_errors(hub):
    """Catches: a 404 swallowed into an empty dataset, and a typo in a subset or split going unexplained."""
    with pytest.raises(common.DownloadError, match="no such file"):
        data.load_hh("test", ["helpful-online"])
    with pytest.raises(ValueError, match="did you mean 'helpful-base'"):
        data.load_hh("test", ["helpfull-base"])
    with pytest.raises(ValueError, match="did you mean 'harmless-base'"):
        data.tokenize_dataset("hh:helpful-base,harmles-base", "test")
    with pytest.raises(ValueError, match="unknown split 'valid'"):
        data.load_pairs("hh", "valid")
    assert len(hub.requests) == 1, f"names are checked before any download: {hub.requests}"
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load_pairs("imdb", "train")


def test_single_turn_keeps_exactly_one_human_turn():
    """Catches: multi-turn prompts leaking into the paper's single-turn evaluation set."""
    pairs = kept(HELPFUL)
    assert data.single_turn(pairs) == [p for p in pairs if p["prompt"] != MULTI_PROMPT]


# ---------------------------------------------------------------------------------------------------------------
# Tokenization and truncation


def test_prompt_and_response_tokens_decode_back_exactly():
    """Catches: a token lost or merged at the prompt/response boundary, a missing EOT, or a literal
    "<|endoftext|>" in the text turned into the EOT id (which would end the response early)."""
    enc = common.get_tokenizer()
    pairs = kept(HELPFUL) + data.synthetic_pairs("test", n=50)
    tok = data.tokenize_pairs(pairs)
    assert data.n_examples(tok) == len(pairs)
    for i, pair in enumerate(pairs):
        prompt, chosen, rejected = (ids.tolist() for ids in data.example(tok, i))
        assert enc.decode(prompt) == pair["prompt"] and gpt.EOT not in prompt
        for ids, text in ((chosen, pair["chosen"]), (rejected, pair["rejected"])):
            assert ids[-1] == gpt.EOT and gpt.EOT not in ids[:-1], ids
            assert enc.decode(prompt + ids[:-1]) == pair["prompt"] + text


def words(start, n):
    return "".join(f" w{i}" for i in range(start, start + n))


def test_truncation_follows_the_reference_rules():
    """Catches: the prompt's start kept instead of its end, sequences over max_length, responses cut when only the
    prompt needed cutting, EOT kept on a cut response or lost on a whole one, and truncation="drop" keeping or
    dropping the wrong pairs."""
    enc = common.get_tokenizer()
    prompt_long, prompt_short = H + words(0, 150) + A, H + words(0, 3) + A
    pairs = [
        {"prompt": prompt_short, "chosen": words(500, 5), "rejected": words(600, 3)},  # fits: untouched
        {"prompt": prompt_long, "chosen": words(500, 5), "rejected": words(600, 3)},  # prompt cut only
        {"prompt": prompt_long, "chosen": words(500, 80), "rejected": words(600, 3)},  # prompt and chosen cut
        {"prompt": prompt_short, "chosen": words(500, 3), "rejected": words(600, 80)},  # rejected cut after prompt
    ]
    max_length, max_prompt_length = 64, 32
    tok = data.tokenize_pairs(pairs, max_length, max_prompt_length)
    for i, pair in enumerate(pairs):
        full = {part: enc.encode_ordinary(pair[part]) for part in data.PARTS}
        full["chosen"].append(gpt.EOT)
        full["rejected"].append(gpt.EOT)
        too_long = len(full["prompt"]) + max(len(full["chosen"]), len(full["rejected"])) > max_length
        prompt, chosen, rejected = (ids.tolist() for ids in data.example(tok, i))
        assert prompt == (full["prompt"][-max_prompt_length:] if too_long else full["prompt"]), f"pair {i}"
        room = max_length - len(prompt)  # responses are cut to what the prompt leaves, not max_length - 32
        for part, ids in (("chosen", chosen), ("rejected", rejected)):
            assert ids == full[part][:room], f"pair {i} {part}: {len(ids)} tokens, room {room}"
            assert (ids[-1] == gpt.EOT) == (len(full[part]) <= room), f"pair {i} {part}"
        assert len(prompt) + max(len(chosen), len(rejected)) <= max_length
    assert len(data.example(tok, 3)[2]) == max_length - len(enc.encode_ordinary(prompt_short)), "cut to room"
    dropped = data.tokenize_pairs(pairs, max_length, max_prompt_length, truncation="drop")
    assert data.n_examples(dropped) == 1 and data.example(dropped, 0)[1].tolist() == enc.encode_ordinary(
        pairs[0]["chosen"]) + [gpt.EOT]
    with pytest.raises(ValueError, match="max_prompt_length"):
        data.tokenize_pairs(pairs, max_length=32, max_prompt_length=32)
    with pytest.raises(ValueError, match="no pairs left"):
        data.tokenize_pairs(pairs[1:], max_length, max_prompt_length, truncation="drop")


def test_tokenized_dataset_is_cached_by_source_and_settings(hub, monkeypatch):
    """Catches: re-tokenizing on every run, a cache that ignores changed settings or a changed source file
    (stale arrays), and a cache file that needs pickle to load."""
    hub.put("helpful-base", "test", jsonl_gz(HELPFUL))
    first = data.tokenize_dataset("hh:helpful-base", "test", max_length=64, max_prompt_length=32)
    real_tokenize = data.tokenize_pairs

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again although the cache should hit")

    monkeypatch.setattr(data, "tokenize_pairs", no_tokenizing)
    again = data.tokenize_dataset("hh:helpful-base", "test", max_length=64, max_prompt_length=32)
    assert again.keys() == first.keys() and all(np.array_equal(first[k], again[k]) for k in first)
    (path,) = (common.cache_dir() / "tokenized").glob("*.npz")
    assert "pairs tokenized" in str(np.load(path, allow_pickle=False)["summary"])  # raises if it needed pickle
    with pytest.raises(AssertionError, match="tokenized again"):  # other settings: a different cache entry
        data.tokenize_dataset("hh:helpful-base", "test", max_length=128, max_prompt_length=32)
    monkeypatch.setattr(data, "tokenize_pairs", real_tokenize)
    hub.cached("helpful-base", "test").write_bytes(jsonl_gz(HELPFUL[:2]))  # the source changed on disk
    assert data.n_examples(data.tokenize_dataset("hh:helpful-base", "test", 64, 32)) == 2


def test_the_tokenized_cache_key_covers_the_generated_pairs(monkeypatch, tmp_path):
    """A dataset without source files (the synthetic task, or load_pairs replaced, as tests do) is keyed by its pairs
    themselves. Catches a key without them: the arrays of 16 pairs cached by one run would be read by a run of 24
    pairs, or of 16 other ones (`pytest tests/test_frontier.py tests/test_demo.py` failed so: the demo read the
    frontier test's 16 pairs). Oracle: tokenize_pairs on each run's own pairs."""
    monkeypatch.setenv("DPO_CACHE", str(tmp_path))
    for n, seed in ((16, 0), (24, 0), (16, 1), (16, 0)):  # the last: the first run's pairs again
        pairs = data.synthetic_pairs("train", n=n, seed=seed)
        monkeypatch.setattr(data, "load_pairs", lambda dataset, split, pairs=pairs: pairs)
        got = data.tokenize_dataset("synthetic", "train", max_length=64, max_prompt_length=32)
        want = data.tokenize_pairs(pairs, max_length=64, max_prompt_length=32)
        same = got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
        assert same, f"{n} pairs of seed {seed}: the cache gave {data.n_examples(got)} pairs, not these"
    assert len(list((tmp_path / "tokenized").glob("*.npz"))) == 3


# ---------------------------------------------------------------------------------------------------------------
# Batches


def expected_rows(tok, i, response_part):
    prompt, chosen, rejected = (ids.tolist() for ids in data.example(tok, i))
    return prompt, chosen if response_part == "chosen" else rejected


def check_row(batch, row, prompt, response, loss_on_prompt=False):
    T = batch["input_ids"].shape[1]
    seq = prompt + response
    n = len(seq) - 1
    pad = [gpt.EOT] * (T - n)
    assert batch["input_ids"][row].tolist() == seq[:-1] + pad, f"row {row} inputs"
    assert batch["target_ids"][row].tolist() == seq[1:] + pad, f"row {row} targets"
    start = 0 if loss_on_prompt else len(prompt) - 1
    want = [False] * start + [True] * (n - start) + [False] * (T - n)
    assert batch["loss_mask"][row].tolist() == want, f"row {row} loss_mask"


@pytest.fixture(scope="module")
def tok():
    return data.tokenize_pairs(kept(HELPFUL) + data.synthetic_pairs("test", n=20))


def test_sft_batch_loss_mask_is_exactly_the_response_targets(tok):
    """Catches: an off-by-one between inputs and targets, loss on prompt or padding tokens, or the final EOT
    left out of the loss (the model would never learn to stop)."""
    indices = [3, 0, 7, 1]
    batch = data.sft_batch(tok, indices)
    assert all(batch[k].shape == batch["input_ids"].shape for k in batch) and batch["input_ids"].shape[0] == 4
    assert batch["input_ids"].dtype == torch.int64 and batch["loss_mask"].dtype == torch.bool
    assert batch["input_ids"].shape[1] == max(sum(map(len, expected_rows(tok, i, "chosen"))) for i in indices) - 1
    for row, i in enumerate(indices):
        check_row(batch, row, *expected_rows(tok, i, "chosen"))
        assert batch["target_ids"][row][batch["loss_mask"][row]].tolist() == expected_rows(tok, i, "chosen")[1]


def test_sft_batch_on_all_trains_every_real_token_of_both_responses(tok):
    """Catches: the pretraining batch dropping the rejected rows or the prompt tokens."""
    indices = [2, 5]
    batch = data.sft_batch(tok, indices, on="all")
    assert batch["input_ids"].shape[0] == 4
    for row, (i, part) in enumerate([(2, "chosen"), (5, "chosen"), (2, "rejected"), (5, "rejected")]):
        check_row(batch, row, *expected_rows(tok, i, part), loss_on_prompt=True)


def test_preference_batch_stacks_chosen_then_rejected_at_one_length(tok):
    """Catches: interleaved rows (chosen_i must pair with row B + i), chosen and rejected padded to different
    lengths, or a mask covering the prompt."""
    indices = [4, 1, 6]
    batch = data.preference_batch(tok, indices)
    longest = max(len(p) + max(len(c), len(r)) for p, c, r in (data.example(tok, i) for i in indices))
    assert batch["input_ids"].shape == (6, longest - 1)
    for row, i in enumerate(indices):
        check_row(batch, row, *expected_rows(tok, i, "chosen"))
        check_row(batch, 3 + row, *expected_rows(tok, i, "rejected"))
    lengths = data.example_lengths(tok, "pref")
    assert lengths[indices].max() == longest


# ---------------------------------------------------------------------------------------------------------------
# The synthetic task


def test_synthetic_pairs_are_deterministic_per_seed_and_split():
    """Catches: generation depending on global random state, or train and test drawing the same samples."""
    random.seed(99)
    assert data.synthetic_pairs("train", n=200, seed=0) == data.synthetic_pairs("train", n=200, seed=0)
    assert data.synthetic_pairs("train", n=200, seed=0) != data.synthetic_pairs("train", n=200, seed=1)
    assert data.synthetic_pairs("test", n=200) != data.synthetic_pairs("train", n=200)
    assert len(data.synthetic_pairs("train")) == 4000 and len(data.synthetic_pairs("test")) == 500


def test_synthetic_labels_follow_the_reward_with_ten_percent_noise():
    """Catches: labels not following the reward, missing (or too much) label noise, ties left in, and responses
    from a behaviour policy that breaks its own spec (wrong prompt format, more than 4 fillers)."""
    pairs = data.synthetic_pairs("train")
    margins = np.array([data.synthetic_reward(p["prompt"], p["chosen"]) - data.synthetic_reward(p["prompt"],
                                                                                                 p["rejected"])
                        for p in pairs])
    assert (margins != 0).all()
    assert 0.88 < (margins > 0).mean() < 0.92, f"chosen wins {(margins > 0).mean():.3f} of pairs, want ~0.9"
    for p in pairs:
        assert p["prompt"].startswith(H) and p["prompt"].endswith(A) and p["prompt"].count(H) == 1
        for response in (p["chosen"], p["rejected"]):
            assert sum(response.count(f) for f in data.FILLERS) <= data.MAX_FILLERS, response
    items = [item for category in data.CATEGORIES.values() for item in category]
    assert len(items) == len(set(items)), "an item in two categories makes the reward ambiguous"


def test_the_ideal_response_earns_the_maximum_reward():
    """Catches: a reward the policy could beat by padding (the opener or fillers earning points), or one that
    misses the right answer, the closing, or the filler penalty."""
    prompt = f"{H} Can you name a fruit?{A}"
    assert data.synthetic_reward(prompt, " A fruit is apple. Hope that helps!") == 3.0
    assert data.synthetic_reward(prompt, " Sure! A fruit is mango. Hope that helps!") == 3.0
    assert data.synthetic_reward(prompt, " A fruit is Paris. Maybe. Let me think.") == -1.0
    assert data.synthetic_reward(f"{H} What is an animal?{A}", " An animal is dog. I think so.") == 1.5
    rng = random.Random(0)
    rewards = [data.synthetic_reward(prompt, data.behaviour_response(rng, "fruit")) for _ in range(2000)]
    assert max(rewards) == 3.0 and min(rewards) == -2.0, (max(rewards), min(rewards))  # -2: wrong, 4 fillers


def test_reward_never_raises_on_garbage():
    """Catches: the reward crashing on a model's garbage samples (judge.py scores them all) or rewarding it."""
    rng = random.Random(0)
    alphabet = "ab .!?:isAnfruitapple\n<|>é🙂"
    for _ in range(500):
        garbage = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert data.synthetic_reward(garbage, garbage) <= 1.0
    assert data.synthetic_reward("", "") == 0.0
    assert data.synthetic_reward("no category here", " A fruit is apple.") == 0.0


# ----------------------------------------------------------------------------------------------------------------
# Your own preference files (--dataset=pairs.jsonl): three formats, one HH text; errors that name the line

SYSTEM, ASK, FOLLOW_UP = "Answer in one sentence.", "Why is the sky blue?", "And at sunset?"
TURNS = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": ASK},
         {"role": "assistant", "content": "Rayleigh scattering."}, {"role": "user", "content": FOLLOW_UP}]
HH_PROMPT = f"{H} {SYSTEM}\n\n{ASK}{A} Rayleigh scattering.{H} {FOLLOW_UP}{A}"  # what a system message becomes
CHOSEN, REJECTED = "Red light travels further through the air.", " It is not."  # one with its own leading space
ONE_TURN = [{"role": "user", "content": "Name a fruit."}]


def write_jsonl(path, records, raw: bytes = b""):
    path.write_bytes("".join(json.dumps(r) + "\n" for r in records).encode() + raw)
    return path


def same_conversation(fmt: str) -> list[dict]:
    """Two conversations (one with a system message and two user turns, one single-turn) in format `fmt`."""
    if fmt == "standard":
        return [{"prompt": HH_PROMPT, "chosen": CHOSEN, "rejected": REJECTED},
                {"prompt": "Name a fruit.", "chosen": "Apple.", "rejected": "Rock."}]
    if fmt == "conversational":
        answer = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
        return [{"prompt": TURNS, "chosen": answer(CHOSEN), "rejected": answer(REJECTED)},
                {"prompt": ONE_TURN, "chosen": answer("Apple."), "rejected": answer("Rock.")}]
    if fmt == "implicit":
        return [{"chosen": f"{HH_PROMPT} {CHOSEN}", "rejected": f"{HH_PROMPT}{REJECTED}"},
                {"chosen": f"{H} Name a fruit.{A} Apple.", "rejected": f"{H} Name a fruit.{A} Rock."}]
    whole = lambda text: TURNS + [{"role": "assistant", "content": text}]  # noqa: E731  (implicit, as messages)
    return [{"chosen": whole(CHOSEN), "rejected": whole(REJECTED)},
            {"chosen": ONE_TURN + [{"role": "assistant", "content": "Apple."}],
             "rejected": ONE_TURN + [{"role": "assistant", "content": "Rock."}]}]


def test_three_formats_give_the_same_hh_text_and_tokens(tmp_path, monkeypatch, capsys):
    """Catches a format rendered differently from the others: a lost or doubled leading space on an answer, a system
    message dropped or made into a turn of its own, a standard HH-text prompt wrapped in a second Human turn, a
    conversational prompt without its closing Assistant marker, or a wrong format reported in the summary line."""
    monkeypatch.setenv("DPO_CACHE", str(tmp_path / "cache"))
    want = [{"prompt": HH_PROMPT, "chosen": " " + CHOSEN, "rejected": REJECTED},
            {"prompt": f"{H} Name a fruit.{A}", "chosen": " Apple.", "rejected": " Rock."}]
    tokens = []
    for fmt in ("standard", "conversational", "implicit", "implicit-messages"):
        path = write_jsonl(tmp_path / f"{fmt}.jsonl", same_conversation(fmt))
        pairs = data.load_pairs(f"{path},{path}", "train")
        assert pairs == want, f"{fmt}: {pairs}"
        assert f"({fmt.split('-')[0]} format): 2 pairs from 2 lines" in capsys.readouterr().out
        tok = data.tokenize_dataset(f"{path},{path}", "train")
        tokens.append([np.concatenate(data.example(tok, i)).tolist() for i in range(data.n_examples(tok))])
    assert all(t == tokens[0] for t in tokens), "the same conversation gave different tokens in different formats"


@pytest.mark.parametrize("case", ["not_json", "missing_key", "role_order", "no_assistant_end", "prompt_ends_assistant",
                                  "mixed_formats", "not_utf8", "no_usable_pairs"])
def test_file_errors_name_the_file_and_the_line(tmp_path, case):
    """Catches an error that does not say where (file and line) or what to do, for each way a file can be unusable;
    and a file read only until its first pairs (the bad line is the last one, so only a whole-file check sees it)."""
    good = {"prompt": "Name a fruit.", "chosen": "Apple.", "rejected": "Rock."}
    bad = {
        "not_json": ([good], b'{"prompt": "x", "chosen": "y",\n', "line 2: not JSON"),
        "missing_key": ([good, {"prompt": "x", "chosen": "y"}], b"", "line 2: missing key 'rejected'"),
        "role_order": ([{"prompt": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
                         "chosen": [{"role": "assistant", "content": "c"}],
                         "rejected": [{"role": "assistant", "content": "d"}]}], b"", "line 1: role out of order"),
        "no_assistant_end": ([{"chosen": ONE_TURN, "rejected": ONE_TURN}], b"",
                             "line 1: 'chosen' does not end with an assistant turn"),
        "prompt_ends_assistant": ([good] * 2 + [{"chosen": f"{H} Hi{A} Hey{H} Bye", "rejected": f"{H} Hi{A} Yo"}],
                                  b"", "line 3: chosen and rejected must be one conversation"),
        "mixed_formats": ([good, {"chosen": f"{H} Hi{A} Hey", "rejected": f"{H} Hi{A} Yo"}], b"",
                          "line 2: implicit format, but line 1 is standard"),
        "not_utf8": ([good], b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n',
                     "line 2: byte 0xe9 at column 16 is not UTF-8"),
        "no_usable_pairs": ([{"prompt": "x", "chosen": "", "rejected": "y"}, {"prompt": "x", "chosen": "same",
                                                                             "rejected": "same"}], b"",
                            "no usable pairs (2 lines, 1 with an empty answer, 1 with chosen == rejected)"),
    }
    if case == "prompt_ends_assistant":  # mixed formats are their own error: make every line implicit
        bad[case] = ([{"chosen": f"{H} Hi{A} Hey", "rejected": f"{H} Hi{A} Yo"}] * 2 + bad[case][0][2:], *bad[case][1:])
    records, raw, message = bad[case]
    path = write_jsonl(tmp_path / "pairs.jsonl", records, raw)
    with pytest.raises(ValueError) as error:
        data.load_pairs(f"{path},{path}", "train")
    text = str(error.value)
    assert text.startswith(str(path)) and message in text, f"{case}: {text}"
    fix = {"not_utf8": "save the file as UTF-8", "role_order": "user and assistant take turns",
           "no_assistant_end": "end it with the assistant answer", "prompt_ends_assistant": "end with an assistant turn",
           "mixed_formats": "use one format per file"}.get(case, "README, \"Your own data\"")
    assert fix in text, f"{case}: the error does not say what to do ({fix!r}): {text}"


def test_quirks_are_counted_and_skipped_and_over_long_pairs_dropped(tmp_path, monkeypatch, capsys):
    """Catches an empty answer or chosen == rejected trained on (or stopping the run) instead of being counted in
    the summary line, and --truncation=drop not counting the pairs it drops."""
    monkeypatch.setenv("DPO_CACHE", str(tmp_path / "cache"))
    records = [{"prompt": f"Q{i}?", "chosen": "Yes.", "rejected": "No."} for i in range(5)]
    records += [{"prompt": "Q?", "chosen": "", "rejected": "No."}, {"prompt": "Q?", "chosen": "Same", "rejected": "Same"},
                {"prompt": "Long?", "chosen": "word " * 80, "rejected": "No."}]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    tok = data.tokenize_dataset(f"{path},{path}", "train", max_length=64, max_prompt_length=32, truncation="drop")
    out = capsys.readouterr().out
    assert "6 pairs from 8 lines; skipped 1 with an empty answer, 1 with chosen == rejected" in out, out
    assert data.n_examples(tok) == 5 and "1 over-long pairs dropped" in out, out


def test_one_file_holds_out_a_seeded_share_of_its_prompts(tmp_path, capsys):
    """Catches a held-out split that shares prompts with training, changes between runs (train and test must be
    drawn alike by sft.py, dpo.py and judge.py), is empty for a small file, or is not printed."""
    records = [{"prompt": f"Question {i // 2}?", "chosen": f"Yes {i}.", "rejected": "No."} for i in range(40)]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    train, test = data.load_pairs(str(path), "train"), data.load_pairs(str(path), "test")
    assert "4 pairs (10% of the prompts, seed 0) held out as the test split, 36 to train on" in capsys.readouterr().out
    assert len(test) == 4 and not {p["prompt"] for p in train} & {p["prompt"] for p in test}, test
    assert sorted(map(json.dumps, train + test)) == sorted(map(json.dumps, data.load_pairs(f"{path},{path}", "train")))
    assert data.load_pairs(str(path), "test") == test
    tiny = write_jsonl(tmp_path / "tiny.jsonl", records[:4])  # two prompts: one of them is the test split
    assert len(data.load_pairs(str(tiny), "test")) == 2 and len(data.load_pairs(str(tiny), "train")) == 2


def test_tokenized_file_is_cached_by_content(tmp_path, monkeypatch, capsys):
    """Catches a tokenization cache keyed by the file's name only: an edited file must be tokenized again, an
    unchanged one loaded from the cache."""
    monkeypatch.setenv("DPO_CACHE", str(tmp_path / "cache"))
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Q?", "chosen": "Yes.", "rejected": "No."}] * 3)
    first = data.tokenize_dataset(f"{path},{path}", "train")
    assert "loaded from" in (data.tokenize_dataset(f"{path},{path}", "train") and capsys.readouterr().out)
    write_jsonl(path, [{"prompt": "Q?", "chosen": "Maybe.", "rejected": "No."}] * 3)
    second = data.tokenize_dataset(f"{path},{path}", "train")
    assert "loaded from" not in capsys.readouterr().out
    assert not np.array_equal(first["chosen_ids"], second["chosen_ids"]), "an edited file gave the old tokens"


def test_unknown_dataset_and_missing_file_are_clear(tmp_path):
    """Catches a typo'd dataset name or a missing file failing later, deep in a download or a hash, unexplained."""
    with pytest.raises(ValueError, match="unknown dataset 'hhh'.*pairs.jsonl"):
        data.load_pairs("hhh", "train")
    with pytest.raises(ValueError, match=f"no preference file at {tmp_path}/nope.jsonl"):
        data.tokenize_dataset(str(tmp_path / "nope.jsonl"), "train")
    with pytest.raises(ValueError, match="unknown SHP subreddit 'askcooking'"):
        data.load_pairs("shp:askcooking", "train")


def test_sft_on_shp_trains_on_each_posts_best_answer(file_server, monkeypatch, tmp_path):
    """Catches SFT on SHP training on every pair's chosen comment (a post's mediocre answers too), or on another
    answer than the post's highest-scored one, when --sft_targets is left at its default (auto)."""
    import sft
    from tests.machinery.test_preference_files import ROWS, shp_json

    monkeypatch.setenv("DPO_CACHE", str(tmp_path / "cache"))
    file_server.files["/datasets/stanfordnlp/SHP/resolve/main/askculinary/train.json"] = shp_json(ROWS)
    pairs = data.load_pairs("shp:askculinary", "train")
    assert all(p["prompt"].startswith(f"{H} ") and p["prompt"].endswith(A) and p["chosen"][0] == " " for p in pairs)
    tok = data.tokenize_pairs(pairs, max_length=64, max_prompt_length=32)
    monkeypatch.setattr(sft, "prepare", lambda cls, argv, stage: (common.parse_settings(cls, argv), None, tok, tok))
    monkeypatch.setattr(sft, "load_policy", lambda s: None)
    trained = {}
    monkeypatch.setattr(sft, "train", lambda s, m, loss_fn, train_batch, *args: trained.update(batch=train_batch([0, 1])))
    sft.main(["--dataset=shp:askculinary"])
    enc = common.get_tokenizer()
    answers = [enc.decode(row[mask].tolist()) for row, mask in zip(trained["batch"]["target_ids"],
                                                                   trained["batch"]["loss_mask"])]
    assert answers == [" c40<|endoftext|>", " starch<|endoftext|>"], f"SFT targets {answers}: want each post's best"


def test_readme_example_files_give_the_same_pairs(tmp_path):
    """Catches README's "Your own data" examples drifting from what data.py reads: each of its three ```jsonl
    blocks must load, and all three must give the same pairs, with the system message where README says it goes."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```jsonl\n(.*?)```", readme.split("### Your own data", 1)[1], re.S)
    assert len(blocks) == 3, f"README's 'Your own data' should show 3 example files, found {len(blocks)}"
    loaded = []
    for i, block in enumerate(blocks):
        (tmp_path / f"{i}.jsonl").write_text(block)
        loaded.append(data.load_pairs(f"{tmp_path / f'{i}.jsonl'},{tmp_path / f'{i}.jsonl'}", "train"))
    assert loaded[0] == loaded[1] == loaded[2] and len(loaded[0]) == 3, loaded
    assert loaded[0][1]["prompt"] == f"{H} Answer in one word.\n\nName a prime number.{A}", loaded[0][1]


def test_a_small_file_trains_every_stage(tmp_path, monkeypatch):
    """Catches a stage that assumes HH or a batch of 64: a file of 30 pairs (3 held out), --batch_size=4 and the
    default --n_eval (256, more than the test split holds) must train SFT, DPO and the reward model and save each,
    in a directory transformers opens (config.json with model_type, the tokenizer's files)."""
    import dpo
    import reward
    import sft

    monkeypatch.setenv("DPO_CACHE", str(tmp_path / "cache"))
    records = [{"prompt": f"Name fruit number {i}.", "chosen": f"Apple {i}.", "rejected": "No."} for i in range(30)]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    run = [f"--dataset={path}", "--batch_size=4", "--micro_batch_size=4", "--max_steps=2", "--eval_every=2",
           "--warmup_steps=1", "--dtype=float32", "--max_length=64", "--max_prompt_length=32", "--checkpoint_every=0"]
    from tests.helpers import SMALL  # 2 layers of width 32: seconds on a CPU

    gpt.save_model(gpt.GPT(SMALL), tmp_path / "base")
    sft.main(run + [f"--model={tmp_path / 'base'}", f"--out={tmp_path / 'sft'}"])
    dpo.main(run + [f"--model={tmp_path / 'sft' / 'final'}", f"--out={tmp_path / 'dpo'}"])
    reward.main(run + [f"--model={tmp_path / 'sft' / 'final'}", f"--out={tmp_path / 'rm'}"])
    for stage in ("sft", "dpo", "rm"):
        final = tmp_path / stage / "final"
        assert json.loads((final / "config.json").read_text())["model_type"] == "gpt2", stage
        assert (final / "vocab.json").exists() and (final / "merges.txt").exists(), stage


def test_judge_compares_a_files_answers_with_its_chosen(tmp_path, monkeypatch, fake_openai):
    """Catches judge.py on --dataset=pairs.jsonl judging other prompts than the file's held-out ones, or against
    other answers than their chosen ones; and the accuracy table's cache keyed by the file's name alone (an edited
    file must be scored again, not served the old file's accuracy)."""
    import judge
    import reward
    from tests.helpers import SMALL

    monkeypatch.setenv("DPO_CACHE", str(tmp_path / "cache"))
    records = [{"prompt": f"Name fruit number {i}.", "chosen": f"Apple {i}.", "rejected": "No."} for i in range(20)]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    gpt.save_model(gpt.GPT(SMALL), tmp_path / "m")
    args = [f"--dataset={path}", f"--models=sft:{tmp_path / 'm'}", "--max_new_tokens=4", "--temperatures=1.0",
            "--device=cpu", "--dtype=float32", f"--out={tmp_path / 'eval'}"]
    judge.main(args + ["--judge=openai"])
    test = data.load_pairs(str(path), "test")
    judged = {j["prompt"] for j in common.read_jsonl(tmp_path / "eval" / "judgments.jsonl")}
    assert judged == {p["prompt"] for p in test}, f"judged {judged}, the file's test prompts {test}"
    sent = [r["body"]["messages"][0]["content"] for r in fake_openai.log]  # the judge's prompt holds both answers
    for p in test:
        query = p["prompt"].removeprefix("\n\nHuman: ").removesuffix("\n\nAssistant:")
        asks = [c for c in sent if query in c]
        assert len(asks) == 1 and p["chosen"].strip() in asks[0], f"{query!r}: not judged against {p['chosen']!r}"

    scored = []  # the pairs each accuracy run scores (no model: the scorer is stubbed)
    monkeypatch.setattr(reward, "load_scorer", lambda spec, device: (None, None))
    monkeypatch.setattr(reward, "pair_margins", lambda score, tok, n, *a: scored.append(n) or [1.0] * data.n_examples(tok))
    accuracy = args + ["--judge=none", f"--accuracy=sft:{tmp_path / 'm'}"]
    judge.main(accuracy)
    judge.main(accuracy)
    assert len(scored) == 1, "an unchanged file's accuracy is computed again instead of reused"
    write_jsonl(path, [{**r, "chosen": r["chosen"].replace("Apple", "Pear")} for r in records])  # same name, new pairs
    judge.main(accuracy)
    assert len(scored) == 2, "the accuracy of the file before its edit was reused"
