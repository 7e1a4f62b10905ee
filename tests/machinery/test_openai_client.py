"""machinery/openai_client.py, as judge.py calls it, against a fake OpenAI-compatible server on 127.0.0.1
(conftest.py: fake_openai): the REST call's URL, headers and body, retries on 429, 500, timeouts and malformed
answers, Retry-After, a rejected key, and the key never written or printed. Each docstring names the bug the test
would catch."""


import pytest

import judge
from machinery import openai_client
from tests.helpers import KEY, SCRIPT, comparison
from tests.helpers import OPENAI_FAST as FAST


def test_fake_server_evaluation_counts_and_retries(fake_openai, tmp_path, capsys):
    """Catches: a wrong URL, header or body (the server answers 400); A/B mapped the wrong way (wins would
    become losses in one position); no retry on 429/500/timeouts/malformed JSON (the run would fail); Retry-After
    ignored; an unparseable verdict dropped or not retried; invalid verdicts counted in the win rate."""
    comparisons = [comparison(i, resp, pos) for i, (resp, pos, _, _) in enumerate(SCRIPT)]
    judgments = judge.judge_all(comparisons, FAST, tmp_path)
    assert [j["outcome"] for j in judgments] == [outcome for _, _, outcome, _ in SCRIPT]
    for (resp, _, _, want), c in zip(SCRIPT, comparisons):
        body = judge.judge_request(c, "gpt-4o-mini", FAST.max_tokens)
        assert fake_openai.tries[body["messages"][0]["content"]] == want, f"requests for {resp!r}"
    assert len(fake_openai.log) == sum(want for *_, want in SCRIPT)
    out = capsys.readouterr().out
    assert "waiting 0.1s (as Retry-After asks)" in out and "rate limited" in out, out
    # usage (100, 20) of each 200 answer: 16 requests less the 429, 500, timeout and malformed one; garbled count
    assert "used 1,200 input + 240 output tokens" in out, out
    (row,) = judge.score(judgments)
    assert (row["n"], row["wins"], row["losses"], row["invalid"]) == (10, 6, 3, 1), row
    assert row["win_rate"] == pytest.approx(6 / 9)


def test_401_stops_at_once_with_a_clear_message(fake_openai, tmp_path):
    """Catches: a rejected key retried (or every request sent anyway), and an error message that does not say
    which server rejected the key, or that repeats the key the server echoed back."""
    fake_openai.reject = True
    comparisons = [comparison(i, " good", "A") for i in range(40)]
    with pytest.raises(openai_client.JudgeError, match=r"key rejected by http://127\.0\.0\.1:\d+/v1") as err:
        judge.judge_all(comparisons, FAST, tmp_path)
    assert KEY not in str(err.value)
    assert len(fake_openai.log) <= FAST.concurrency, f"{len(fake_openai.log)} requests after a 401"


def test_the_key_is_never_written_or_printed(fake_openai, tmp_path, capsys):
    """Catches: the API key leaking into samples, the judgment cache, results, config.json or the log
    (e.g. by storing request headers or printing settings that hold it). Also runs the whole pipeline
    with the OpenAI judge, and the swap check against a judge that always says "A"."""
    fake_openai.always = "A"
    rows = judge.main(["--dataset=synthetic", "--models=sft:tiny", "--n=3", "--max_new_tokens=4",
                       "--temperatures=1.0", f"--out={tmp_path}", "--timeout_s=5", "--swap_check=2"])
    assert sum(r["n"] for r in rows) == 3
    assert "swap check: 2/2 pairs (100%)" in (tmp_path / "results.md").read_text()
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {"judgments.jsonl", "results.jsonl", "results.md", "sft.jsonl", "config.json"} <= {p.name for p in files}
    for p in files:
        assert KEY not in p.read_text(), f"API key found in {p}"
    captured = capsys.readouterr()
    assert KEY not in captured.out + captured.err


def test_retry_wait_honours_retry_after_and_backs_off():
    """Catches: Retry-After ignored, backoff that does not grow, or no jitter (threads retrying in lockstep)."""
    assert openai_client.retry_wait(0, 1.0, "0.1") == 0.1
    waits = [openai_client.retry_wait(3, 1.0, None) for _ in range(50)]
    assert all(4.0 <= w <= 12.0 for w in waits) and len(set(waits)) > 1, waits
    assert openai_client.retry_wait(20, 1.0, None) <= openai_client.MAX_WAIT_S
