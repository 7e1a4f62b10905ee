"""judge.py's numbers as tables to read: results.md, samples.md, accuracy.md, and the swap check's line.

    python judge.py ...       # writes them into --out beside results.jsonl; plot.py draws the figures

Plain formatting, kept out of judge.py so that the lesson there (the judge's prompt, the REST call, the verdict, the
Wilson interval, the length-controlled win rate) reads without it. Nothing here computes a number that is not also
in results.jsonl or accuracy.jsonl; tests/machinery/test_results_tables.py reads the tables back against the
judgments.
"""

import json
import random
from pathlib import Path


def write_results(rows: list[dict], out: Path, notes: list[str]) -> None:
    """results.jsonl for plot.py, results.md for the README."""
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = ["| model | step | temperature | n | wins | losses | invalid | ties (coin) | win rate | 95% CI | LC win rate "
             "| LC 95% CI | tokens: model / chosen |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|---:|"]
    for r in rows:
        rate, lc = ("n/a" if r[k] is None else f"{r[k]:.1%}" for k in ("win_rate", "lc_win_rate"))
        lc_ci = "n/a" if r["lc_win_rate"] is None else f"{r['lc_ci_low']:.1%} – {r['lc_ci_high']:.1%}"
        table.append(f"| {r['model']} | {'' if r['step'] is None else r['step']} | {r['temperature']} | {r['n']} "
                     f"| {r['wins']} | {r['losses']} | {r['invalid']} | {r['ties']} | {rate} "
                     f"| {r['ci_low']:.1%} – {r['ci_high']:.1%} | {lc} | {lc_ci} "
                     f"| {r['response_tokens']:.1f} / {r['chosen_tokens']:.1f} |")
    (out / "results.md").write_text("\n".join(table + [""] + notes) + "\n")
    print("\n".join(table + [""] + notes))


def write_accuracy(rows: list[dict], dataset: str, out: Path) -> list[str]:
    """accuracy.jsonl and accuracy.md: one row per scorer of judge.py --accuracy; returns the table's lines."""
    (out / "accuracy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = [f"Preference accuracy on held-out {dataset} test pairs (score of chosen > score of rejected):", "",
             "| scorer | what | pairs | accuracy | 95% CI | mean margin |", "|---|---|---:|---:|---|---:|"]
    table += [f"| {r['name']} | `{r['scorer']}` | {r['n']} | {r['accuracy']:.1%} | {r['ci_low']:.1%} – "
              f"{r['ci_high']:.1%} | {r['mean_margin']:.3f} |" for r in rows]
    (out / "accuracy.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return table


def notes(judge: str, judge_model: str, accuracy: list[str], swaps: list[tuple[dict, dict]]) -> list[str]:
    """The prose under results.md's table: what the columns mean, the accuracy table, the swap check's line."""
    lines = [f"Judge: {judge_model if judge == 'openai' else 'true reward of the synthetic task'}. Win rate = "
             "wins / (wins + losses) against the test set's chosen answer; invalid verdicts (unparseable after one "
             "retry) are excluded from it and counted. 95% CI: Wilson score interval.",
             "LC win rate: length-controlled, the win rate a logistic regression of the verdict on the standardised "
             "length difference (model minus chosen, in tokens) predicts at equal length; 95% CI: bootstrap over "
             "prompts. Tokens: mean GPT-2 tokens of the model's answers / of the chosen answers. Answers to read: "
             "samples.md."]
    if judge == "groundtruth":
        lines.append("Ties: comparisons whose two answers earn the same true reward; a coin seeded by the comparison "
                     "decides them, as a judge forced to answer A or B would, so about half of them count as wins.")
    lines += [""] + accuracy if accuracy else []
    if swaps:
        lines.append(swap_summary(swaps))
    return lines


def swap_summary(pairs: list[tuple[dict, dict]]) -> str:
    """Position bias: a comparison judged in both orders whose verdict names the same letter both times
    followed the position, not the content."""
    valid = [(a, b) for a, b in pairs if a["verdict"] and b["verdict"]]
    same = sum(a["verdict"] == b["verdict"] for a, b in valid)
    share = f"{same / len(valid):.0%}" if valid else "n/a"
    return (f"swap check: {same}/{len(valid)} pairs ({share}) got the same letter in both orders, i.e. followed "
            f"position rather than content ({len(pairs) - len(valid)} pairs with an invalid verdict left out)")


def comparison_sentence(content: str) -> str:
    """The LLM judge's "Comparison: ..." sentence (Appendix C.2's format), or its first line."""
    lines = [line.strip() for line in content.strip().splitlines() if line.strip()] or [""]
    said = [line.split(":", 1)[1].strip() for line in lines if line.lower().lstrip("*_ ").startswith("comparison")]
    return said[0] if said else lines[0]


def write_samples(rows: list[dict], temperature: float, seed: int, show: int, out: Path, query_text) -> None:
    """samples.md: a seeded handful (--show) of evaluation prompts at one temperature, each with the test set's
    chosen answer, every model's answer side by side, and each verdict, with the LLM judge's one-sentence
    comparison or the true rewards of the synthetic task. What DPO changed, to read rather than to count.
    `rows`: the judgments (or plain samples, without "outcome", when nothing was judged) to show, of every
    temperature; query_text(prompt) -> the user's words, the heading of each prompt."""
    cell = lambda text: text.strip().replace("|", "\\|").replace("\n", "<br>") or "(empty)"  # noqa: E731
    rows = [j for j in rows if j["temperature"] == temperature]
    names = list(dict.fromkeys(j["model"] for j in rows))
    by_prompt = {}
    for j in rows:
        by_prompt.setdefault(j["prompt"], {})[j["model"]] = j
    prompts = list(by_prompt)
    picked = sorted(random.Random(seed).sample(range(len(prompts)), min(show, len(prompts))))
    lines = [f"# Answers side by side: {len(picked)} evaluation prompts at temperature {temperature}", "",
             f"A seeded subset (--seed={seed}, --show={show}) of the prompts scored in results.md; each model's "
             "answer is compared with the test set's chosen answer.", ""]
    for k, i in enumerate(picked, 1):
        answers = by_prompt[prompts[i]]
        first = next(iter(answers.values()))
        lines += [f"## {k}. {cell(query_text(first['prompt']))}", "",
                  "| | chosen (test set) | " + " | ".join(names) + " |", "|---|" + "---|" * (len(names) + 1),
                  "| answer | " + cell(first["chosen"]) + " | "
                  + " | ".join(cell(answers[n]["response"]) if n in answers else "" for n in names) + " |"]
        if any("outcome" in j for j in answers.values()):
            def verdict(j):
                if "reward_model" in j:  # the ground-truth judge: the true rewards decided, or on a tie its coin
                    rewards = f"{j['reward_model']:g} vs {j['reward_chosen']:g}"
                    return f"{j['outcome']} (tie {rewards}, coin)" if j.get("tie") else f"{j['outcome']} (reward {rewards})"
                return j["outcome"]
            lines.append("| verdict | | " + " | ".join(verdict(answers[n]) if n in answers else "" for n in names) + " |")
        if any("content" in j for j in answers.values()):
            lines.append("| judge's comparison | | " + " | ".join(
                cell(comparison_sentence(answers[n].get("content") or "")) if n in answers else "" for n in names) + " |")
        lines.append("")
    (out / "samples.md").write_text("\n".join(lines))
    print(f"wrote {out / 'samples.md'}: {len(picked)} prompts at temperature {temperature}")
