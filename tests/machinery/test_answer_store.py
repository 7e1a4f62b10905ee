"""machinery/answer_store.py, through judge.py: stored answers are reused only when the same weights made them with
the same settings (a checkpoint retrained in place, another max_new_tokens, files of an older judge.py are sampled
again), and a killed Best-of-N run resumes past its torn line. Tiny models, on the CPU. Each docstring names the bug
the test would catch."""

import json

import pytest
import torch

import judge
import model as gpt
import plot
import sampling
from machinery import common
from tests.helpers import SYNTHETIC, TINY

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny tensors run faster on one thread


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


def test_best_of_n_sampling_resumes_after_a_kill(best_of_run, monkeypatch):
    """Catches a resumed Best-of-N run that samples everything again, loses or rewrites stored answers, or breaks
    on the torn line a kill leaves mid-write (the next rows must not continue it); and a pool reused after its
    sampler was retrained into the same directory."""
    tmp_path, argv = best_of_run
    argv = argv + ["--judge=none"]
    judge.main(argv)
    file = tmp_path / "eval" / "samples" / "best_of.jsonl"
    whole = common.read_jsonl(file)
    lines = file.read_text().splitlines(keepends=True)
    file.write_text("".join(lines[:3]) + lines[3][:50])  # killed while writing the 4th row
    generated = []
    generate = gpt.GPT.generate
    spy = lambda self, prompts, *a, **k: generated.extend(prompts) or generate(self, prompts, *a, **k)  # noqa: E731
    monkeypatch.setattr(gpt.GPT, "generate", spy)
    judge.main(argv)
    again = common.read_jsonl(file)
    assert len(generated) == 8 - 3, f"the resumed run sampled {len(generated)} prompts, 5 were missing"
    assert again[:3] == whole[:3] and len(again) == 8, (len(again), "rows kept or added wrongly")
    assert all(line.startswith("{") for line in file.read_text().splitlines()), "a torn line was continued"
    gpt.save_model(gpt.GPT(TINY), tmp_path / "sft")  # the sampler retrained in place: its pool is stale
    generated.clear()
    judge.main(argv)
    # 8 answers of the sft model itself (judge.py's stale-sample check) + the pool's 8 prompts
    assert len(generated) == 8 + 8, f"after retraining the sampler {len(generated)} prompts were sampled, not 16"
