"""judge.py: the judgment cache, the arithmetic of win rates (Wilson, length-controlled), the A/B order, the verdict
parser and the ground-truth judge. The REST client it calls is tested in tests/machinery/test_openai_client.py, the
samples it judges in tests/test_sampling.py. Each docstring names the bug the test would catch."""


import numpy as np
import pytest

import data
import judge
from machinery import common, results_tables
from tests.helpers import SCRIPT, comparison
from tests.helpers import OPENAI_FAST as FAST


# ----------------------------------------------------------------------------------------------------------------
# The judgment cache (conftest.py: fake_openai)


def test_second_run_is_served_from_the_cache(fake_openai, tmp_path):
    """Catches: a cache that is not written, not read, or keyed on something that changes between runs
    (e.g. a random A/B order or a timestamp): the second run would pay for every request again."""
    comparisons = [comparison(i, resp, pos) for i, (resp, pos, _, _) in enumerate(SCRIPT)]
    first = judge.judge_all(comparisons, FAST, tmp_path)
    sent = len(fake_openai.log)
    second = judge.judge_all(comparisons, FAST, tmp_path)
    assert len(fake_openai.log) == sent, f"{len(fake_openai.log) - sent} requests on a fully cached run"
    assert [j["outcome"] for j in second] == [j["outcome"] for j in first]


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


# ----------------------------------------------------------------------------------------------------------------
# The ground-truth judge


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
