"""reward.py: the reward model, its Bradley-Terry loss, its checkpoints, the scorers built on it (the implicit
DPO reward), and judge.py's accuracy table of them. Best of N, which samples with them, is tested in
tests/test_sampling.py.

Oracles: closed forms (math.log/exp) for the Bradley-Terry loss, each row scored alone for a padded batch, dpo.py's
own loss for the implicit reward, unfused per-example log-probs and a hand-written Wilson interval for the accuracy
table, an uninterrupted run for a resumed one. Tiny models, fp32 on the CPU. Each docstring names its bug.
"""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import data
import dpo
import judge
import model as gpt
import reward
import sft
from machinery import common
from tests.helpers import SMALL, TINY, alone, random_rm
from tests.helpers import SYNTHETIC_FP32 as SYNTHETIC

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny tensors run faster on one thread

FAST = dict(device="cpu", dtype="float32", warmup_steps=1, batch_size=16, micro_batch_size=8, max_length=128,
            max_prompt_length=64, eval_every=0, save_every=0, checkpoint_every=0, n_eval=128, optimizer="adamw")


# ----------------------------------------------------------------------------------------------------------------
# The model and its loss


def test_bradley_terry_loss_matches_its_closed_form():
    """Catches a flipped sign (rewarding the rejected answer), log(sigmoid(.)) instead of logsigmoid (inf at
    large negative margins), a missing minus, and a wrong gradient: -log sigma(m) = log(1 + e^-m), d/dr_w =
    -sigma(-m), d/dr_l = +sigma(-m)."""
    chosen = torch.tensor([0.0, 1.0, -2.0, 5.0, -150.0, 100.0, -950.0], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([0.0, 0.5, 1.0, -5.0, 50.0, 0.0, 50.0], dtype=torch.float64, requires_grad=True)
    losses = reward.bradley_terry_loss(chosen, rejected)
    losses.sum().backward()
    for i, (w, l) in enumerate(zip(chosen.tolist(), rejected.tolist())):
        m = w - l
        want = math.log1p(math.exp(-m)) if m > -30 else -m + math.log1p(math.exp(m))
        sig = 1 / (1 + math.exp(m)) if m > -30 else 1.0  # sigma(-m)
        assert losses[i].item() == pytest.approx(want, rel=1e-9, abs=1e-12), (i, m, losses[i].item(), want)
        assert chosen.grad[i].item() == pytest.approx(-sig, rel=1e-9, abs=1e-12), (i, m, chosen.grad[i].item())
        assert rejected.grad[i].item() == pytest.approx(sig, rel=1e-9, abs=1e-12), (i, m, rejected.grad[i].item())
    assert losses[0].item() == pytest.approx(math.log(2)), "equal rewards must give log 2"


PAIRS = [  # prompts and responses of different lengths: every row of the batch padded differently
    {"prompt": "Q", "chosen": "", "rejected": " A longer rejected answer that goes on and on for a while."},
    {"prompt": "\n\nHuman: Hi\n\nAssistant:", "chosen": " Hello there, how can I help you today?", "rejected": " No."},
    {"prompt": "\n\nHuman: What is 2+2? Please explain it carefully.\n\nAssistant:", "chosen": " 4.",
     "rejected": " 5, obviously."},
]


def test_reward_is_read_at_the_last_real_token():
    """Catches a reward read at the wrong position: at the last column (right padding changes the reward), at the
    token before EOT (never sees the EOT the issue asks for), or one past it (padding). The padded [chosen; rejected]
    batch must give each row's reward alone, and the read token must be the response's EOT."""
    rm = random_rm()
    tok = data.tokenize_pairs(PAIRS, max_length=128, max_prompt_length=64)
    batch = data.preference_batch(tok, range(len(PAIRS)))
    tokens, last = reward.reward_inputs(batch)
    assert (last.sum(1) == 1).all() and (tokens[last] == gpt.EOT).all(), tokens[last]
    with torch.no_grad():
        got = rm(tokens, last)
    rows = [data.example(tok, i)[:2] for i in range(len(PAIRS))] + [data.example(tok, i)[::2] for i in range(len(PAIRS))]
    want = [alone(rm, p.tolist(), r.tolist()) for p, r in rows]
    diff = max(abs(g - w) for g, w in zip(got.tolist(), want))
    assert diff < 1e-5, f"padded batch {got.tolist()} vs each row alone {want}: max abs diff {diff}"
    assert len(set(round(w, 4) for w in want)) == len(want), f"rewards should differ between answers: {want}"


def test_the_zero_init_head_learns_faster_than_the_trunk():
    """Catches the head learning at the trunk's lr (the demo's reward model underfit: 73% held-out accuracy, train
    accuracy no higher, |w| = 0.12 after 125 steps at lr 3e-4). The first AdamW step from the zero head moves the
    trunk not at all (its gradient is zero through w = 0) and each head weight by lr * sign(gradient), so the mean
    margin grows by exactly HEAD_SCALE * lr * sum_i |mean(h_w - h_l)_i|: a bare w . h head would give 1x that."""
    torch.manual_seed(0)
    rm = reward.RewardModel(gpt.GPT(SMALL))
    tok = data.tokenize_pairs(PAIRS, max_length=128, max_prompt_length=64)
    tokens, last = reward.reward_inputs(data.preference_batch(tok, range(len(PAIRS))))
    with torch.no_grad():
        h = rm.gpt(tokens, hidden=True)[last]  # (2B, C): the read hidden states, by hand
    d = (h[: len(PAIRS)] - h[len(PAIRS):]).mean(0)  # (C,) mean chosen - rejected
    lr = 1e-3
    optimizer = torch.optim.AdamW(rm.parameters(), lr=lr, weight_decay=0.0)
    reward.bradley_terry_loss(*rm(tokens, last).split(len(PAIRS))).mean().backward()
    optimizer.step()
    with torch.no_grad():
        margin = (lambda r: (r[: len(PAIRS)] - r[len(PAIRS):]).mean().item())(rm(tokens, last))
    bare = lr * d.abs().sum().item()  # what r = w . h would gain in this step
    assert margin == pytest.approx(reward.HEAD_SCALE * bare, rel=1e-3), (margin, bare)
    assert reward.HEAD_SCALE >= 10, reward.HEAD_SCALE


def test_a_tiny_reward_model_learns_the_synthetic_preferences(tmp_path):
    """Catches a reward model that does not learn (loss not wired to the head, chosen and rejected halves swapped,
    gradients cut): starting at loss log 2 (zero head), 30 steps of a 2-layer random trunk must rank held-out pairs
    well above chance. Such a trunk first learns fillers and closings, which alone rank 67% of the pairs (all three
    parts of the true reward: 92%, the label noise caps it); it reaches ~65-70%."""
    train = data.tokenize_pairs(data.synthetic_pairs("train", n=480), max_length=128, max_prompt_length=64)
    test = data.tokenize_pairs(data.synthetic_pairs("test", n=128), max_length=128, max_prompt_length=64)
    torch.manual_seed(0)
    rm = reward.RewardModel(gpt.GPT(SMALL))
    s = sft.Settings(**{**FAST, "lr": 1e-2, "max_steps": 30, "eval_every": 30, "out": str(tmp_path)})
    sft.train(s, rm, reward.reward_loss, lambda ids: data.preference_batch(train, ids),
              lambda ids: data.preference_batch(test, ids), 128, data.example_lengths(train, "pref"), "reward")
    evals = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if r["split"] == "eval"]
    assert evals[0]["loss"] == pytest.approx(math.log(2)) and evals[0]["margin"] == 0, evals[0]
    assert evals[-1]["accuracy"] >= 0.6 and evals[-1]["margin"] > 0, evals[-1]


def test_checkpoint_layout_and_exact_resume(tmp_path):
    """Catches a reward model saved as a plain GPT-2 (head lost) or with prefixed keys (gpt.load_model and
    transformers could not read the trunk), a resume that restores the trunk but not the head or its Adam moments
    (2 + 2 resumed steps must equal 4 steps bit for bit), and a save that ignores the gathered weights FSDP hands it."""
    tok = data.tokenize_pairs(data.synthetic_pairs("train", n=64), max_length=128, max_prompt_length=64)
    config = dataclasses.replace(SMALL, dropout=0.1)  # dropout: the RNG state must be restored too

    def run(out, steps, seed=0):
        torch.manual_seed(seed)
        s = sft.Settings(**{**FAST, "lr": 1e-3, "max_steps": steps, "checkpoint_every": 2, "out": str(out)})
        batch = lambda ids: data.preference_batch(tok, ids)  # noqa: E731
        return sft.train(s, reward.RewardModel(gpt.GPT(config)), reward.reward_loss, batch, batch, 16,
                         data.example_lengths(tok, "pref"), "reward")

    straight = run(tmp_path / "straight", 4)
    run(tmp_path / "resumed", 2)
    resumed = run(tmp_path / "resumed", 4, seed=1)  # another init: only latest/ can make them agree
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), f"{k}: max abs diff {(v - resumed.state_dict()[k]).abs().max()}"
    final = tmp_path / "straight" / "final"
    trunk = gpt.load_model(str(final))  # the trunk in the usual layout
    assert all(torch.equal(v, straight.gpt.state_dict()[k]) for k, v in trunk.state_dict().items())
    loaded = reward.load_reward_model(final)
    assert torch.equal(loaded.head.weight, straight.head.weight) and straight.head.weight.abs().sum() > 0
    assert sorted(p.name for p in final.iterdir()) == sorted(["config.json", "model.safetensors", reward.HEAD_FILE,
        "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"])  # the last four: transformers
    # under FSDP sft.py passes the gathered whole weights: those must be written, not the module's own (shards)
    other = random_rm(SMALL, seed=3)
    straight.save(tmp_path / "given", state_dict=other.state_dict())
    written = reward.load_reward_model(tmp_path / "given").state_dict()
    assert all(torch.equal(v, written[k]) for k, v in other.state_dict().items()), "save ignored its state_dict"


# ----------------------------------------------------------------------------------------------------------------
# Scorers


def save_dpo_like(directory: Path, m: gpt.GPT, beta: float, reference: str) -> None:
    """A checkpoint as dpo.py writes it: its config.json records beta and the reference (--model)."""
    gpt.save_model(m, directory, {"stage": "dpo", "step": 1, "settings": {"beta": beta, "model": reference}})


def test_implicit_scorer_equals_beta_log_ratio_from_dpo_py(tmp_path):
    """Catches an implicit reward with the wrong sign, without beta, against the wrong reference (the policy
    itself, or the DPO run's reference when Best of N passes the sampler), or read from another beta: it must
    equal the rewards dpo.dpo_loss reports for dpo.concatenated_forward's log-probs."""
    torch.manual_seed(0)
    policy, ref, sampler = gpt.GPT(SMALL), gpt.GPT(SMALL), gpt.GPT(SMALL)
    gpt.save_model(ref, tmp_path / "sft")
    save_dpo_like(tmp_path / "dpo", policy, beta=0.3, reference=str(tmp_path / "sft"))
    tok = data.tokenize_pairs(PAIRS, max_length=128, max_prompt_length=64)
    batch = data.preference_batch(tok, range(len(PAIRS)))
    for reference, given in ((ref, None), (sampler, sampler)):
        score, _ = reward.load_scorer(f"implicit:{tmp_path / 'dpo'}", "cpu", reference=given)
        with torch.no_grad():
            got = score(batch)
            pc, pr, _ = dpo.concatenated_forward(policy.eval(), batch)
            rc, rr, _ = dpo.concatenated_forward(reference.eval(), batch)
        _, want_c, want_r = dpo.dpo_loss(pc, pr, rc, rr, beta=0.3)
        want = torch.cat([want_c, want_r])
        assert torch.allclose(got, want, atol=1e-5), f"implicit {got.tolist()} vs dpo.py {want.tolist()}"
        assert want.abs().min() > 1e-3, "policy and reference should differ"


def unfused_logp(m: gpt.GPT, prompt: list[int], response: list[int]) -> float:
    """log pi(response | prompt) from one unpadded forward and a plain log_softmax."""
    with torch.no_grad():
        logits = m(torch.tensor([prompt + response]))[0]
    logp = F.log_softmax(logits.double(), -1)
    return sum(logp[len(prompt) - 1 + t, tok].item() for t, tok in enumerate(response))


def test_accuracy_table_matches_a_hand_computation(tmp_path):
    """Catches an accuracy table that counts the wrong side (rejected > chosen), counts ties as right, mixes up
    pairs (a batch split at the wrong row), or computes the interval wrongly: each scorer's accuracy, margin and
    Wilson interval on 12 held-out pairs against per-pair unpadded scores and the formula written out here."""
    torch.manual_seed(0)
    gpt.save_model(gpt.GPT(TINY), tmp_path / "sft")
    rm = random_rm(TINY)
    rm.save(tmp_path / "rm")
    enc = common.get_tokenizer()
    pairs = data.synthetic_pairs("test")[:12]
    lm = gpt.load_model(str(tmp_path / "sft")).eval()
    hand = {"sft": [], "rm": []}
    for p in pairs:
        prompt = enc.encode_ordinary(p["prompt"])
        chosen, rejected = (enc.encode_ordinary(p[k]) + [gpt.EOT] for k in ("chosen", "rejected"))
        hand["sft"].append(unfused_logp(lm, prompt, chosen) - unfused_logp(lm, prompt, rejected))
        hand["rm"].append(alone(rm, prompt, chosen) - alone(rm, prompt, rejected))
    judge.main(SYNTHETIC + ["--models=", "--judge=none", "--accuracy_n=12", "--batch_size=5", f"--out={tmp_path}",
                            f"--accuracy=sft:likelihood:{tmp_path / 'sft'},rm:{tmp_path / 'rm'}"])
    rows = {r["name"]: r for r in common.read_jsonl(tmp_path / "accuracy.jsonl")}
    z = 1.96
    for name, margins in hand.items():
        k, n = sum(m > 0 for m in margins), len(margins)
        p = k / n
        center = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        r = rows[name]
        assert (r["n"], r["correct"]) == (n, k), (name, r, margins)
        assert r["ci_low"] == pytest.approx(center - half) and r["ci_high"] == pytest.approx(center + half), r
        assert r["mean_margin"] == pytest.approx(sum(margins) / n, abs=1e-4), (name, r["mean_margin"], margins)
        assert 0 < k < n, f"{name}: {k}/{n} right; the fixture should have both outcomes"
    assert f"| rm | `{tmp_path / 'rm'}` | 12 | {rows['rm']['accuracy']:.1%}" in (tmp_path / "accuracy.md").read_text()
