"""frontier.py on tiny random models: the estimators it reports and the runs it makes. Each docstring names the bug
its test would catch."""

import json
import math

import numpy as np
import pytest
import torch

import data
import frontier
import model as gpt
import reward

TINY = gpt.PRESETS["tiny"]


def test_the_kl_estimate_scores_exactly_the_sampled_tokens():
    """KL(pi || pi_SFT) is estimated by log pi(y|x) - log pi_SFT(y|x) over sampled answers, which is unbiased only if
    the log-probs are of exactly what was sampled. Catches the <|endoftext|> that ended an answer left out of its
    probability (or added to an answer cut by max_new_tokens, which never sampled it), and answers scored under the
    wrong prompt. Oracle: log_softmax of the model's logits over the whole sequence, by hand."""
    torch.manual_seed(0)
    net = gpt.GPT(TINY).eval()
    s = frontier.Settings(max_new_tokens=3)
    prompts, answers = [[10, 11, 12], [20, 21]], [[5, 6], [7, 8, 9]]  # the first stopped early: EOT was drawn
    got = frontier.answer_logps(net, prompts, answers, s, torch.device("cpu"))
    for prompt, answer, value in zip(prompts, [[5, 6, gpt.EOT], [7, 8, 9]], got):
        seq = torch.tensor([prompt + answer])
        with torch.no_grad():
            logp = torch.log_softmax(net(seq[:, :-1])[0].double(), -1)
        want = sum(logp[len(prompt) - 1 + t, tok].item() for t, tok in enumerate(answer))
        assert abs(value - want) <= 1e-4, (prompt, answer, value, want)


def test_intervals_are_the_normal_95_percent_ones():
    """Catches a standard deviation where the standard error belongs (or the population sd's n where n - 1 goes)."""
    values = [1.0, 2.0, 4.0, 7.0]
    mean, half = frontier.interval(values)
    assert mean == 3.5 and half == pytest.approx(1.96 * np.std(values, ddof=1) / 2)


@pytest.fixture
def tiny_demo(tmp_path, monkeypatch):
    """A demo directory with random tiny base and SFT models and a random reward model, and 16 synthetic pairs."""
    monkeypatch.setattr(data, "load_pairs", lambda dataset, split: data.synthetic_pairs(split, n=16))
    torch.manual_seed(0)
    for stage in ("base", "sft"):
        gpt.save_model(gpt.GPT(TINY), tmp_path / "demo" / stage / "final")
    rm = reward.RewardModel(gpt.GPT(TINY))
    with torch.no_grad():
        rm.head.weight.normal_()
    rm.save(tmp_path / "demo" / "reward" / "final")
    return tmp_path


def test_frontier_runs_each_method_and_reports_sft_and_best_of_n_exactly(tiny_demo, monkeypatch, capsys):
    """The whole script on tiny models (two methods, 2 steps each). Catches SFT's KL not exactly 0 (its log-ratio
    against itself), Best of N placed at another KL than log N - (N - 1)/N, ORPO started from the SFT model instead of
    the base model, a run trained again when its final/ exists, and missing outputs or progress lines."""
    monkeypatch.setattr(frontier, "METHODS", {"DPO": ["--beta=0.5"], "ORPO": ["--loss=orpo --orpo_lambda=1.0"]})
    argv = [f"--demo={tiny_demo / 'demo'}", "--steps=2", "--n=6", "--best_of=4", "--max_new_tokens=4",
            "--train=--dtype=float32 --dataset=synthetic --optimizer=adamw --batch_size=4 --micro_batch_size=4 "
            "--lr=1e-3 --warmup_steps=1 --n_eval=4 --device=cpu", "--device=cpu"]
    rows = frontier.main(argv)
    by = {(r["method"], r["strength"]): r for r in rows}
    assert by[("SFT", "")]["kl"] == 0.0 and by[("SFT", "")]["kl_ci"] == 0.0, by[("SFT", "")]
    for k in (1, 2, 4):
        assert by[("Best of N", f"N={k}")]["kl"] == pytest.approx(math.log(k) - (k - 1) / k)
    assert {("DPO", "beta=0.5"), ("ORPO", "orpo_lambda=1.0")} <= set(by), sorted(by)
    out = tiny_demo / "demo" / "frontier"
    orpo = json.loads((out / "ORPO_lossorpo_orpo_lambda1.0" / "final" / "config.json").read_text())
    assert orpo["meta"]["settings"]["model"].endswith("base/final") and orpo["meta"]["step"] == 4, orpo["meta"]
    assert (out / "frontier.png").stat().st_size > 1000 and "| DPO | beta=0.5 |" in (out / "frontier.md").read_text()
    printed = capsys.readouterr().out
    assert "frontier: DPO" in printed and "frontier: ORPO" in printed, printed
    stamp = (out / "DPO_beta0.5" / "final" / "model.safetensors").stat().st_mtime_ns
    frontier.main(argv)
    assert (out / "DPO_beta0.5" / "final" / "model.safetensors").stat().st_mtime_ns == stamp, "trained again"


def test_best_of_n_picks_the_highest_scored_of_the_first_n_answers(monkeypatch):
    """Best of N at N = k: per prompt, the true reward of the answer the reward model scores highest among the first k
    of its --best_of answers. Scripted answers, scores and rewards (answer i has true reward i) against the picks
    worked out by hand. Catches the pick taken over all --best_of answers instead of the first k (only the KL values
    were checked before, never the pick), the lowest score picked, scores of another prompt's answers, and a true
    reward read from another answer than the picked one."""
    prompts = [[1], [2], [3]]
    answers = [[100 + i] for i in range(12)]  # prompt j's answers are rows 4j ... 4j + 3
    scores = [0.1, 0.9, 0.3, 2.0, 5.0, -1.0, 0.0, 1.0, -3.0, -2.0, -1.0, -4.0]
    scored = []
    monkeypatch.setattr(frontier, "sample", lambda net, prompts, s, device, num_samples=1: answers)
    monkeypatch.setattr(reward, "load_scorer", lambda path, device: (None, gpt.PRESETS["tiny"]))
    monkeypatch.setattr(reward, "score_responses", lambda score, p, a, *args: scored.append((p, a)) or scores)
    monkeypatch.setattr(frontier, "true_rewards", lambda texts, a, enc: [float(x[0] - 100) for x in a])
    rows = frontier.best_of_n(None, ["a", "b", "c"], prompts, frontier.Settings(best_of=4), "cpu", None)
    assert scored == [([[1]] * 4 + [[2]] * 4 + [[3]] * 4, answers)], scored
    picks = {"N=1": [0, 4, 8], "N=2": [1, 4, 9], "N=4": [3, 4, 10]}  # argmax of scores[4j : 4j + k]
    got = {r["strength"]: r["reward"] for r in rows}
    want = {k: float(np.mean(p)) for k, p in picks.items()}
    assert got == pytest.approx(want), f"mean true reward of the picks: {got}, want {want} (answers {picks})"


def test_the_frontier_refuses_a_dataset_without_a_true_reward(tmp_path):
    """Catches make frontier pointed at HH running for minutes and then failing (or scoring nothing): HH has no true
    reward to put on the y axis. And a missing demo directory must say to run make demo."""
    with pytest.raises(SystemExit, match="needs the synthetic task's true reward"):
        frontier.main(["--dataset=hh"])
    with pytest.raises(SystemExit, match="run make demo first"):
        frontier.main([f"--demo={tmp_path / 'nothing'}"])


def test_the_rl_methods_train_through_ppo_py_on_the_same_prompts(tiny_demo, monkeypatch):
    """PPO, PPO-GT and online DPO points come from ppo.py. Catches them trained by dpo.py (or from the base model),
    PPO run without the demo's reward model, PPO-GT scored by the reward model, and runs of unequal length: each
    must see --ppo_iterations x batch_size prompts."""
    monkeypatch.setattr(frontier, "METHODS", {"PPO": ["--kl_coef=0.05"], "PPO-GT": ["--reward=groundtruth --kl_coef=0.05"],
                                              "online DPO": ["--algo=online_dpo --beta=0.5"]})
    argv = [f"--demo={tiny_demo / 'demo'}", "--n=4", "--best_of=2", "--max_new_tokens=4", "--ppo_iterations=1",
            "--ppo=--dtype=float32 --dataset=synthetic --batch_size=4 --minibatch_size=4 --epochs=1 --max_new_tokens=4 "
            "--device=cpu --max_prompt_length=32", "--device=cpu"]
    rows = frontier.main(argv)
    assert {(r["method"], r["strength"]) for r in rows} >= {("PPO", "kl_coef=0.05"), ("PPO-GT", "kl_coef=0.05"),
                                                             ("online DPO", "beta=0.5")}, rows
    out = tiny_demo / "demo" / "frontier"
    for run, algo, score in (("PPO_kl_coef0.05", "ppo", "model"), ("PPO-GT_rewardgroundtruth_kl_coef0.05", "ppo", "groundtruth"),
                             ("online_DPO_algoonline_dpo_beta0.5", "online_dpo", "model")):
        settings = json.loads((out / run / "final" / "config.json").read_text())["meta"]["settings"]
        assert (settings["algo"], settings["reward"]) == (algo, score), settings
        assert settings["model"].endswith("sft/final") and settings["reward_model"].endswith("reward/final")
        assert settings["iterations"] * settings["batch_size"] == 4, settings
