"""machinery/results_tables.py: samples.md read back against the stored samples and the judgments (the fake
OpenAI judge of conftest.py gives the comparison sentences). Each docstring names the bug the test would catch."""


import torch

import judge
import model as gpt
from machinery import common


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
