"""Evaluate models the way the DPO paper does: sample answers, let an LLM judge compare them with the dataset's
preferred answer, and report win rates with confidence intervals.

    python judge.py --models=base:gpt2,sft:runs/gpt2/sft/final,dpo:runs/gpt2/dpo/final --dpo_steps=runs/gpt2/dpo
    python judge.py --dataset=synthetic --judge=groundtruth --models=sft:runs/demo/sft/final,...   # offline demo
    python plot.py --out=runs/gpt2/eval --runs=runs/gpt2/sft,runs/gpt2/dpo                          # the figures

Rafailov et al., "Direct Preference Optimization", arXiv 2305.18290, Section 6.1 and Figure 3: on the single-turn
dialogues of Anthropic HH's test split, each model's answer is compared by GPT-4 with the preferred ("chosen")
answer of the test set, at several sampling temperatures; the base model is prompted 2-shot. The stages:

  1. sample  each model answers every evaluation prompt at every temperature -> out/samples/<model>.jsonl
             (sampling.py: Best of N too; answers already on disk are reused if the same weights and generation
             settings made them, only missing ones are generated)
  2. judge   one Chat Completions request per (answer, chosen) pair with the paper's prompt (Appendix C.2),
             A/B order randomised per pair -> out/judgments.jsonl, which is also the cache: a request whose
             exact body was answered before is never paid for twice. `--judge=groundtruth` replaces the LLM by
             the synthetic task's true reward (data.synthetic_reward) for the offline demo.
  3. score   win rate over valid verdicts with a Wilson 95% interval, answer lengths and a length-controlled
             win rate -> out/results.jsonl and out/results.md; a few answers side by side -> out/samples.md
  4. plot    plot.py draws Figure 3 (left: win rate vs temperature; right: vs DPO training step) and more.

The API key comes from $OPENAI_API_KEY only, and the endpoint from $OPENAI_BASE_URL (default OpenAI's);
the key is sent in one header and never printed or written anywhere.

This file holds the judge's prompt, the one REST call, the verdict, and the statistics (Wilson interval, length-
controlled win rate), in the order of the stages. Machinery it leans on: machinery/openai_client.py (the key and
endpoint, retries, the thread pool, a clean stop, the bill) and machinery/results_tables.py (results.md, samples.md,
accuracy.md). Stage 1 is sampling.py, which samples through machinery/fast_generate.py and reuses what is on disk
through machinery/answer_store.py.
"""

import dataclasses
import hashlib
import json
import random
from pathlib import Path

import numpy as np
import requests

import data
import reward
import sampling
from machinery import common, openai_client, results_tables

# ----------------------------------------------------------------------------------------------------------------
# Settings


@dataclasses.dataclass
class Settings:
    """Sample, judge and score: python judge.py --models=base:gpt2,sft:runs/gpt2/sft/final,dpo:runs/gpt2/dpo/final"""

    models: str = "base:gpt2,sft:runs/gpt2/sft/final,dpo:runs/gpt2/dpo/final"  # name:path; base is 2-shot prompted
    dpo_steps: str = ""  # a DPO run dir: also evaluate each of its step_* checkpoints (Figure 3 right)
    dataset: str = "hh"  # prompts: single-turn dialogues of this dataset's test split (hh, shp, a file; "synthetic": offline demo)
    n: int = 0  # number of evaluation prompts, a fixed seeded subset (0 = all)
    out: str = "runs/gpt2/eval"  # output dir: samples/, judgments.jsonl, results.jsonl, results.md
    temperatures: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)  # sampling temperatures (Figure 3's x axis)
    max_new_tokens: int = 256  # longest answer; generation also stops at <|endoftext|> or the next "\n\nHuman:"
    shots: int = 2  # example dialogues (train split) before the prompt for base models (paper: 2-shot)
    batch_size: int = 16  # prompts generated together
    compile: bool = False  # decode through torch.compile (on a GPU as CUDA graphs): a compile per batch shape first
    seed: int = 0  # prompt subset, few-shot examples, sampling, A/B order, tie breaks
    show: int = 8  # evaluation prompts whose answers samples.md shows side by side (a seeded subset)
    show_temperature: float = -1.0  # samples.md's sampling temperature (-1: the lowest of --temperatures)
    device: str = "auto"  # cuda, mps, cpu or auto
    dtype: str = "auto"  # bfloat16, float16, float32 or auto
    judge: str = "openai"  # openai (LLM judge), groundtruth (synthetic dataset only, no network), none (sample only)
    judge_model: str = "gpt-4o-mini"  # the paper used GPT-4 (gpt-4-0314); gpt-4o-mini is ~200x cheaper
    concurrency: int = 8  # judge requests in flight
    timeout_s: float = 60.0  # seconds to wait for one judge answer before retrying
    max_retries: int = 6  # retries of one request on 429, 5xx, timeouts and malformed answers
    backoff_s: float = 1.0  # first retry waits ~this long, doubling each retry (unless the server sends Retry-After)
    max_tokens: int = 256  # cap on the judge's answer (a one-sentence comparison + the verdict need ~60)
    swap_check: int = 0  # judge this many pairs in both orders to measure position bias (0 = off)
    # Best of N (Figure 3's fourth line) and "secretly a reward model" (reward.py)
    best_of: int = 0  # N: also evaluate best_of_<N>, the best of N samples by --scorer (0 = off; paper: 128)
    best_of_from: str = ""  # the model Best of N samples from (default: the sft entry of --models)
    scorer: str = ""  # a reward model checkpoint (reward.py), or implicit:<dpo checkpoint> (pi_ref = the sampler)
    best_of_curve: bool = False  # also judge best-of-k for k = 1, 2, 4, ..., N from the same pool (win rate vs N)
    best_of_prompts: int = 0  # Best of N on the first this many evaluation prompts only (0 = all): N x the cost
    accuracy: str = ""  # name:scorer,...: preference accuracy of each scorer on held-out test pairs (reward.py)
    accuracy_n: int = 0  # held-out test pairs for --accuracy (0 = all)
    price_input: float = 0.15  # USD per 1M input tokens (gpt-4o-mini)
    price_output: float = 0.60  # USD per 1M output tokens (gpt-4o-mini)


# ----------------------------------------------------------------------------------------------------------------
# 1. Sample: sampling.py (each model answers every prompt at every temperature; Best of N)
# ----------------------------------------------------------------------------------------------------------------
# 2. Judge

# DPO paper, Appendix C.2, the GPT-4 prompt for dialogue (single-turn HH): the query, two answers, a one-sentence
# comparison first (the judge reasons before it commits), then the verdict on a line of its own.
JUDGE_PROMPT = """For the following query to a chatbot, which response is more helpful?

Query: {query}

Response A:
{response_a}

Response B:
{response_b}

FIRST provide a one-sentence comparison of the two responses and explain which you feel is more helpful. \
SECOND, on a new line, state only "A" or "B" to indicate which response is more helpful. \
Your response should use the format:
Comparison: <one-sentence comparison and explanation>
More helpful: <"A" or "B">"""


def model_position(seed: int, sample: dict) -> str:
    """Where the model's answer goes, "A" or "B": a coin flip per comparison, seeded by its content so that it
    is the same on every run (and the cached request matches) and about half the answers sit in each place.
    Judges prefer one position (the paper's reason to randomise); balancing cancels that bias on average."""
    key = json.dumps([seed, sample["model"], sample["step"], sample["temperature"], sample["prompt"]])
    return "AB"[hashlib.sha256(key.encode()).digest()[0] % 2]


def query_text(prompt: str) -> str:
    """The user's words of a single-turn dialogue "\n\nHuman: <query>\n\nAssistant:"."""
    return prompt.strip().removeprefix("Human:").removesuffix("Assistant:").strip()


def judge_request(comparison: dict, judge_model: str, max_tokens: int) -> dict:
    """The JSON body of the Chat Completions request comparing the model's answer with the chosen one."""
    answers = [comparison["response"].strip(), comparison["chosen"].strip()]
    a, b = answers if comparison["position"] == "A" else answers[::-1]
    content = JUDGE_PROMPT.format(query=query_text(comparison["prompt"]), response_a=a, response_b=b)
    # temperature 0: the verdict should depend on the answers, not on sampling noise
    return {"model": judge_model, "messages": [{"role": "user", "content": content}], "temperature": 0,
            "max_tokens": max_tokens}


def chat_completion(body: dict, base_url: str, api_key: str, timeout: float) -> requests.Response:
    """The whole OpenAI API as we use it: one POST. The answer's text is in choices[0].message.content and the
    tokens billed are in usage.prompt_tokens / usage.completion_tokens."""
    return requests.post(
        f"{base_url}/chat/completions",
        headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"},
        json=body,
        timeout=timeout,
    )


def parse_verdict(text: str) -> str | None:
    """"A" or "B" from the judge's answer, or None. Takes the last "More helpful:" line, allowing markdown and
    quotes around it ('**More helpful:** "B"', 'More helpful: Response A'); else a last line that is just A or B."""
    lines = [line.strip(" \t*_#`\"'“”.:") for line in text.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        head, sep, rest = line.partition(":")
        if sep and head.strip(" *_").lower() == "more helpful":
            words = [w for w in rest.replace('"', " ").replace("*", " ").split() if w.lower() != "response"]
            word = words[0].strip("\"'“”`.()[]") if words else ""
            return word if word in ("A", "B") else None
    return lines[-1] if lines and lines[-1] in ("A", "B") else None


def openai_judgment(body: dict, s: Settings, base_url: str, api_key: str, stop) -> dict | None:
    """Ask the LLM judge (retried per openai_client.py's policy); an unparseable answer is asked once more
    (temperature 0 is not fully deterministic on the API), then kept as invalid. None: abandoned after another
    request failed."""
    send = lambda: chat_completion(body, base_url, api_key, s.timeout_s)  # noqa: E731
    usage, requests_sent = {"prompt_tokens": 0, "completion_tokens": 0}, 0
    for _ in range(2):
        answer, tries = openai_client.post_with_retries(send, s, base_url, api_key, stop)
        requests_sent += tries
        if answer is None:
            return None
        content = answer["choices"][0]["message"]["content"]
        for k in usage:
            usage[k] += (answer.get("usage") or {}).get(k, 0)
        verdict = parse_verdict(content)
        if verdict:
            break
    return {"verdict": verdict, "content": content, "usage": usage, "requests": requests_sent}


def groundtruth_judgment(comparison: dict, seed: int) -> dict:
    """The offline judge of the synthetic task: the answer with the higher true reward wins; a tie is broken
    by a coin flip seeded by the comparison (recorded, so ties can be counted)."""
    r_model = data.synthetic_reward(comparison["prompt"], comparison["response"])
    r_chosen = data.synthetic_reward(comparison["prompt"], comparison["chosen"])
    other = "B" if comparison["position"] == "A" else "A"
    tie = r_model == r_chosen
    coin = hashlib.sha256(json.dumps([seed, comparison["prompt"], comparison["response"]]).encode()).digest()[0] % 2
    model_wins = r_model > r_chosen or (tie and coin == 1)
    return {"verdict": comparison["position"] if model_wins else other, "tie": tie,
            "reward_model": r_model, "reward_chosen": r_chosen}


COMPARISON_FIELDS = ("model", "path", "step", "temperature", "position", "swap", "prompt")  # kept in each judgment


def judgment_key(comparison: dict, body: dict | None, s: Settings) -> str:
    """What a verdict is cached under: sha256 of the judge model and the exact request body (the LLM judge), or of
    everything the ground-truth verdict depends on. The same key is never judged, or paid for, twice."""
    if body is not None:
        key = s.judge_model + "\n" + json.dumps(body, sort_keys=True)
    else:
        key = "groundtruth\n" + json.dumps([s.seed, *(comparison[k] for k in ("prompt", "response", "chosen", "position"))])
    return hashlib.sha256(key.encode()).hexdigest()


def judge_all(comparisons: list[dict], s: Settings, out: Path) -> list[dict]:
    """Judge every comparison (a sample plus "position" and "swap"), reusing out/judgments.jsonl as the cache of
    judgment_key; returns one judgment per comparison, in order, with its outcome: win, loss or invalid."""
    path = out / "judgments.jsonl"
    cache = {r["key"]: r for r in common.read_jsonl(path)}
    bodies = [judge_request(c, s.judge_model, s.max_tokens) if s.judge == "openai" else None for c in comparisons]
    keys = [judgment_key(c, body, s) for c, body in zip(comparisons, bodies)]
    todo = list({k: i for i, k in enumerate(keys) if k not in cache}.values())  # identical requests go once
    print(f"judge ({s.judge}): {len(comparisons)} comparisons, {len(comparisons) - len(todo)} already judged or "
          f"repeated, {len(todo)} to judge")

    def record(i: int, result: dict) -> None:  # judgments.jsonl is append-only, one whole line per judgment
        row = {"key": keys[i], "judge": s.judge_model if s.judge == "openai" else "groundtruth",
               **{k: comparisons[i][k] for k in COMPARISON_FIELDS}, **result}
        common.append_jsonl(path, [row])
        cache[keys[i]] = row

    if s.judge == "groundtruth":
        for i in todo:
            record(i, groundtruth_judgment(comparisons[i], s.seed))
    elif todo:  # the API key, the bill's estimate, threads and retries: openai_client.py
        openai_client.ask_all([bodies[i] for i in todo], s, lambda body, *call: openai_judgment(body, s, *call),
                              lambda j, result: record(todo[j], result))
    judgments = []
    for c, k in zip(comparisons, keys):
        j = {**cache[k], **{f: c[f] for f in COMPARISON_FIELDS + ("response", "chosen")}}  # from an identical request
        j["outcome"] = "invalid" if j["verdict"] is None else "win" if j["verdict"] == c["position"] else "loss"
        judgments.append(j)
    return judgments


# ----------------------------------------------------------------------------------------------------------------
# 3. Score


def wilson_interval(wins: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% confidence interval of a win rate p = wins / n (Wilson score interval; better than p ± z·sqrt(p(1-p)/n)
    at small n or p near 0 or 1, where that one leaves [0, 1]):

        center = (p + z²/2n) / (1 + z²/n)
        half   = z / (1 + z²/n) · sqrt(p(1-p)/n + z²/4n²)          interval = center ± half
    """
    if n == 0:
        return 0.0, 1.0
    p = wins / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5
    return max(0.0, center - half), min(1.0, center + half)


def logistic_fits(X: np.ndarray, y: np.ndarray, weights: np.ndarray, ridge: float = 1e-3) -> np.ndarray:
    """Maximum-likelihood logistic regressions P(y = 1 | x) = sigmoid(x . theta), one per row of `weights` (R, n)
    (each a weighting of the n examples: ones, or bootstrap counts) -> theta (R, k). Newton's method, all R fits at
    once; the small ridge (ridge/2 |theta|^2) keeps theta finite when x separates the outcomes perfectly."""
    theta = np.zeros((len(weights), X.shape[1]))
    for _ in range(100):
        p = 1 / (1 + np.exp(-theta @ X.T))  # (R, n)
        grad = (weights * (y - p)) @ X - ridge * theta  # (R, k)
        hess = np.einsum("rn,ni,nj->rij", weights * p * (1 - p), X, X) + ridge * np.eye(X.shape[1])  # (R, k, k)
        step = np.linalg.solve(hess, grad[..., None])[..., 0]
        theta += step
        if np.abs(step).max() < 1e-9:
            break
    return theta


def length_controlled_win_rate(wins, length_diff, prompts, n_boot: int = 1000, seed: int = 0):
    """Win rate at equal length, with a 95% interval: (lc, low, high) over the valid comparisons of one model.

    LLM judges favour longer answers and DPO lengthens them (Park et al. 2024, "Disentangling Length from Quality
    in Direct Preference Optimization", arXiv:2403.19159), so part of a raw win rate can be length alone. As in
    AlpacaEval's length-controlled win rate (Dubois et al. 2024, arXiv:2404.04475), in its simplest form: regress
    the outcome on the length difference d = tokens(model's answer) - tokens(chosen answer), standardised,

        P(win | d) = sigmoid(theta_0 + theta_1 * d / sd(d)),        LC = sigmoid(theta_0)

    i.e. the predicted win rate of an answer exactly as long as the chosen one. If the outcome depends on length
    only, theta_0 = 0 and LC = 50%; if it does not depend on length, theta_1 = 0 and LC = the raw win rate. d is
    scaled, never centred: centring would move "equal length" to "the average length difference".
    Interval: percentile bootstrap over prompts (n_boot resamples of the prompts with replacement, each refitted;
    the 2.5th and 97.5th percentiles of LC)."""
    wins, d = np.asarray(wins, dtype=float), np.asarray(length_diff, dtype=float)
    sd = d.std()
    X = np.stack([np.ones_like(d), d / sd if sd > 0 else np.zeros_like(d)], axis=1)  # (n, 2)
    _, prompt_of = np.unique(np.asarray(prompts), return_inverse=True)  # (n,) the prompt of each comparison
    n_prompts = prompt_of.max() + 1
    counts = np.random.default_rng(seed).multinomial(n_prompts, np.full(n_prompts, 1 / n_prompts), size=n_boot)
    weights = np.concatenate([np.ones((1, len(d))), counts[:, prompt_of]])  # row 0: the data; then (n_boot, n)
    lc = 1 / (1 + np.exp(-logistic_fits(X, wins, weights)[:, 0]))
    low, high = np.percentile(lc[1:], [2.5, 97.5])
    return float(lc[0]), float(low), float(high)


def score(judgments: list[dict], seed: int = 0) -> list[dict]:
    """One row per (model, step, temperature). The win rate counts valid verdicts only: an invalid one says
    nothing about which answer is better, so it is left out of the denominator but reported in `invalid`.
    Lengths are GPT-2 tokens, averaged over all answers: the model's (response_tokens) and the chosen ones it was
    compared with (chosen_tokens); lc_win_rate is length_controlled_win_rate over the valid verdicts. `ties`: the
    comparisons the ground-truth judge settled by its coin (equal true rewards; 0 for an LLM judge, which must answer
    A or B), counted among the wins and losses as the coin fell."""
    enc, tokens = common.get_tokenizer(), {}
    count = lambda text: tokens.setdefault(text, len(enc.encode_ordinary(text)))  # noqa: E731  (chosen ones repeat)
    groups = {}
    for j in judgments:
        groups.setdefault((j["model"], j["step"], j["temperature"]), []).append(j)
    rows = []
    for (name, step, t), group in groups.items():
        outcomes = [j["outcome"] for j in group]
        wins, losses = outcomes.count("win"), outcomes.count("loss")
        lo, hi = wilson_interval(wins, wins + losses)
        valid = [j for j in group if j["outcome"] != "invalid"]
        lc = (None, None, None) if not valid else length_controlled_win_rate(
            [j["outcome"] == "win" for j in valid], [count(j["response"]) - count(j["chosen"]) for j in valid],
            [j["prompt"] for j in valid], seed=seed)
        rows.append({"model": name, "step": step, "temperature": t, "n": len(outcomes), "wins": wins,
                     "losses": losses, "invalid": outcomes.count("invalid"),
                     "ties": sum(bool(j.get("tie")) for j in group),
                     "win_rate": wins / (wins + losses) if wins + losses else None, "ci_low": lo, "ci_high": hi,
                     "lc_win_rate": lc[0], "lc_ci_low": lc[1], "lc_ci_high": lc[2],
                     "response_tokens": float(np.mean([count(j["response"]) for j in group])),
                     "chosen_tokens": float(np.mean([count(j["chosen"]) for j in group]))})
    return rows


def preference_accuracy(s: Settings, out: Path) -> list[str]:
    """"Your language model is secretly a reward model", measured: for each name:scorer of --accuracy (reward.py's
    scorers), the share of held-out test pairs whose chosen answer it scores above the rejected one, with a Wilson
    95% interval (ties count as wrong), and the mean margin in the scorer's own units. -> the table's lines, also
    written to out/accuracy.md and out/accuracy.jsonl (the cache: a row is reused while its checkpoint is unchanged)."""
    device, dtype, _ = common.pick_device(s.device, s.dtype)
    tok = data.tokenize_dataset(s.dataset, "test")  # as training tokenizes it (max_length 512, prompt 256)
    # the test pairs themselves key the cache too: an edited file under the same name is scored again
    pairs_id = hashlib.sha256(b"".join(tok[f"{p}_ids"].tobytes() for p in data.PARTS)).hexdigest()[:16]
    cached = {r["key"]: r for r in common.read_jsonl(out / "accuracy.jsonl")}
    rows = []
    for item in filter(None, s.accuracy.split(",")):
        name, _, spec = item.partition(":")
        if not name or not spec:
            raise ValueError(f"--accuracy takes name:scorer pairs separated by commas, got {item!r}")
        key = json.dumps([spec, reward.scorer_id(spec), s.dataset, pairs_id, s.accuracy_n])
        if key not in cached:
            score, _ = reward.load_scorer(spec, device)
            margins = reward.pair_margins(score, tok, s.accuracy_n, device, dtype, s.batch_size)
            correct = sum(m > 0 for m in margins)
            lo, hi = wilson_interval(correct, len(margins))
            cached[key] = {"key": key, "scorer": spec, "n": len(margins), "correct": correct,
                           "accuracy": correct / len(margins), "ci_low": lo, "ci_high": hi,
                           "mean_margin": sum(margins) / len(margins)}
        rows.append({**cached[key], "name": name})
    return results_tables.write_accuracy(rows, s.dataset, out)


# ----------------------------------------------------------------------------------------------------------------


def check(s: Settings) -> float:
    """Settings that cannot work stop here, before anything is sampled; returns samples.md's temperature."""
    if s.judge not in ("openai", "groundtruth", "none"):
        raise ValueError(f"--judge is openai, groundtruth or none, got {s.judge!r}")
    if s.judge == "groundtruth" and s.dataset != "synthetic":
        raise ValueError("--judge=groundtruth needs --dataset=synthetic: only that task has a known true reward")
    show_temperature = min(s.temperatures) if s.show_temperature == -1 else s.show_temperature
    if show_temperature not in s.temperatures:
        raise ValueError(f"--show_temperature={s.show_temperature} is not one of --temperatures {s.temperatures}")
    return show_temperature


def main(argv: list[str] | None = None) -> list[dict]:
    s = common.parse_settings(Settings, argv)
    show_temperature, out = check(s), Path(s.out)
    print(json.dumps(common.settings_dict(s)))
    (out / "samples").mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(common.settings_dict(s), indent=2))
    samples = sampling.sample_all(s, out)  # 1. sample (sampling.py)
    accuracy = preference_accuracy(s, out) if s.accuracy else []
    shown = lambda rows: results_tables.write_samples(  # noqa: E731  samples.md: not the step checkpoints or swaps
        [j for j in rows if j["model"] != sampling.STEPS_MODEL and not j.get("swap")], show_temperature, s.seed,
        s.show, out, query_text)
    if s.judge == "none":
        shown(samples)
        return []
    comparisons = [{**x, "position": model_position(s.seed, x), "swap": False} for x in samples]
    picked = random.Random(s.seed).sample(range(len(comparisons)), min(s.swap_check, len(comparisons)))
    swapped = [{**comparisons[i], "position": "AB".replace(comparisons[i]["position"], ""), "swap": True}
               for i in picked]
    judgments = judge_all(comparisons + swapped, s, out)  # 2. judge
    rows = score(judgments[: len(comparisons)], s.seed)  # 3. score; the swapped copies only measure the judge
    swaps = list(zip([judgments[i] for i in picked], judgments[len(comparisons):]))
    results_tables.write_results(rows, out, results_tables.notes(s.judge, s.judge_model, accuracy, swaps))
    shown(judgments[: len(comparisons)])
    print(f"next: python plot.py --out={out}")  # 4. plot
    return rows


if __name__ == "__main__":
    try:
        main()
    except openai_client.JudgeError as e:
        raise SystemExit(f"judge.py: {e}")
