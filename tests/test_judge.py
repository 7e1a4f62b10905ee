"""Tests of judge.py and plot.py: the REST judge against a fake OpenAI server on 127.0.0.1, the arithmetic of
win rates, A/B order, sampling with the `tiny` model, the ground-truth judge and the figures. Each docstring
names the bug the test would catch."""

import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

import data
import judge
import model as gpt
import plot
import sampling
from machinery import common, openai_client, results_tables

KEY = "sk-test-do-not-leak-0123456789"


# ----------------------------------------------------------------------------------------------------------------
# A fake OpenAI-compatible server. It checks what we send, and markers in the model's answer script its replies:
# "[429]", "[500]", "[slow]", "[badjson]", "[garbled-once]" misbehave on the first try of a request; "[garbled]"
# never gives a verdict. Otherwise the answer containing "good" beats one containing "meh", which beats the rest
# (or, when a test sets `always`, that letter wins).


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest's output clean
        pass

    def reply(self, status: int, payload, headers: dict | None = None) -> None:
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        try:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up on a slow answer
            pass

    def do_POST(self):
        server = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        content = body["messages"][0]["content"]
        with server.lock:
            server.log.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
            server.tries[content] += 1
            n = server.tries[content]
        problems = [p for p, ok in [
            (f"path {self.path}", self.path == "/v1/chat/completions"),
            ("Authorization header", self.headers.get("Authorization") == f"Bearer {KEY}"),
            (f"model {body.get('model')}", body.get("model") == "gpt-4o-mini"),
            (f"temperature {body.get('temperature')}", body.get("temperature") == 0),
            ("messages", [m["role"] for m in body["messages"]] == ["user"]),
            ("prompt", content.startswith("For the following query to a chatbot, which response is more helpful?")),
        ] if not ok]
        if problems:
            return self.reply(400, {"error": {"message": f"fake server: bad {', '.join(problems)}"}})
        if server.reject:
            return self.reply(401, {"error": {"message": f"Incorrect API key provided: {KEY}"}})
        if "[429]" in content and n == 1:
            return self.reply(429, {"error": {"message": "rate limited"}}, {"Retry-After": "0.1"})
        if "[500]" in content and n == 1:
            return self.reply(500, {"error": {"message": "server error"}})
        if "[slow]" in content and n == 1:
            time.sleep(1.0)  # past the client's 0.5 s timeout
        if "[badjson]" in content and n == 1:
            return self.reply(200, b'{"choices": [{"message": ')
        if "[garbled]" in content or ("[garbled-once]" in content and n == 1):
            return self.reply(200, completion("Both answers are fine, I cannot pick one."))
        a = content.split("Response A:\n")[1].split("\n\nResponse B:\n")[0]
        b = content.split("\n\nResponse B:\n")[1].split("\n\nFIRST provide")[0]
        rank = lambda text: 2 if "good" in text else 1 if "meh" in text else 0  # noqa: E731
        winner = server.always or ("A" if rank(a) >= rank(b) else "B")
        style = ["More helpful: {}", "**More helpful:** {}", 'More helpful: "{}"'][len(content) % 3]
        return self.reply(200, completion("Comparison: one is better.\n" + style.format(winner)))


def completion(text: str) -> dict:
    return {"choices": [{"message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 20}}


@pytest.fixture
def fake_openai(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.lock, server.log, server.tries, server.reject, server.always = threading.Lock(), [], Counter(), False, None
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{server.server_port}/v1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    yield server
    server.shutdown()
    server.server_close()


def comparison(i: int, response: str, position: str) -> dict:
    return {"model": "dpo", "path": "runs/x", "step": 10, "temperature": 0.5, "seed": 0,
            "prompt": f"\n\nHuman: Question {i}?\n\nAssistant:", "response": response, "chosen": " a meh answer",
            "position": position, "swap": False}


SCRIPT = [  # (model's answer, its position, expected outcome, requests the fake server should see)
    (" good", "A", "win", 1), (" good", "B", "win", 1), (" bad", "A", "loss", 1), (" bad", "B", "loss", 1),
    (" good [429]", "A", "win", 2), (" good [500]", "B", "win", 2), (" bad [slow]", "A", "loss", 2),
    (" good [badjson]", "B", "win", 2), (" good [garbled-once]", "A", "win", 2), (" good [garbled]", "B", "invalid", 2),
]
FAST = judge.Settings(judge="openai", timeout_s=0.5, backoff_s=0.01, concurrency=4)


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


def test_second_run_is_served_from_the_cache(fake_openai, tmp_path):
    """Catches: a cache that is not written, not read, or keyed on something that changes between runs
    (e.g. a random A/B order or a timestamp): the second run would pay for every request again."""
    comparisons = [comparison(i, resp, pos) for i, (resp, pos, _, _) in enumerate(SCRIPT)]
    first = judge.judge_all(comparisons, FAST, tmp_path)
    sent = len(fake_openai.log)
    second = judge.judge_all(comparisons, FAST, tmp_path)
    assert len(fake_openai.log) == sent, f"{len(fake_openai.log) - sent} requests on a fully cached run"
    assert [j["outcome"] for j in second] == [j["outcome"] for j in first]


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


# ----------------------------------------------------------------------------------------------------------------
# Arithmetic, order, parsing


def test_wilson_interval_known_values():
    """Catches: a wrong Wilson formula (e.g. z² / n where z² / 2n belongs, or the Wald interval p ± z·se), and
    n = 0 crashing. Oracle: the interval is every p the score test accepts, (p̂ - p)² <= z² p(1 - p) / n, so its
    ends are the roots of (1 + z²/n) p² - (2p̂ + z²/n) p + p̂² = 0; plus the textbook 8/10 -> [0.490, 0.943]."""
    z = 1.96
    for wins, n in [(8, 10), (0, 10), (10, 10), (50, 100), (3, 7), (123, 400)]:
        p = wins / n
        roots = sorted(np.roots([1 + z * z / n, -(2 * p + z * z / n), p * p]).real)
        assert judge.wilson_interval(wins, n, z) == pytest.approx(roots, abs=1e-9), (wins, n)
    assert judge.wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert judge.wilson_interval(0, 0) == (0.0, 1.0)


def test_score_counts_invalid_outside_the_denominator():
    """Catches: invalid verdicts counted as losses (or silently dropped from n), and rows merged across
    temperatures or models."""
    outcomes = {0.5: ["win", "win", "loss", "invalid"], 1.0: ["loss", "loss"]}
    judgments = [{"model": "dpo", "step": 3, "temperature": t, "outcome": o, "prompt": f"q{i}", "response": " a",
                  "chosen": " b"} for t, os in outcomes.items() for i, o in enumerate(os)]
    rows = judge.score(judgments)
    assert [(r["temperature"], r["n"], r["wins"], r["losses"], r["invalid"]) for r in rows] == [
        (0.5, 4, 2, 1, 1), (1.0, 2, 0, 2, 0)]
    assert rows[0]["win_rate"] == pytest.approx(2 / 3)
    assert (rows[0]["ci_low"], rows[0]["ci_high"]) == judge.wilson_interval(2, 3)


def test_order_is_balanced_and_reproducible():
    """Catches: the model's answer always in one position (the judge's position bias would then move the win
    rate), or an order that changes between runs (the cached request would no longer match)."""
    samples = [{"model": "dpo", "step": 1, "temperature": 1.0, "prompt": f"q{i}"} for i in range(2000)]
    first = [judge.model_position(0, x) for x in samples]
    assert first == [judge.model_position(0, x) for x in samples]
    assert 0.45 < first.count("A") / len(first) < 0.55, first.count("A")
    other_seed = [judge.model_position(1, x) for x in samples]
    assert 0.4 < sum(a != b for a, b in zip(first, other_seed)) / len(first) < 0.6


@pytest.mark.parametrize("text, verdict", [
    ("Comparison: A is clearer.\nMore helpful: A", "A"),
    ("Comparison: x\n**More helpful:** B", "B"),
    ('Comparison: x\nMore helpful: "B"', "B"),
    ("Comparison: x\nMore helpful: Response A.", "A"),
    ("Comparison: Response B is more helpful: it answers.\nMore helpful: A", "A"),
    ("Comparison: x\n\nB", "B"),
    ("Comparison: they are equally helpful.", None),
    ("More helpful: a tie", None),
])
def test_parse_verdict(text, verdict):
    """Catches: markdown or quotes around the verdict read as invalid, the comparison sentence read as the
    verdict, and a non-answer read as A or B."""
    assert judge.parse_verdict(text) == verdict


def test_retry_wait_honours_retry_after_and_backs_off():
    """Catches: Retry-After ignored, backoff that does not grow, or no jitter (threads retrying in lockstep)."""
    assert openai_client.retry_wait(0, 1.0, "0.1") == 0.1
    waits = [openai_client.retry_wait(3, 1.0, None) for _ in range(50)]
    assert all(4.0 <= w <= 12.0 for w in waits) and len(set(waits)) > 1, waits
    assert openai_client.retry_wait(20, 1.0, None) <= openai_client.MAX_WAIT_S


# ----------------------------------------------------------------------------------------------------------------
# Sampling with the tiny model, the ground-truth judge, the figures

SYNTHETIC = ["--dataset=synthetic", "--judge=groundtruth", "--n=4", "--max_new_tokens=8", "--temperatures=0.5,1.0"]


def test_groundtruth_judge_gives_one_answer_the_same_outcome_in_both_positions(tmp_path):
    """Catches a ground-truth cache key that forgets the A/B position: the answer judged at B would reuse its
    verdict "A" from position A and turn a win into a loss. Ties (decided by a seeded coin) must agree too."""
    prompt = f"{data.HUMAN} Can you name a fruit?{data.ASSISTANT}"
    answers = [" A fruit is apple. Hope that helps!", " A tool is saw.", " A fruit is cherry."]  # >, <, = chosen
    comparisons = [{**comparison(0, a, pos), "prompt": prompt, "chosen": " A fruit is banana."}
                   for a in answers for pos in "AB"]
    outcomes = [j["outcome"] for j in judge.judge_all(comparisons, judge.Settings(judge="groundtruth"), tmp_path)]
    assert outcomes[:4] == ["win", "win", "loss", "loss"], outcomes
    assert outcomes[4] == outcomes[5], outcomes
    assert outcomes == [j["outcome"] for j in judge.judge_all(comparisons, judge.Settings(judge="groundtruth"),
                                                                tmp_path)], "cached outcomes differ"


def test_ties_are_a_fair_coin_fixed_per_comparison_and_counted(tmp_path):
    """The ground-truth judge settles equal true rewards with a coin seeded by the comparison. Catches every tie
    made a win (`r_model >= r_chosen`), or a loss, which would move each demo win rate by half its tie share; a coin
    that stops depending on the comparison (one outcome for all ties); a coin that changes between runs (a cached
    verdict would then disagree with a fresh one); ties not counted in results.md, or not labelled in samples.md."""
    prompt = f"{data.HUMAN} Can you name a fruit?{data.ASSISTANT}"
    tied = [{**comparison(i, f" A tool is {tool}.{' Maybe.' * k}", "AB"[i % 2]), "prompt": prompt,
             "chosen": f" A color is red.{' Maybe.' * k}"}
            for i, (tool, k) in enumerate((t, k) for t in data.CATEGORIES["tool"] for k in range(4))]
    tied += [{**c, "response": c["response"] + " Good question.", "chosen": c["chosen"] + " Let me think."}
             for c in tied]  # 48 distinct tied comparisons: reward 0 - 0.5 k (- 0.5) on both sides
    assert all(data.synthetic_reward(c["prompt"], c["response"]) == data.synthetic_reward(c["prompt"], c["chosen"])
               for c in tied)
    many = [{**c, "prompt": c["prompt"].replace("fruit", f"fruit ({n})")} for n in range(10) for c in tied]
    verdicts = [judge.groundtruth_judgment(c, seed=0) for c in many]
    wins = [v["verdict"] == c["position"] for v, c in zip(verdicts, many)]
    assert all(v["tie"] for v in verdicts)
    assert 0.4 < sum(wins) / len(wins) < 0.6, f"{sum(wins)} of {len(wins)} ties won: the coin is not fair"
    assert wins == [judge.groundtruth_judgment(c, seed=0)["verdict"] == c["position"] for c in many], "coin not fixed"
    other = [judge.groundtruth_judgment(c, seed=1)["verdict"] == c["position"] for c in many]
    assert 0.3 < sum(a != b for a, b in zip(wins, other)) / len(wins) < 0.7, "the coin ignores the seed"

    distinct = [{**c, "prompt": prompt.replace("fruit", f"fruit ({i})")} for i, c in enumerate(tied[:40])]
    won = {**comparison(0, " A fruit is apple.", "A"), "prompt": prompt, "chosen": " A tool is saw."}
    judgments = judge.judge_all(distinct + [won], judge.Settings(judge="groundtruth"), tmp_path)
    (row,) = judge.score(judgments)
    assert (row["n"], row["ties"]) == (41, 40), row
    results_tables.write_results([row], tmp_path, [])
    assert "| ties (coin) |" in (tmp_path / "results.md").read_text()
    results_tables.write_samples(judgments, 0.5, 0, 41, tmp_path, judge.query_text)
    text = (tmp_path / "samples.md").read_text()
    labels = [f"{j['outcome']} (tie {j['reward_model']:g} vs {j['reward_chosen']:g}, coin)" for j in judgments[:40]]
    assert all(label in text for label in labels) and "win (reward 2 vs 0)" in text, text[-600:]


def test_clean_response_cuts_only_the_next_turn():
    """Catches: an answer that runs into the user's next turn, a half-written "\\n\\nHuman" left at the end,
    and stripping of other whitespace (which would change what the judge reads)."""
    assert sampling.clean_response(" Hi.\n\nHuman: more?\n\nAssistant: x") == " Hi."
    assert sampling.clean_response(" Hi.\n\nHuman") == " Hi."
    assert sampling.clean_response(" Hi.\n") == " Hi.\n"


def test_few_shot_prompt_for_the_base_model(tmp_path, monkeypatch):
    """Catches: a base model prompted without its examples (or an SFT model with them), examples drawn from
    the test split, and prompts truncated from the right (the question would be cut) instead of the left."""
    splits = []
    load_pairs = data.load_pairs
    monkeypatch.setattr(data, "load_pairs", lambda dataset, split: splits.append(split) or load_pairs(dataset, split))
    prefix = sampling.few_shot_prefix("synthetic", 2, 0, 200)
    train = {p["prompt"] + p["chosen"] for p in data.single_turn(load_pairs("synthetic", "train"))}
    shots = ["\n\nHuman:" + x for x in prefix.split("\n\nHuman:")[1:]]
    assert splits == ["train"] and len(shots) == 2 and all(x in train for x in shots), (splits, shots)

    seen = {}

    def fake_generate(self, prompts, max_new_tokens, temperature, **kwargs):  # what the model is asked, no compute
        seen.setdefault(temperature, []).extend(prompts)
        return [[] for _ in prompts]

    monkeypatch.setattr(gpt.GPT, "generate", fake_generate)
    enc = common.get_tokenizer()
    judge.main(SYNTHETIC + ["--models=base:tiny,sft:tiny", "--judge=none", "--temperatures=1.0", f"--out={tmp_path}"])
    base, sft = seen[1.0][:4], seen[1.0][4:]
    assert all(enc.decode(ids).startswith(prefix) for ids in base)
    assert not any(enc.decode(ids).startswith(prefix) for ids in sft)

    seen.clear()
    budget = gpt.PRESETS["tiny"].block_size - 246  # fewer tokens than any synthetic prompt has
    judge.main(SYNTHETIC + ["--models=sft:tiny", "--judge=none", "--temperatures=1.0", "--max_new_tokens=246",
                            f"--out={tmp_path / 'long'}"])
    full = [enc.encode_ordinary(p["prompt"]) for p in sampling.eval_prompts("synthetic", 4, 0)]
    assert all(len(ids) > budget for ids in full)
    assert sorted(seen[1.0]) == sorted(ids[-budget:] for ids in full)


def test_sampling_resumes_then_groundtruth_results_and_figures(tmp_path, monkeypatch):
    """Catches: samples not written, regenerated on a re-run (or a resumed run generating everything again),
    records missing fields, the ground-truth judge not producing results, and plot.py not writing its PNGs."""
    argv = SYNTHETIC + ["--models=base:tiny,sft:tiny", f"--out={tmp_path}"]
    rows = judge.main(argv)
    file = tmp_path / "samples" / "sft.jsonl"
    samples = common.read_jsonl(file)
    assert len(samples) == 4 * 2
    fields = {"prompt", "response", "chosen", "model", "path", "step", "temperature", "seed"}
    assert all(fields <= set(r) and "\n\nHuman:" not in r["response"] for r in samples)
    assert [(r["model"], r["temperature"], r["n"], r["wins"] + r["losses"] + r["invalid"]) for r in rows] == [
        (m, t, 4, 4) for m in ("base", "sft") for t in (0.5, 1.0)]
    assert all(0 <= r["ci_low"] <= r["win_rate"] <= r["ci_high"] <= 1 for r in rows)

    file.write_text("".join(json.dumps(r) + "\n" for r in samples[:3]))  # as if interrupted after 3 answers
    generated = []
    generate = gpt.GPT.generate
    spy = lambda self, prompts, *a, **k: generated.extend(prompts) or generate(self, prompts, *a, **k)  # noqa: E731
    monkeypatch.setattr(gpt.GPT, "generate", spy)
    judge.main(argv)
    assert len(generated) == 8 - 3, f"resumed run generated {len(generated)} answers, 5 were missing"
    assert common.read_jsonl(file)[:3] == samples[:3] and len(common.read_jsonl(file)) == 8

    monkeypatch.setattr(gpt, "load_model", lambda path: pytest.fail(f"loaded {path}: samples should be reused"))
    judge.main(argv)

    metrics = tmp_path / "dpo_run" / "metrics.jsonl"
    metrics.parent.mkdir()
    metrics.write_text("".join(json.dumps({"step": s, "split": split, "loss": 0.7 - s / 100, "reward_accuracy": 0.6,
                                           "reward_margin": s / 10}) + "\n"
                               for s in (1, 2, 3) for split in ("train", "eval")))
    plot.main([f"--out={tmp_path}", f"--runs={metrics.parent}", f"--sizes={tmp_path}/none"])
    for name in ("fig3_temperature.png", "training.png"):
        assert (tmp_path / name).stat().st_size > 1000, name


def test_dpo_steps_give_figure_3_right(tmp_path):
    """Catches: intermediate checkpoints not found or not told apart (their step missing from the rows), and
    the win-rate-vs-step figure not drawn."""
    for step in (200, 100):
        gpt.save_model(gpt.GPT(gpt.PRESETS["tiny"]), tmp_path / "dpo" / f"step_{step:06d}", {"step": step})
    rows = judge.main(SYNTHETIC + ["--models=sft:tiny", f"--dpo_steps={tmp_path / 'dpo'}", f"--out={tmp_path}",
                                   "--temperatures=0.5"])
    assert [(r["model"], r["step"]) for r in rows] == [
        ("sft", None), (sampling.STEPS_MODEL, 100), (sampling.STEPS_MODEL, 200)]
    plot.main([f"--out={tmp_path}", "--runs=", f"--sizes={tmp_path}/none"])
    assert (tmp_path / "fig3_steps.png").stat().st_size > 1000


# ----------------------------------------------------------------------------------------------------------------
# Length: the length-controlled win rate against cases with a known answer


def test_lc_win_rate_known_answers():
    """Catches a wrong LC estimator: d centred before the fit (LC would then equal the raw win rate even when
    length decides everything), the slope's coefficient reported instead of the intercept's, the sigmoid left out,
    a bootstrap over rows instead of prompts, or an interval not around the estimate. Oracles: (1) d takes two
    values, 0 and 5: the fitted sigmoid(theta_0) is, in closed form, the win rate among the equal-length
    comparisons; (2) an outcome that depends on length only gives 50% however long the answers are; (3) an outcome
    independent of length gives the raw win rate."""
    d = np.array([0] * 100 + [5] * 100)
    wins = np.array([1] * 30 + [0] * 70 + [1] * 90 + [0] * 10)
    lc, low, high = judge.length_controlled_win_rate(wins, d, range(200))
    se = (0.3 * 0.7 / 100) ** 0.5
    assert lc == pytest.approx(0.30, abs=1e-3), f"LC {lc}: the win rate at d = 0 is 30% (raw {wins.mean()})"
    assert low < lc < high and high - low == pytest.approx(2 * 1.96 * se, rel=0.25), (low, high, 2 * 1.96 * se)
    # the same comparisons, each judged twice under one prompt: resampling prompts keeps the interval's width
    twice = judge.length_controlled_win_rate(np.repeat(wins, 2), np.repeat(d, 2), np.repeat(np.arange(200), 2))
    assert twice[2] - twice[1] == pytest.approx(high - low, rel=0.25), f"interval {twice[1:]} vs {(low, high)}"

    rng = np.random.default_rng(0)
    d = rng.normal(10, 10, 4000).round()  # the model's answers are mostly longer than the chosen ones
    by_length = rng.random(4000) < 1 / (1 + np.exp(-0.3 * d))
    lc, low, high = judge.length_controlled_win_rate(by_length, d, range(4000))
    assert by_length.mean() > 0.75 and abs(lc - 0.5) < 0.05 and low < 0.5 < high, (by_length.mean(), lc, low, high)
    independent = rng.random(4000) < 0.7
    lc, low, high = judge.length_controlled_win_rate(independent, d, range(4000))
    assert abs(lc - independent.mean()) < 0.02 and low < independent.mean() < high, (independent.mean(), lc, low, high)
    lc, _, _ = judge.length_controlled_win_rate([1, 0, 1, 1], [3, 3, 3, 3], range(4))  # equal lengths: raw
    assert lc == pytest.approx(0.75, abs=1e-3), lc


def test_results_carry_lengths_and_lc_win_rate(tmp_path):
    """Catches length columns computed from the wrong text (the prompt, or the model's answer for both), in
    characters instead of tokens, or missing from results.jsonl / results.md."""
    enc = common.get_tokenizer()
    judgments = [{"model": "dpo", "step": None, "temperature": 1.0, "outcome": o, "prompt": f"q{i}",
                  "response": " one two three" * (i + 1), "chosen": " yes"} for i, o in enumerate(["win", "loss", "win"])]
    (row,) = judge.score(judgments)
    assert row["response_tokens"] == pytest.approx(np.mean([len(enc.encode_ordinary(j["response"])) for j in judgments]))
    assert row["response_tokens"] == 6 and row["chosen_tokens"] == 1, row
    assert 0 < row["lc_ci_low"] <= row["lc_win_rate"] <= row["lc_ci_high"] < 1, row
    results_tables.write_results([row], tmp_path, [])
    assert "LC win rate" in (tmp_path / "results.md").read_text()
    assert common.read_jsonl(tmp_path / "results.jsonl")[0]["lc_win_rate"] == row["lc_win_rate"]


# ----------------------------------------------------------------------------------------------------------------
# Stale samples, older files, samples.md


def test_a_checkpoint_overwritten_in_place_is_sampled_again(tmp_path, capsys):
    """Catches answers reused by checkpoint path alone: retraining into the same run directory and running
    `make eval` again would bring back the old model's answers and verdicts, silently. Also another max_new_tokens
    must resample, and an unchanged checkpoint must not."""
    ckpt = tmp_path / "dpo" / "final"
    torch.manual_seed(0)
    gpt.save_model(gpt.GPT(gpt.PRESETS["tiny"]), ckpt)
    argv = SYNTHETIC + [f"--models=dpo:{ckpt}", f"--out={tmp_path / 'eval'}", "--temperatures=1.0"]
    file = tmp_path / "eval" / "samples" / "dpo.jsonl"
    first = judge.main(argv)
    before = common.read_jsonl(file)
    judge.main(argv)
    assert common.read_jsonl(file) == before and "sampling them again" not in capsys.readouterr().out
    other = gpt.GPT(gpt.PRESETS["tiny"])  # other weights, same path, same size: a model that only says EOT
    with torch.no_grad():
        other.ln_f.weight.zero_()
        other.ln_f.bias.copy_(1000 * other.wte.weight[gpt.EOT])  # every hidden state points at EOT's embedding
    gpt.save_model(other, ckpt)
    second = judge.main(argv)
    out = capsys.readouterr().out
    assert "4 stored answers" in out and "were made with fingerprint sha256:" in out, out
    after = common.read_jsonl(file)
    assert len(after) == 4 and [r["response"] for r in after] != [r["response"] for r in before], after
    assert {r["fingerprint"] for r in after}.isdisjoint({r["fingerprint"] for r in before})
    assert [r["response_tokens"] for r in first] == [8] and [r["response_tokens"] for r in second] == [0], (first, second)
    judge.main(argv + ["--max_new_tokens=6"])
    assert "max_new_tokens 8 (now 6)" in capsys.readouterr().out


def test_older_samples_and_results_files_get_a_clear_message(tmp_path, capsys, monkeypatch):
    """Catches a KeyError (or silent reuse) on files from an older judge.py: samples without a weights fingerprint
    (or even without a path) must be sampled again with a message; results.jsonl without the length columns must
    make plot.py say to rescore, and still draw the other figures."""
    samples = tmp_path / "samples" / "sft.jsonl"
    samples.parent.mkdir(parents=True)
    old = {"model": "sft", "path": "tiny", "step": None, "temperature": 1.0, "seed": 0, "shots": 0,
           "prompt": sampling.eval_prompts("synthetic", 4, 0)[0]["prompt"], "response": " old", "chosen": " x"}
    samples.write_text(json.dumps(old) + "\n" + json.dumps({"response": " older still"}) + "\n")
    judge.main(SYNTHETIC + ["--models=sft:tiny", f"--out={tmp_path}", "--temperatures=1.0"])
    assert "were made with an older judge.py (no weights fingerprint); sampling them again" in capsys.readouterr().out
    assert all("fingerprint" in r for r in common.read_jsonl(samples) if r.get("path") == "tiny")
    rows = [{k: v for k, v in r.items() if k not in ("lc_win_rate", "response_tokens")}
            for r in common.read_jsonl(tmp_path / "results.jsonl")]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot.main([f"--out={tmp_path}", "--runs=", f"--sizes={tmp_path}/none"])
    out = capsys.readouterr().out
    assert "written by an older judge.py; rerun judge.py with the same settings to rescore" in out, out
    assert (tmp_path / "fig3_temperature.png").exists() and not (tmp_path / "length.png").exists()


def test_samples_md_shows_answers_verdicts_and_the_judges_sentence(fake_openai, tmp_path):
    """Catches samples.md missing a model, showing answers of another temperature or of another prompt than the
    one in its heading, verdicts not matching the scored ones, the LLM judge's comparison left out, or a subset
    that changes from run to run."""
    for seed, name in enumerate(("sft", "dpo")):  # two different models: their answers (and requests) differ
        torch.manual_seed(seed)
        gpt.save_model(gpt.GPT(gpt.PRESETS["tiny"]), tmp_path / name)
    argv = ["--dataset=synthetic", f"--models=sft:{tmp_path / 'sft'},dpo:{tmp_path / 'dpo'}", "--n=5", "--max_new_tokens=4", "--show=3",
            "--temperatures=0.5,1.0", f"--out={tmp_path}", "--timeout_s=5"]
    judge.main(argv)
    text = (tmp_path / "samples.md").read_text()
    assert text.startswith("# Answers side by side: 3 evaluation prompts at temperature 0.5"), text[:200]
    sections = text.split("\n## ")[1:]
    assert len(sections) == 3 and all("| | chosen (test set) | sft | dpo |" in x for x in sections), text
    judged = {(j["model"], j["prompt"]): j for j in common.read_jsonl(tmp_path / "judgments.jsonl")
              if j["temperature"] == 0.5}
    samples = {(r["model"], r["prompt"]): r for name in ("sft", "dpo")
               for r in common.read_jsonl(tmp_path / "samples" / f"{name}.jsonl") if r["temperature"] == 0.5}
    for section in sections:
        query = section.splitlines()[0].split(". ", 1)[1]
        ((_, prompt),) = {k for k in samples if k[0] == "sft" and judge.query_text(k[1]) == query}
        answer_row = next(line for line in section.splitlines() if line.startswith("| answer |"))
        verdict_row = next(line for line in section.splitlines() if line.startswith("| verdict |"))
        cells = [c.strip() for c in answer_row.split(" | ")]
        assert cells[1] == samples[("sft", prompt)]["chosen"].strip() or cells[1] == "(empty)", answer_row
        for i, name in enumerate(("sft", "dpo")):
            assert samples[(name, prompt)]["response"].strip().replace("|", "\\|") in cells[2 + i], (name, answer_row)
        outcomes = ["win" if judged[(n, prompt)]["verdict"] == judged[(n, prompt)]["position"] else "loss"
                    for n in ("sft", "dpo")]
        assert verdict_row == "| verdict | | " + " | ".join(outcomes) + " |", (verdict_row, outcomes)
        assert "| judge's comparison | | one is better. | one is better. |" in section, section
    judge.main(argv)
    assert (tmp_path / "samples.md").read_text() == text, "samples.md changed between two identical runs"
