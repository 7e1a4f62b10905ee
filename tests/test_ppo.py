"""ppo.py: the pure pieces against hand-computed values and closed forms, a bandit PPO must win, online DPO's pairs,
and the loop on tiny models (metrics, resume, bad input, HH). Each docstring names the bug its test would catch."""

import gzip
import json
import os
import signal

import numpy as np
import pytest
import torch

import data
import model as gpt
import ppo
import reward
from machinery import checkpoints, common, fast_generate

SMALL = gpt.GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=128)  # 1.7M parameters, most of them wte


# ----------------------------------------------------------------------------------------------------------------
# The pure pieces


def test_gae_matches_a_hand_computed_example():
    """GAE with gamma = 0.9 and lambda = 0.8 on a row whose answer (3 tokens) follows a prompt position and precedes
    padding. Catches gamma and lambda swapped or dropped, the value after the last token not 0 (bootstrapping from
    padding), the recursion running forwards, and advantages or returns leaking onto prompt or padding."""
    mask = torch.tensor([[False, True, True, True, False]])
    rewards = torch.tensor([[9.0, 1.0, 0.0, 2.0, 9.0]])  # the 9s sit off the mask and must change nothing
    values = torch.tensor([[9.0, 0.5, 1.0, 1.5, 9.0]])
    g, lam = 0.9, 0.8
    d3 = 2.0 - 1.5  # delta_t = r_t + gamma V_(t+1) - V_t, V after the answer = 0
    d2 = 0.0 + g * 1.5 - 1.0
    d1 = 1.0 + g * 1.0 - 0.5
    a3, a2 = d3, d2 + g * lam * d3
    a1 = d1 + g * lam * a2
    advantages, returns = ppo.gae(rewards, values, mask, g, lam)
    want = torch.tensor([[0.0, a1, a2, a3, 0.0]])
    assert torch.allclose(advantages, want), (advantages, want)
    assert torch.allclose(returns, torch.tensor([[0.0, a1 + 0.5, a2 + 1.0, a3 + 1.5, 0.0]])), returns


def test_score_sits_at_the_last_real_token_and_none_on_padding():
    """Catches the score put at the first answer token, at the last column (padding for a shorter row), or spread
    over the answer; and a row whose answer fills the batch's width losing it."""
    mask = torch.tensor([[False, True, True, False, False], [False, True, True, True, True]])
    zeros = torch.zeros(2, 5)
    rewards, _ = ppo.shape_rewards(torch.tensor([3.0, -2.0]), zeros, zeros, mask, kl_coef=0.1)
    want = torch.zeros(2, 5)
    want[0, 2], want[1, 4] = 3.0, -2.0
    assert torch.equal(rewards, want), rewards


def test_kl_penalty_falls_on_every_answer_token_and_only_there():
    """-beta_KL (log pi - log pi_ref) at every answer token. Catches the penalty only at the last token (a sequence-level
    KL placed like the score), its sign flipped, or prompt and padding positions penalised."""
    mask = torch.tensor([[False, True, True, True, False]])
    logps = torch.tensor([[-1.0, -2.0, -0.5, -1.0, -7.0]])
    ref_logps = torch.tensor([[-3.0, -1.0, -1.5, -1.0, -1.0]])
    rewards, kl = ppo.shape_rewards(torch.tensor([0.0]), logps, ref_logps, mask, kl_coef=0.5)
    assert torch.allclose(kl, torch.tensor([[0.0, -1.0, 1.0, 0.0, 0.0]])), kl
    assert torch.allclose(rewards, torch.tensor([[0.0, 0.5, -0.5, 0.0, 0.0]])), rewards


def test_whitening_uses_the_masked_entries_only():
    """Catches mean and variance taken over the whole (B, T) tensor, zeros of prompt and padding included, and
    non-zero values left off the mask."""
    x = torch.tensor([[100.0, 1.0, 2.0, 3.0], [-50.0, 4.0, 5.0, 0.0]])
    mask = torch.tensor([[False, True, True, True], [False, True, True, False]])
    out = ppo.whiten(x, mask)
    inside = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    want = (inside - inside.mean()) / inside.std(unbiased=False)
    assert torch.allclose(out[mask], want, atol=1e-5), (out[mask], want)
    assert torch.equal(out[~mask], torch.zeros(3)), out


@pytest.mark.parametrize("ratio, advantage, want_loss, clipped", [
    (1.5, 1.0, -1.2, True),  # A > 0, ratio above 1 + eps: the gain stops at (1 + eps) A, no gradient
    (0.5, 1.0, -0.5, False),  # A > 0, ratio below 1 - eps: unclipped rho A (the min keeps the pessimistic term)
    (1.5, -1.0, 1.5, False),  # A < 0, ratio above 1 + eps: unclipped rho A, its gradient pushes rho down
    (0.5, -1.0, 0.8, True),  # A < 0, ratio below 1 - eps: (1 - eps) A, no gradient
])
def test_clipped_objective_closed_form_in_all_four_cases(ratio, advantage, want_loss, clipped):
    """-min(rho A, clip(rho, 0.8, 1.2) A) for each sign of A and a ratio on each side of the clip range. Catches
    min and max swapped, the clip applied to A instead of rho, the ratio inverted (pi_old / pi), a gradient through
    the clipped term, and a clip fraction that counts the wrong cases."""
    old = torch.log(torch.tensor([[0.3]]))
    logps = (old + torch.log(torch.tensor(ratio))).clone().requires_grad_(True)
    loss, clip_frac, approx_kl = ppo.policy_loss(logps, old, torch.tensor([[advantage]]), torch.ones(1, 1, dtype=torch.bool), 0.2)
    loss.backward()
    assert loss.item() == pytest.approx(want_loss, abs=1e-6), (loss.item(), want_loss)
    assert clip_frac.item() == float(clipped), clip_frac
    grad = logps.grad.item()
    assert (grad == 0.0) if clipped else grad == pytest.approx(-advantage * ratio, abs=1e-6), grad  # d(-rho A)/dlogp
    assert approx_kl.item() == pytest.approx((ratio - 1) - np.log(ratio), abs=1e-6)


def test_value_loss_is_clipped_around_the_rollout_values():
    """0.5 max((V - R)^2, (V_old + clip(V - V_old) - R)^2). Catches no clip (the value jumps to its target in one
    iteration), the clip around R or around 0 instead of V_old, min for max, and a missing 0.5."""
    mask = torch.ones(1, 2, dtype=torch.bool)
    values = torch.tensor([[1.0, 0.1]], requires_grad=True)
    old, returns = torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    loss, clip_frac = ppo.value_loss(values, old, returns, mask, clip=0.2)
    # token 1: moved 1.0 > 0.2, clipped to 0.2 -> (0.2 - 1)^2 = 0.64 beats 0; token 2: inside, (0.1 - 1)^2 = 0.81
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81) / 2), loss.item()
    assert clip_frac.item() == 0.5
    loss.backward()
    assert values.grad[0, 0] == 0 and values.grad[0, 1] == pytest.approx(0.5 * 2 * (0.1 - 1) / 2), values.grad


def test_an_answer_without_eot_gets_the_fixed_penalty(monkeypatch):
    """Catches an answer cut off by max_new_tokens scored as if it had ended (the reward model reads an EOT that was
    never sampled), an EOT appended to it in the batch, or the penalty given to an answer that did end."""
    monkeypatch.setattr(fast_generate, "generate", lambda net, prompts, n, **kw: [[5, 6], [7, 8, 9]])
    s = ppo.Settings(max_new_tokens=3, missing_eot_penalty=-4.0)
    answers, ended, batch = ppo.rollout(s, None, ["a", "b"], [[1, 2], [3]], 1, torch.device("cpu"), torch.float32, None)
    assert ended.tolist() == [True, False]
    assert batch["target_ids"][0][batch["loss_mask"][0]].tolist() == [5, 6, gpt.EOT]
    assert batch["target_ids"][1][batch["loss_mask"][1]].tolist() == [7, 8, 9]
    assert ppo.scores_with_penalty(torch.tensor([1.5, 2.5]), ended, s.missing_eot_penalty).tolist() == [1.5, -4.0]


def test_ppo_gt_reads_the_true_reward(tmp_path):
    """--reward=groundtruth scores answers with data.synthetic_reward, needing no reward model. Catches the reward
    model read instead (or required), the answer scored without its prompt, and groundtruth accepted on HH."""
    s = ppo.Settings(reward="groundtruth", dataset="synthetic", reward_model=str(tmp_path / "none"))
    score = ppo.make_scorer(s, torch.device("cpu"), torch.float32)
    enc = common.get_tokenizer()
    prompt = f"{data.HUMAN} Can you name a fruit?{data.ASSISTANT}"
    answers = [" A fruit is apple. Hope that helps!", " A tool is saw. Maybe."]
    got = score([prompt, prompt], [enc.encode(prompt)] * 2, [enc.encode(a) for a in answers])
    assert got.tolist() == [data.synthetic_reward(prompt, a) for a in answers] == [3.0, -0.5]
    with pytest.raises(SystemExit, match="groundtruth needs the synthetic task"):
        ppo.make_scorer(ppo.Settings(reward="groundtruth", dataset="hh"), torch.device("cpu"), torch.float32)


def test_ppo_raises_the_reward_of_a_bandit():
    """A 4-armed bandit (one-token answers) trained with the module's shaping, GAE, whitening and both losses.
    Catches any sign error between the score and the policy's gradient (the reward would fall), and a value loss
    that does not fit the value to the returns."""
    torch.manual_seed(0)
    arm_rewards = torch.tensor([0.0, 0.2, 0.5, 1.0])
    logits, value = torch.zeros(4, requires_grad=True), torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([logits, value], lr=0.05)
    mask = torch.ones(64, 1, dtype=torch.bool)
    start = (torch.softmax(logits, 0) @ arm_rewards).item()
    for _ in range(30):
        with torch.no_grad():
            arms = torch.multinomial(torch.softmax(logits, 0), 64, replacement=True)
            old_logps = torch.log_softmax(logits, 0)[arms][:, None]
            old_values = value.expand(64, 1).clone()
        rewards, _ = ppo.shape_rewards(arm_rewards[arms], old_logps, old_logps, mask, 0.1)
        advantages, returns = ppo.gae(rewards, old_values, mask, 1.0, 0.95)
        advantages = ppo.whiten(advantages, mask)
        for _ in range(2):
            pg, _, _ = ppo.policy_loss(torch.log_softmax(logits, 0)[arms][:, None], old_logps, advantages, mask, 0.2)
            vf, _ = ppo.value_loss(value.expand(64, 1), old_values, returns, mask, 0.2)
            opt.zero_grad()
            (pg + vf).backward()
            opt.step()
    end = (torch.softmax(logits, 0) @ arm_rewards).item()
    assert end > start + 0.3, (start, end)
    assert abs(value.item() - end) < 0.2, (value.item(), end)


def test_online_dpo_chooses_the_higher_scored_answer_and_drops_ties(monkeypatch):
    """pick_pairs and the update that uses it: two prompts, two answers each; the first pair is ranked, the second
    tied. Catches the lower-scored answer chosen, a tie kept as a pair (which the DPO loss would push one way for no
    reason), answers paired across prompts, and the share of ties not logged."""
    chosen, keep = ppo.pick_pairs(torch.tensor([[1.0, 2.0], [3.0, 3.0], [5.0, -1.0]]))
    assert chosen[[0, 2]].tolist() == [1, 0] and keep.tolist() == [True, False, True]
    prompts, answers = [[1, 2], [3, 4]], [[10], [11, 12], [13], [14]]  # rows 2j, 2j + 1: prompt j's answers
    batch = data.pad_rows([(np.array(prompts[j // 2]), np.array(a + [gpt.EOT])) for j, a in enumerate(answers)])
    seen = []

    def forward(net, mb):
        seen.append([row[m].tolist() for row, m in zip(mb["target_ids"], mb["loss_mask"])])
        return torch.zeros(len(mb["input_ids"]) // 2, requires_grad=True), torch.zeros(len(mb["input_ids"]) // 2), None

    monkeypatch.setattr(ppo.dpo, "concatenated_forward", forward)
    monkeypatch.setattr(ppo, "step", lambda *a: None)
    trained = torch.nn.Module()
    trained.policy = torch.nn.Linear(1, 1)
    times = {"reference": 0.0}
    stats = ppo.online_dpo_update(ppo.Settings(epochs=1), trained, None, None, batch, torch.tensor([1.0, 2.0, 3.0, 3.0]),
                                  torch.device("cpu"), torch.float32, times, torch.Generator().manual_seed(0))
    assert stats["ties"] == 0.5, stats
    pair = [[11, 12, gpt.EOT], [10, gpt.EOT]]  # [chosen; rejected] of prompt 0 alone
    assert seen == [pair, pair], seen  # the reference's forward, then the policy's


# ----------------------------------------------------------------------------------------------------------------
# The loop on tiny models


@pytest.fixture
def models(tmp_path, monkeypatch):
    """A small random SFT model and reward model on disk, and 16 synthetic training pairs (24 prompts at most)."""
    monkeypatch.setattr(data, "load_pairs", lambda dataset, split: data.synthetic_pairs(split, n=16))
    torch.manual_seed(0)
    gpt.save_model(gpt.GPT(SMALL), tmp_path / "sft")
    rm = reward.RewardModel(gpt.GPT(SMALL))
    with torch.no_grad():
        rm.head.weight.normal_(std=0.1)
    rm.save(tmp_path / "rm")
    return tmp_path


def argv(root, *extra):
    return [f"--model={root / 'sft'}", f"--reward_model={root / 'rm'}", "--dataset=synthetic", f"--out={root / 'run'}",
            "--device=cpu", "--dtype=float32", "--batch_size=4", "--minibatch_size=2", "--max_new_tokens=4",
            "--epochs=2", "--lr=1e-3", "--checkpoint_every=1", "--iterations=2", "--max_prompt_length=32", *extra]


def test_a_run_logs_every_metric_and_leaves_a_loadable_policy(models, capsys):
    """Two PPO iterations. Catches a missing metric or time bucket in metrics.jsonl, a progress line without ETA,
    final/ that model.load_model cannot read as a plain GPT-2 (or that holds the value model instead), and a run
    redone when final/ exists."""
    ppo.main(argv(models))
    rows = common.read_jsonl(models / "run" / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == [1, 2]
    for key in ("score", "kl", "entropy", "clip_frac", "approx_kl", "value_error", "time_rollout", "time_scoring",
                "time_reference", "time_update"):
        assert all(np.isfinite(r[key]) for r in rows), (key, rows)
    assert "ETA" in capsys.readouterr().out
    policy = gpt.load_model(str(models / "run" / "final"))
    assert not (models / "run" / "final" / reward.HEAD_FILE).exists()
    assert not torch.equal(policy.wte.weight, gpt.load_model(str(models / "sft")).wte.weight), "policy never moved"
    ppo.main(argv(models))
    assert "already done" in capsys.readouterr().out


def test_interrupted_run_resumes_to_the_same_weights(models, monkeypatch, tmp_path):
    """Ctrl-C during iteration 1 of 2: the iteration finishes, latest/ is saved, the process exits; the same command
    resumes. Catches a resume that loses the value model or the optimizer state, draws other prompts or samples, or
    restarts from iteration 0: its final weights would differ from an uninterrupted run's."""
    ppo.main(argv(models, f"--out={tmp_path / 'straight'}"))
    real_update = ppo.ppo_update

    def update(*args, **kwargs):
        if not (models / "run" / "metrics.jsonl").exists():
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, handled by checkpoints.ctrl_c_finishes_the_step
        return real_update(*args, **kwargs)

    monkeypatch.setattr(ppo, "ppo_update", update)
    with pytest.raises(SystemExit) as stop:
        ppo.main(argv(models, "--checkpoint_every=0"))
    assert stop.value.code == 130 and json.loads((models / "run" / "latest" / "state.json").read_text())["step"] == 1
    ppo.main(argv(models))
    for name in ("final/model.safetensors", "latest/value/model.safetensors", "latest/value/reward_head.safetensors"):
        got, want = (gpt.read_safetensors(d / name)[0] for d in (models / "run", tmp_path / "straight"))
        assert all(torch.equal(got[k], want[k]) for k in want), name


def test_online_dpo_runs_and_logs_ties(models, monkeypatch):
    """--algo=online_dpo: two answers per prompt, the DPO loss. Catches the tie share not logged and a run that
    never updates the policy (every pair dropped, or the loss detached)."""
    monkeypatch.setattr(ppo, "scores_with_penalty", lambda scores, ended, penalty: scores)  # a random model: no EOT
    ppo.main(argv(models, "--algo=online_dpo", "--beta=0.5", "--batch_size=6"))
    rows = common.read_jsonl(models / "run" / "metrics.jsonl")
    assert all(0.0 <= r["ties"] <= 1.0 for r in rows) and any("dpo_loss" in r for r in rows), rows
    policy = gpt.load_model(str(models / "run" / "final"))
    assert not torch.equal(policy.wte.weight, gpt.load_model(str(models / "sft")).wte.weight)


def no_sampling(monkeypatch):
    monkeypatch.setattr(fast_generate, "generate", lambda *a, **k: pytest.fail("sampled before the input was checked"))


def test_bad_input_stops_before_any_sampling(models, monkeypatch):
    """Catches a missing reward model, a policy directory given as a reward model, --reward=groundtruth on HH and a
    torchrun launch found only after minutes of sampling (or never)."""
    no_sampling(monkeypatch)
    with pytest.raises(ValueError, match="no reward model: no checkpoint"):
        ppo.main(argv(models, f"--reward_model={models / 'missing'}"))
    with pytest.raises(ValueError, match="no reward model: a DPO or SFT checkpoint"):
        ppo.main(argv(models, f"--reward_model={models / 'sft'}"))
    with pytest.raises(SystemExit, match="groundtruth needs the synthetic task"):
        ppo.main(argv(models, "--reward=groundtruth", "--dataset=hh"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="not torchrun"):
        ppo.main(argv(models))


def test_a_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(models, monkeypatch):
    """Catches a NaN loss stepped into the weights (and then saved over latest/), or the run going on silently."""
    real = ppo.policy_loss
    calls = []

    def poisoned(*args):
        calls.append(1)
        loss, clip_frac, approx_kl = real(*args)
        return (loss * float("nan") if len(calls) > 4 else loss), clip_frac, approx_kl  # iteration 2 (4 steps each)

    monkeypatch.setattr(ppo, "policy_loss", poisoned)
    with pytest.raises(RuntimeError, match="non-finite loss"):
        ppo.main(argv(models))
    assert json.loads((models / "run" / "latest" / "state.json").read_text())["step"] == 1
    weights = gpt.read_safetensors(models / "run" / "latest" / "model.safetensors")[0]
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert not (models / "run" / "final").exists()


def test_help_lists_every_setting_with_its_comment(capsys):
    """Catches a setting without its --help line."""
    with pytest.raises(SystemExit):
        ppo.main(["--help"])
    shown = capsys.readouterr().out
    assert "--kl_coef=0.05" in shown and "weight of the per-token KL penalty" in shown and "--algo=ppo" in shown


def test_two_iterations_on_the_hh_fixture(file_server, monkeypatch, tmp_path):
    """The real path (HH prompts, the reward model's score) on a loopback HH with tiny random models. Catches HH
    prompts not read, or a reward model scoring that only works on the synthetic task."""
    monkeypatch.setenv("DPO_CACHE", str(tmp_path / "cache"))
    h, a = data.HUMAN, data.ASSISTANT
    records = [{"chosen": f"{h} Hi {i}{a} Hello.", "rejected": f"{h} Hi {i}{a} Go away."} for i in range(6)]
    body = gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode())
    for subset in data.HH_SUBSETS:
        file_server.files[f"/datasets/Anthropic/hh-rlhf/resolve/main/{subset}/train.jsonl.gz"] = body
    torch.manual_seed(0)
    gpt.save_model(gpt.GPT(SMALL), tmp_path / "sft")
    reward.RewardModel(gpt.GPT(SMALL)).save(tmp_path / "rm")
    args = argv(tmp_path, "--dataset=hh")
    ppo.main(args)
    rows = common.read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert len(rows) == 2 and (tmp_path / "run" / "final" / "model.safetensors").exists(), rows
    assert checkpoints.resume(tmp_path / "run", *ppo_state(tmp_path / "sft", tmp_path / "rm"), master=False) == 2


def ppo_state(sft, rm):
    """A fresh policy + value bundle and optimizer, to read a latest/ back into."""
    from machinery import model_bundle
    bundle = model_bundle.Bundle(policy=gpt.load_model(str(sft)), value=reward.load_reward_model(rm))
    return bundle, torch.optim.AdamW(bundle.parameters())
