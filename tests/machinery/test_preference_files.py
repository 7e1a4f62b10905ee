"""machinery/preference_files.py: SHP fetched from a loopback hub (conftest.py: file_server) and filtered, message
checks, the held-out share. The three formats and the errors as a user meets them are in tests/test_data.py. Each
docstring names the bug the test would catch."""

import json
from collections import Counter

import pytest

from machinery import common, preference_files

# One post of SHP with eight rated comment pairs and one of another post; fields as in stanfordnlp/SHP's files.
# (score_A, score_B, labels): labels = 1 when A is preferred, as the dataset card says.
POST, OTHER = "What is the best way to salt pasta water?", "Why does bread go stale?"
ROWS = [
    (POST, "c40", "c5", 40, 5, 1),      # ratio 8
    (POST, "c3", "c30", 3, 30, 0),      # ratio 10: B preferred
    (POST, "c20", "c4", 20, 4, 1),      # ratio 5
    (POST, "c12", "c4", 12, 4, 1),      # ratio 3
    (POST, "c40", "c12", 40, 12, 1),    # ratio 3.33
    (POST, "c30", "c12", 30, 12, 1),    # ratio 2.5: the sixth surest, cut by the five-per-post cap
    (POST, "c20", "c12", 20, 12, 1),    # ratio 1.67 < 2: dropped for its ratio
    (POST, "", "c5", 10, 5, 1),         # empty comment
    (OTHER, "same", "same", 10, 2, 1),  # identical comments
    (OTHER, "starch", "c2", 9, 2, 1),   # ratio 4.5
]


def shp_json(rows) -> bytes:
    return "".join(json.dumps({"post_id": "p", "domain": "askculinary_train", "upvote_ratio": 0.9, "history": post,
                               "c_root_id_A": "a", "c_root_id_B": "b", "created_at_utc_A": 1, "created_at_utc_B": 2,
                               "score_A": sa, "score_B": sb, "human_ref_A": a, "human_ref_B": b, "labels": label,
                               "seconds_difference": 1.0, "score_ratio": max(sa, sb) / min(sa, sb)}) + "\n"
                   for post, a, b, sa, sb, label in rows).encode()


@pytest.fixture
def shp_hub(file_server, monkeypatch, tmp_path):
    monkeypatch.setenv("DPO_CACHE", str(tmp_path / "cache"))
    file_server.files["/datasets/stanfordnlp/SHP/resolve/main/askculinary/train.json"] = shp_json(ROWS)
    file_server.files["/datasets/stanfordnlp/SHP/resolve/main/askbaking/train.json"] = shp_json(ROWS[-1:])
    return file_server


def test_shp_downloads_filters_and_orders_the_best_answer_last(shp_hub, capsys):
    """Catches a wrong URL or cache path, a pair kept with a score ratio under 2, more than five pairs of one post (or
    the wrong five: the least sure preferences must go), labels read backwards, an empty or identical pair kept, a
    summary line that miscounts a reason, and a post whose best-scored answer is not its last pair (the SFT target
    data.one_per_prompt keeps)."""
    pairs = preference_files.load_shp(("askculinary", "askbaking"), "train", lambda post: f"Q: {post}", lambda c: c)
    out = capsys.readouterr().out
    assert "shp train (2 subreddits): 7 pairs from 11 rows; dropped 1 score ratio < 2, 1 over 5 per post, " \
           "1 an empty comment, 1 identical comments" in out, out
    salt = [(p["chosen"], p["rejected"]) for p in pairs if p["prompt"] == f"Q: {POST}"]
    assert sorted(salt) == sorted([("c40", "c5"), ("c30", "c3"), ("c20", "c4"), ("c12", "c4"), ("c40", "c12")]), salt
    assert salt[-1][0] == "c40", f"the post's best answer (score 40) must come last: {salt}"
    assert [(p["chosen"], p["rejected"]) for p in pairs if p["prompt"] == f"Q: {OTHER}"] == [("starch", "c2")] * 2
    assert ("/datasets/stanfordnlp/SHP/resolve/main/askculinary/train.json", None) in shp_hub.requests
    assert (common.cache_dir() / "shp" / "askculinary" / "train.json").exists()


def test_shp_names_are_checked_before_any_download(shp_hub):
    """Catches a typo'd subreddit discovered only after other files downloaded (or as a bare 404)."""
    with pytest.raises(ValueError, match="unknown SHP subreddit 'askcooking'"):
        preference_files.shp_subreddits(("askculinary", "askcooking"))
    assert preference_files.shp_subreddits(None) == preference_files.SHP_SUBREDDITS
    assert not shp_hub.requests


def test_a_corrupt_shp_row_names_its_file_and_line(shp_hub):
    """Catches a malformed row of a downloaded file read as a pair, or an error that hides where it is."""
    shp_hub.files["/datasets/stanfordnlp/SHP/resolve/main/askculinary/train.json"] = shp_json(ROWS[:2]) + b'{"history": 1}\n'
    with pytest.raises(ValueError, match=r"askculinary/train.json, line 3: not an SHP row \(KeyError"):
        preference_files.load_shp(("askculinary",), "train", str, str)


@pytest.mark.parametrize("messages, key, ends_with, answer, error", [
    ([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}], "prompt", "user", False, None),
    ([{"role": "user", "content": "u"}, {"role": "system", "content": "s"}], "prompt", "user", False,
     "role out of order in 'prompt': message 2 is 'system', expected 'assistant'"),
    ([{"role": "assistant", "content": "a"}], "prompt", "user", False, "message 1 is 'assistant', expected 'user'"),
    ([{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}], "prompt", "user", False,
     "'prompt' does not end with an user turn"),
    ([{"role": "user", "content": 3}], "prompt", "user", False, "'prompt' message 1 is not"),
    ([{"role": "bot", "content": "x"}], "prompt", "user", False, "'prompt' message 1 is not"),
    ([], "chosen", "assistant", True, "'chosen' holds no messages"),
    ([{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}], "chosen", "assistant", True,
     "make it one assistant message"),
])
def test_check_messages(messages, key, ends_with, answer, error):
    """Catches a role order the HH rendering cannot express accepted (two users in a row, a system message after
    the first, a prompt that ends with the assistant), or a message without string content."""
    if error is None:
        preference_files.check_messages(messages, key, ends_with, answer)
        return
    with pytest.raises(ValueError, match=error.replace("(", r"\(")):
        preference_files.check_messages(messages, key, ends_with, answer)


def test_held_out_is_seeded_by_prompt():
    """Catches a split that sends pairs of one prompt to both sides, or that another seed does not change."""
    pairs = [{"prompt": f"p{i % 10}", "chosen": f"c{i}", "rejected": "r"} for i in range(30)]
    train, test = preference_files.held_out(pairs, 0.2, seed=0)
    assert len(test) == 6 and not {p["prompt"] for p in train} & {p["prompt"] for p in test}
    assert preference_files.held_out(pairs, 0.2, seed=0) == (train, test)
    assert {p["prompt"] for p in preference_files.held_out(pairs, 0.2, seed=1)[1]} != {p["prompt"] for p in test}
    with pytest.raises(ValueError, match="share one prompt.*--dataset=train.jsonl,test.jsonl"):
        preference_files.held_out(pairs[:1] * 3, 0.1, seed=0)
