"""sampling.py: the answers judge.py scores, sampled from the `tiny` model on the synthetic task. Answers cut at the
next turn, few-shot prompts for a base model, a resumed run, and Best of N: the pool, its scores, the pick among the
first k, bad input, --compile. Tiny models, on the CPU. Each docstring names the bug the test would catch."""

import json

import pytest

import data
import judge
import model as gpt
import plot
import reward
import sampling
from machinery import common, fast_generate
from tests.helpers import SMALL, SYNTHETIC, alone, random_rm

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny tensors run faster on one thread


# ----------------------------------------------------------------------------------------------------------------
# Answers of the tiny model


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


# ----------------------------------------------------------------------------------------------------------------
# Best of N (conftest.py: best_of_run)


def pool_row(scores: list[float], t: float = 1.0, prompt: str = "p") -> dict:
    return {"sampler": "s", "scorer": "rm", "temperature": t, "seed": 0, "prompt": prompt, "chosen": "c",
            "responses": [f"answer {i}" for i in range(len(scores))], "scores": scores}


def test_best_of_k_picks_the_argmax_of_the_first_k_per_prompt_and_temperature():
    """Catches picking the minimum, the best of the whole pool instead of its first k, one choice shared by all
    prompts or temperatures, and k > N passing silently (it would judge best-of-N and call it best-of-k)."""
    pool = [pool_row([0.1, 0.9, 0.3, 2.0], 0.5, "a"), pool_row([5.0, -1.0, 0.0, 1.0], 0.5, "b"),
            pool_row([-3.0, -2.0, -1.0, -4.0], 1.0, "a")]
    picks = {k: [x["response"] for x in sampling.best_of_k(pool, k)] for k in (1, 2, 3, 4)}
    assert picks == {1: ["answer 0"] * 3, 2: ["answer 1", "answer 0", "answer 1"],
                     3: ["answer 1", "answer 0", "answer 2"], 4: ["answer 3", "answer 0", "answer 2"]}, picks
    assert [x["model"] for x in sampling.best_of_k(pool, 2)] == ["best_of_2"] * 3
    with pytest.raises(ValueError, match="best of 5 asked of a pool holding 4"):
        sampling.best_of_k(pool, 5)
    assert sampling.best_of_ks(128, curve=True) == [1, 2, 4, 8, 16, 32, 64, 128]
    assert sampling.best_of_ks(6, curve=True) == [1, 2, 4, 6] and sampling.best_of_ks(6, curve=False) == [6]


def test_best_of_n_pool_scores_selection_results_and_figures(best_of_run):
    """Catches N samples of one prompt that are all the same draw (cache rows not really sampled apart), scores
    attached to the wrong answers (each is re-scored alone here), a judged answer that is not the pool's argmax,
    best_of rows missing from the results, and the win-rate-vs-N figure or Figure 3's Best-of-N line not drawn."""
    tmp_path, argv = best_of_run
    rows = judge.main(argv + ["--best_of_curve=true"])
    pool = common.read_jsonl(tmp_path / "eval" / "samples" / "best_of.jsonl")
    assert len(pool) == 4 * 2 and all(len(r["responses"]) == len(r["scores"]) == 4 for r in pool)
    assert all(len(set(r["responses"])) > 1 for r in pool), [r["responses"] for r in pool]
    enc, rm = common.get_tokenizer(), reward.load_reward_model(tmp_path / "rm").eval()
    for r in pool[:2]:
        want = [alone(rm, enc.encode_ordinary(r["prompt"]), enc.encode_ordinary(x) + [gpt.EOT]) for x in r["responses"]]
        assert r["scores"] == pytest.approx(want, abs=1e-4), (r["responses"], r["scores"], want)
    judged = [j for j in common.read_jsonl(tmp_path / "eval" / "judgments.jsonl") if j["model"] == "best_of_4"]
    assert len(judged) == 8
    best = {(r["temperature"], r["prompt"]): r["responses"][max(range(4), key=r["scores"].__getitem__)] for r in pool}
    samples = sampling.best_of_k(pool, 4)
    assert all(x["response"] == best[(x["temperature"], x["prompt"])] for x in samples)
    cells = {(r["model"], r["temperature"]) for r in rows}
    assert cells == {(m, t) for m in ("sft", "best_of_1", "best_of_2", "best_of_4") for t in (0.5, 1.0)}, cells
    plot.main([f"--out={tmp_path / 'eval'}", "--runs=", f"--sizes={tmp_path}/none"])
    assert (tmp_path / "eval" / "best_of_n.png").stat().st_size > 1000
    assert {r["model"] for r in plot.largest_best_of(rows)} == {"sft", "best_of_4"}


def test_bad_best_of_input_gives_clear_errors(best_of_run):
    """Catches each bad input the issue lists running on silently or failing obscurely: a scorer that is no
    reward model, an implicit scorer without a DPO checkpoint, N < 1, and a reward model built for another
    tokenizer or context size (k > N is checked in the selection test)."""
    tmp_path, argv = best_of_run
    cases = [
        ([f"--scorer={tmp_path / 'sft'}"], "is no reward model"),
        ([f"--scorer={tmp_path / 'nothing'}"], "is no reward model"),
        (["--scorer=implicit:"], "names no checkpoint"),
        ([f"--scorer=implicit:{tmp_path / 'sft'}"], "is no DPO checkpoint"),
        (["--best_of=0"], "at least 1"),
        (["--best_of=-2"], "at least 1"),
        ([f"--scorer={tmp_path / 'small_rm'}"], "another tokenizer or context size"),
    ]
    random_rm(SMALL).save(tmp_path / "small_rm")  # context 128, the sampler's is 256
    for extra, message in cases:
        with pytest.raises(ValueError, match=message):
            judge.main(argv + ["--judge=none"] + extra)


def test_compile_reaches_both_sampling_paths(best_of_run, monkeypatch):
    """judge.py --compile=true must reach generate for the models' own answers and for the Best-of-N pool (catches
    either call dropping it). The spy then generates eagerly: compiled generation itself is tested in
    tests/machinery/test_fast_generate.py."""
    tmp_path, argv = best_of_run
    seen, generate = [], fast_generate.generate

    def spy(net, *args, compiled=False, **kwargs):
        seen.append((kwargs.get("num_samples", 1), compiled))
        return generate(net, *args, **kwargs)

    monkeypatch.setattr(fast_generate, "generate", spy)
    judge.main(argv + ["--compile=true", "--judge=none"])
    assert {n for n, _ in seen} == {1, 4} and all(c for _, c in seen), seen
