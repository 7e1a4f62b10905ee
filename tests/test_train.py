"""Tests for sft.py and dpo.py: the training loop and the DPO step, each against an independent reference.

Oracles: per-example unpadded log-probs for the fused forward, closed forms (math.log/exp on floats) for every
loss variant, one big batch for accumulated micro-batches, an uninterrupted run for a resumed one, one process
for two (DDP on gloo), and a learning check on a small fixture. Tiny models, fp32 on the CPU, a few steps each.
Each test's docstring names the bug it would catch.
"""

import dataclasses
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

import bench
import data
import dpo
import model as gpt
import sft
from machinery import batch_order, common, fast_generate, reference_logps

ROOT = Path(__file__).resolve().parents[1]
SMALL = gpt.GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=128)  # 1.7M parameters, 1.6M of them wte
LOG2 = math.log(2)
# Every run: CPU, fp32, full lr from the first step (warmup would scale step 1 by 1/150), no periodic work.
FAST = dict(device="cpu", dtype="float32", warmup_steps=1, lr=1e-3, batch_size=8, micro_batch_size=2,
            max_length=128, max_prompt_length=64, eval_every=0, save_every=0, checkpoint_every=0, n_eval=8)


def small_model(seed: int = 0, dropout: float = 0.0) -> gpt.GPT:
    torch.manual_seed(seed)
    return gpt.GPT(dataclasses.replace(SMALL, dropout=dropout))


def small_pairs(split: str = "train", n: int = 32) -> dict:
    return data.tokenize_pairs(data.synthetic_pairs(split, n=n), max_length=128, max_prompt_length=64)


def category_pairs(n: int = 32) -> dict:
    """n pairs "name a <category>" -> chosen: an item of it, rejected: an item of another category. Responses of
    2-3 tokens keep a step cheap (on a CPU the 50257-way softmax at every response token dominates)."""
    names, pairs = list(data.CATEGORIES), []
    for i in range(n):
        asked, other = names[i % 8], names[(i + 1 + i // 8) % 8]
        question = data.QUESTIONS[i % 3].format(a=data.article(asked), category=asked)
        chosen, rejected = data.CATEGORIES[asked][i // 8], data.CATEGORIES[other][i % 6]
        pairs.append({"prompt": f"{data.HUMAN} {question}{data.ASSISTANT}", "chosen": f" {chosen}.",
                      "rejected": f" {rejected}."})
    return data.tokenize_pairs(pairs, max_length=128, max_prompt_length=64)


def settings(cls=sft.Settings, **kw):
    return cls(**{**FAST, **kw})


def run_sft(s, m, tok, loss_fn=sft.sft_loss, on="response"):
    """sft.train on the tokenized pairs `tok` (also its eval set), as sft.main would call it."""
    batch = lambda ids: data.sft_batch(tok, ids, on=on)  # noqa: E731
    kind = "sft" if on == "response" else "pref"
    return sft.train(s, m, loss_fn, batch, batch, data.n_examples(tok), data.example_lengths(tok, kind), "sft")


def run_dpo(s, m, tok, reference=None):
    """sft.train with the DPO loss, as dpo.main calls it: a live `reference` model, or None to precompute."""
    batch = lambda ids: data.preference_batch(tok, ids)  # noqa: E731
    if reference is None:
        reference = small_model()  # the policy's starting weights (small_model is seeded)
        batch = reference_logps.with_reference(batch, reference_logps.reference_logps(s, reference, tok, "train"))
        loss_fn = dpo.make_loss(s)
    else:
        loss_fn = dpo.make_loss(s, reference.eval())
    return sft.train(s, m, loss_fn, batch, batch, data.n_examples(tok), data.example_lengths(tok, "pref"), "dpo")


def records(out: Path, split: str) -> list[dict]:
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return gpt.read_safetensors(Path(path))[0]


def max_abs_diff(a: dict, b: dict) -> tuple[float, str]:
    """Largest |a - b| over every tensor of two state dicts with the same keys, and where it is."""
    assert a.keys() == b.keys(), f"different tensors: {sorted(a.keys() ^ b.keys())[:5]}"
    return max(((a[k].double() - b[k].double()).abs().max().item(), k) for k in a)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: these tensors are tiny, and on a busy 2-core machine two OpenMP threads mostly wait
    for each other (this file took 90 s with two threads, 30 s with one, while another job held the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private DPO_CACHE, so reference log-probs and tokenized arrays from other tests are never reused."""
    monkeypatch.setenv("DPO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ----------------------------------------------------------------------------------------------------------------
# Log-probs: the fused, padded, masked forward against one unpadded forward per example

PAIRS = [  # prompts of 1 to 20 tokens, responses of 1 (EOT alone) to 13 tokens: every row padded differently
    {"prompt": "Q", "chosen": "", "rejected": " A longer rejected answer that goes on and on for a while."},
    {"prompt": "\n\nHuman: Hi\n\nAssistant:", "chosen": " Hello there, how can I help you today?", "rejected": " No."},
    {"prompt": "\n\nHuman: What is 2+2? Please explain it carefully, step by step, in detail.\n\nAssistant:",
     "chosen": " 4.", "rejected": " 5, obviously, since two and two make five."},
]


def unfused_logp(m, prompt: list[int], response: list[int]) -> float:
    """log pi(response | prompt): the model on prompt + response alone (no padding, no mask, no select),
    log_softmax over the whole vocabulary, summed over the positions whose next token is a response token."""
    seq = prompt + response
    with torch.no_grad():
        logits = m(torch.tensor([seq[:-1]]))[0]  # (T - 1, V): position t predicts seq[t + 1]
    logp = torch.log_softmax(logits.float(), dim=-1)
    return sum(logp[t, seq[t + 1]].item() for t in range(len(prompt) - 1, len(seq) - 1))


def test_fused_logps_equal_unpadded_per_example_logps():
    """Catches an off-by-one in the loss mask or the target shift, padding leaking into a real row, rows of the
    `select`ed logits reassigned to the wrong example (index_add order), and chosen/rejected halves swapped."""
    m = small_model().eval()
    tok = data.tokenize_pairs(PAIRS, max_length=128, max_prompt_length=64)
    batch = data.preference_batch(tok, range(len(PAIRS)))
    with torch.no_grad():
        fused = sft.sequence_logps(m, batch)  # (2B,)
        chosen, rejected, _ = dpo.concatenated_forward(m, batch)  # (B,) each
    enc = common.get_tokenizer()  # the reference tokenizes by itself, so data.py's slicing is under test too
    want = []
    for side in ("chosen", "rejected"):
        for pair in PAIRS:
            response = enc.encode_ordinary(pair[side]) + [gpt.EOT]
            want.append(unfused_logp(m, enc.encode_ordinary(pair["prompt"]), response))
    want = torch.tensor(want, dtype=torch.float64)
    # 1e-5, plus 1e-6 relative: an fp32 sum near -150 is only resolved to 1.5e-5 (one ulp). A one-token shift or
    # leaked padding changes a row by ~10 and ~0.1.
    tol = 1e-5 + 1e-6 * want.abs()
    for name, got in (("sequence_logps", fused), ("concatenated_forward", torch.cat([chosen, rejected]))):
        diff = (got.double() - want).abs()
        assert (diff <= tol).all(), f"{name} {got.tolist()}\nunfused {want.tolist()}\nmax abs diff {diff.max().item()}"


def gpt2_like_logits_model() -> gpt.GPT:
    """SMALL with GPT-2's logit magnitudes: every logit near -100 (here -104 to -91), as GPT-2's are. All token
    embeddings share a large direction u, and ln_f's bias pulls the final hidden state against it, so
    h . wte_i = h . e_i + h . (20 u) carries a common offset of about -100 (GPT-2 learned such a shared component).
    The large embeddings also make the residual stream, and so ln_f's output, nearly insensitive to the blocks'
    bf16 rounding: what is left between bf16 autocast and fp32 is the vocabulary projection's precision."""
    m = small_model().eval()
    u = torch.tensor([1.0, -1.0] * (SMALL.n_embd // 2)) / math.sqrt(SMALL.n_embd)  # zero mean: LayerNorm keeps it
    with torch.no_grad():
        m.wte.weight.mul_(15).add_(20 * u)  # tied: the embedding and the output projection
        m.ln_f.bias.copy_(-10.5 * u)
    return m


def test_log_probs_under_bf16_autocast_match_fp32_at_gpt2_logit_sizes(cache):
    """Catches a vocabulary projection that runs in bf16 under autocast (the fp32 cast coming after the rounding):
    bf16 spacing at |logit| ~ 100 is 0.5, which put 0.9 nat of error into 6-22-token sequences here (see the
    message when it fails), a reward-margin noise of 0.09 at beta = 0.1. Summed log-probs under bf16 autocast must
    match fp32 to 0.05 nat per sequence in training (sequence_logps), in the reference precompute, and the logits
    that sampling draws from must be fp32 and match too."""
    m = gpt2_like_logits_model()
    tok = small_pairs(n=8)
    batch = data.preference_batch(tok, range(8))
    with torch.no_grad():
        logits = m(batch["input_ids"])
        assert -110 < logits.min() and logits.max() < -85, f"logits {logits.min():.1f} to {logits.max():.1f}"
        want = sft.sequence_logps(m, batch)  # fp32, no autocast
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = sft.sequence_logps(m, batch)
    assert got.dtype == torch.float32, got.dtype
    err = (got - want).abs()
    assert err.max() <= 0.05, f"training log-probs, bf16 vs fp32: per-sequence errors {err.tolist()}, max {err.max()}"

    tables = {dtype: reference_logps.reference_logps(settings(dpo.Settings, dtype=dtype), m, tok, "train")
              for dtype in ("float32", "bfloat16")}
    err = np.abs(tables["bfloat16"] - tables["float32"])
    assert err.max() <= 0.05, f"reference log-probs, bf16 vs fp32: errors {err.tolist()}, max {err.max()}"

    sample_next = gpt.sample_next
    prompt = tok["prompt_ids"][: tok["prompt_offsets"][1]].tolist()
    for name, generate in (("model.generate", m.generate), ("fast_generate.generate", partial(fast_generate.generate, m))):
        seen = []
        spy = lambda logits, *a, **k: seen.append(logits) or sample_next(logits, *a, **k)  # noqa: E731
        for autocast in (torch.autocast("cpu", enabled=False), torch.autocast("cpu", dtype=torch.bfloat16)):
            with autocast, pytest.MonkeyPatch.context() as mp:
                mp.setattr(gpt, "sample_next", spy)
                generate([prompt], 1, temperature=1.0)
        fp32, bf16 = seen
        assert bf16.dtype == torch.float32, f"{name} samples from {bf16.dtype} logits"
        err = (bf16 - fp32).abs().max().item()
        assert err <= 0.05, f"{name}'s sampling logits, bf16 vs fp32: max abs diff {err}"


# ----------------------------------------------------------------------------------------------------------------
# The DPO loss: closed forms at hand-computed points

# (policy_chosen, policy_rejected, reference_chosen, reference_rejected) log-probs; h = pi_logratio - ref_logratio
POINTS = [(-1.0, -3.0, -2.0, -2.5),  # h = 2 - 0.5 = 1.5: the policy already prefers y_w more than pi_ref
          (-4.0, -2.0, -3.0, -3.0),  # h = -2: the policy prefers the rejected response
          (-7.5, -7.5, -7.5, -7.5)]  # h = 0: policy == reference
BETA = 0.5


def softplus(x: float) -> float:  # log(1 + e^x) = -log sigmoid(-x)
    return math.log(1 + math.exp(x))


def closed_form(loss: str, pc, pr, rc, rr, beta=BETA, eps=0.0) -> float:
    h = (pc - pr) - (0.0 if loss == "reference_free" else rc - rr)
    if loss == "ipo":  # Azar et al. Eq. 17
        return (h - 1 / (2 * beta)) ** 2
    return (1 - eps) * softplus(-beta * h) + eps * softplus(beta * h)  # DPO Eq. 7; cDPO mixes in the flipped label


def as_tensors(points, requires_grad=False):
    return [torch.tensor(col, dtype=torch.float64, requires_grad=requires_grad) for col in zip(*points)]


@pytest.mark.parametrize("variant,kw", [("dpo", {}), ("cdpo", {"label_smoothing": 0.2}), ("ipo", {"ipo": True}),
                                        ("reference_free", {"reference_free": True})])
def test_each_loss_variant_matches_its_closed_form(variant, kw):
    """Catches a sign or beta misplaced in Eq. 7, cDPO's smoothing weights swapped, IPO's target 1/(2 beta)
    written as 1/beta or beta/2, reference_free still subtracting the reference ratio, and unscaled rewards."""
    losses, chosen_rewards, rejected_rewards = dpo.dpo_loss(*as_tensors(POINTS), beta=BETA, **kw)
    want = [closed_form(variant, *p, eps=kw.get("label_smoothing", 0.0)) for p in POINTS]
    diff = max(abs(a - b) for a, b in zip(losses.tolist(), want))
    assert diff <= 1e-12, f"{variant}: losses {losses.tolist()}, closed form {want}, max abs diff {diff}"
    want_rewards = [(BETA * (pc - rc), BETA * (pr - rr)) for pc, pr, rc, rr in POINTS]  # beta log pi/pi_ref
    got_rewards = list(zip(chosen_rewards.tolist(), rejected_rewards.tolist()))
    diff = max(abs(a - b) for got, want in zip(got_rewards, want_rewards) for a, b in zip(got, want))
    assert diff <= 1e-12, f"rewards {got_rewards}, expected {want_rewards}, max abs diff {diff}"


LENGTHS = [(4, 9), (1, 1), (12, 3)]  # (|y_w|, |y_l|) of each of POINTS' pairs, in tokens


def test_simpo_orpo_and_unlikelihood_match_their_closed_forms():
    """Each new objective at hand-computed points. Catches SimPO's length normalisation left out (or by the wrong
    answer's length), gamma added instead of subtracted; ORPO's odds taken of the summed log-prob instead of the
    per-token one, log(1 - P) written as log(1 - log P), the NLL term summed or left out, lambda on the wrong term;
    unlikelihood's alpha on the chosen term, or its log(1 - p) sum with the wrong sign."""
    pc, pr = as_tensors([(p[0], p[1]) for p in POINTS])
    lc, lr = as_tensors(LENGTHS)
    gamma, lam, alpha = 0.3, 0.7, 0.4
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    log_odds = lambda m: m - math.log(1 - math.exp(m))  # noqa: E731  (m: the per-token log-likelihood, log P)
    cases = {
        "simpo": (dpo.simpo_loss(pc, pr, lc, lr, BETA, gamma),
                  [(-math.log(sigmoid(BETA * a / n - BETA * b / m - gamma)), BETA * a / n, BETA * b / m)
                   for (a, b, *_), (n, m) in zip(POINTS, LENGTHS)]),
        "orpo": (dpo.orpo_loss(pc, pr, lc, lr, lam),
                 [(-a / n - lam * math.log(sigmoid(log_odds(a / n) - log_odds(b / m))), log_odds(a / n), log_odds(b / m))
                  for (a, b, *_), (n, m) in zip(POINTS, LENGTHS)]),
        "unlikelihood": (dpo.unlikelihood_loss(pc, pr, torch.tensor([-0.5, -2.0, -0.01], dtype=torch.float64), alpha),
                         [(-a - alpha * u, a, b) for (a, b, *_), u in zip(POINTS, [-0.5, -2.0, -0.01])]),
    }
    for name, (got, want) in cases.items():
        got = list(zip(*(g.tolist() for g in got)))
        diff = max(abs(x - y) for g, w in zip(got, want) for x, y in zip(g, w))
        assert diff <= 1e-12, f"{name}: (loss, chosen reward, rejected reward) {got}, closed form {want}, diff {diff}"


def test_the_new_losses_read_the_right_tokens_of_the_batch(cache):
    """Through make_loss on a real batch, against the model's own per-token log-probs: catches lengths that count
    padding, chosen and rejected halves swapped, and unlikelihood's sum taken over the chosen tokens (or over all
    positions) instead of the rejected answer's."""
    m, tok = small_model(), small_pairs(n=4)
    batch = data.preference_batch(tok, range(4))
    with torch.no_grad():
        logp = torch.log_softmax(m(batch["input_ids"]).double(), -1).gather(2, batch["target_ids"][..., None])[..., 0]
        mask = batch["loss_mask"]
        seq, n = (logp * mask).sum(-1), mask.sum(-1).double()
        unlikely = (torch.log1p(-logp.exp()) * mask).sum(-1)
        for loss, knob, want in [
            ("simpo", {"simpo_gamma": 0.3}, dpo.simpo_loss(seq[:4], seq[4:], n[:4], n[4:], 2.0, 0.3)[0]),
            ("orpo", {"orpo_lambda": 0.7}, dpo.orpo_loss(seq[:4], seq[4:], n[:4], n[4:], 0.7)[0]),
            ("unlikelihood", {"unlikelihood_alpha": 0.4}, -seq[:4] - 0.4 * unlikely[4:])]:
            s = settings(dpo.Settings, loss=loss, **knob, **({"beta": 2.0} if loss == "simpo" else {}))
            got, metrics = dpo.make_loss(s)(m, batch)
            assert torch.allclose(got.double(), want, atol=1e-4), (loss, got.tolist(), want.tolist())
            assert "ref_logp_chosen" not in metrics
    # a random model's tokens are all unlikely (log(1 - p) ~ -2e-5), so the unlikelihood term needs chosen log-probs
    # to be seen at all: per-token log-probs from -0.01 to -3 in place of the model's
    tokens = -torch.linspace(0.01, 3.0, int(mask.sum()), dtype=torch.float64)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sft, "token_logps", lambda model, batch: tokens)
        got, _ = dpo.make_loss(settings(dpo.Settings, loss="unlikelihood", unlikelihood_alpha=0.4))(m, batch)
    per_row = torch.zeros(8, dtype=torch.float64).index_put_((mask.nonzero()[:, 0],), tokens, accumulate=True)
    unlikely = torch.zeros(8, dtype=torch.float64).index_put_((mask.nonzero()[:, 0],), torch.log1p(-tokens.exp()),
                                                              accumulate=True)
    want = -per_row[:4] - 0.4 * unlikely[4:]
    assert torch.allclose(got.double(), want, atol=1e-5), (got.tolist(), want.tolist())


def test_a_loss_given_a_knob_it_does_not_read_stops_with_a_clear_error():
    """Catches a knob that silently does nothing (--beta with ORPO, --label_smoothing with SimPO), ORPO or SimPO
    handed a reference model they would never use, and a misspelled loss."""
    cases = [(dict(loss="orpo", beta=0.2), "--beta=0.2 is not used by --loss=orpo, which reads --orpo_lambda"),
             (dict(loss="simpo", label_smoothing=0.1), "--label_smoothing=0.1 is not used by --loss=simpo"),
             (dict(loss="dpo", simpo_gamma=1.0), "--simpo_gamma=1.0 is not used by --loss=dpo"),
             (dict(loss="unlikelihood", orpo_lambda=1.0), "--orpo_lambda=1.0 is not used"),
             (dict(loss="orpo", reference="live"), "--loss=orpo uses no reference model"),
             (dict(loss="simpos"), "--loss must be one of")]
    for kw, message in cases:
        with pytest.raises(SystemExit, match=message):
            dpo.make_loss(settings(dpo.Settings, **kw))
    dpo.make_loss(settings(dpo.Settings, loss="cdpo", label_smoothing=0.1, beta=0.3))  # its own knobs: fine


def test_dpo_logs_ties_at_step_0_and_a_flat_reference_for_the_log_prob_panel(tmp_path, monkeypatch):
    """At step 0 pi = pi_ref and every implicit-reward margin is exactly 0: catches that logged as 0% accuracy with no
    tie count, reference log-probs not logged (or moving) for training.png's panel, and the panel not drawn."""
    import plot

    monkeypatch.setattr(data, "load_pairs", lambda dataset, split: data.synthetic_pairs(split, n=16))
    out = tmp_path / "dpo"
    dpo.main([f"--{k}={v}" for k, v in {**FAST, "batch_size": 4, "micro_batch_size": 4}.items()] + [
        "--model=tiny", "--dataset=synthetic", f"--out={out}", "--max_steps=3", "--n_eval=4", "--eval_every=1"])
    evals = records(out, "eval")
    assert evals[0]["reward_ties"] == 1.0 and evals[0]["reward_accuracy"] == 0.0, evals[0]
    assert evals[-1]["reward_ties"] < 1.0, evals[-1]
    assert len({(e["ref_logp_chosen"], e["ref_logp_rejected"]) for e in evals}) == 1, evals
    assert evals[0]["ref_logp_chosen"] == pytest.approx(evals[0]["logp_chosen"], abs=1e-5)
    plot.plot_training([str(out)], tmp_path / "training.png")
    assert (tmp_path / "training.png").stat().st_size > 1000


def test_loss_is_log_2_when_policy_equals_reference():
    """Catches a missing reference term or a mis-scaled sigmoid: at pi == pi_ref every pair is a coin flip,
    -log sigma(0) = log 2, and both implicit rewards are exactly zero."""
    logps = torch.tensor([-3.0, -40.0, -150.0])
    other = torch.tensor([-5.0, -12.0, -151.0])
    for beta in (0.1, 0.5, 2.0):
        losses, chosen_rewards, rejected_rewards = dpo.dpo_loss(logps, other, logps.clone(), other.clone(), beta=beta)
        diff = (losses - LOG2).abs().max().item()
        assert diff <= 1e-6, f"beta {beta}: losses {losses.tolist()}, log 2 = {LOG2}, max abs diff {diff}"
        assert chosen_rewards.abs().max() == 0 and rejected_rewards.abs().max() == 0, (chosen_rewards, rejected_rewards)


def test_gradients_flow_only_through_the_policy():
    """Catches gradients reaching the reference log-probs (pi_ref is a constant, even for a caller that forgot
    no_grad), rewards that are not detached (they are logged metrics, not part of the objective), and a wrong
    policy gradient: d loss / d policy_chosen = -beta sigma(-beta h) (Eq. 8), the opposite for rejected."""
    policy_chosen, policy_rejected, _, _ = as_tensors(POINTS, requires_grad=True)
    _, _, reference_chosen, reference_rejected = as_tensors(POINTS, requires_grad=True)
    losses, chosen_rewards, rejected_rewards = dpo.dpo_loss(policy_chosen, policy_rejected, reference_chosen,
                                                            reference_rejected, beta=BETA)
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad, "rewards must be detached"
    losses.sum().backward()
    assert reference_chosen.grad is None and reference_rejected.grad is None, \
        f"reference got gradients {reference_chosen.grad}, {reference_rejected.grad}"
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    want = [-BETA * sigmoid(-BETA * ((pc - pr) - (rc - rr))) for pc, pr, rc, rr in POINTS]
    for name, got, sign in (("chosen", policy_chosen.grad, 1), ("rejected", policy_rejected.grad, -1)):
        diff = max(abs(g - sign * w) for g, w in zip(got.tolist(), want))
        assert diff <= 1e-12, f"d loss / d policy_{name}: {got.tolist()}, closed form {[sign * w for w in want]}, " \
                              f"max abs diff {diff}"


def test_live_reference_model_gets_no_gradient():
    """Catches the live reference's forward running with autograd on (every step would keep a second graph in
    memory) and gradients reaching its weights; all policy weights must get one."""
    policy, reference = small_model(), small_model()
    grad_enabled = []
    reference.register_forward_hook(lambda module, args, output: grad_enabled.append(torch.is_grad_enabled()))
    s = settings(dpo.Settings)
    batch = data.preference_batch(small_pairs(n=4), range(4))
    losses, metrics = dpo.make_loss(s, reference.eval())(policy, batch)
    losses.sum().backward()
    assert grad_enabled == [False], f"reference forward(s) with autograd enabled: {grad_enabled}"
    assert all(p.grad is None for p in reference.parameters()), "the reference model received gradients"
    assert all(p.grad is not None for p in policy.parameters()), "some policy weights received no gradient"
    diff = (losses - LOG2).abs().max().item()  # same weights: every pair at log 2
    assert diff <= 1e-5, f"losses {losses.tolist()}, log 2 = {LOG2}, max abs diff {diff}"


# ----------------------------------------------------------------------------------------------------------------
# The loop: accumulation, resume, non-finite loss


@pytest.fixture
def gradients(monkeypatch):
    """Every gradient the optimizer steps with (after accumulation and clipping), one dict per step."""
    steps, make_optimizer = [], sft.make_optimizer

    def recording(s, m, device):
        optimizer = make_optimizer(s, m, device)
        step = optimizer.step

        def recording_step(*args, **kwargs):
            steps.append({name: p.grad.detach().clone() for name, p in m.named_parameters()})
            return step(*args, **kwargs)

        optimizer.step = recording_step
        return optimizer

    monkeypatch.setattr(sft, "make_optimizer", recording)
    return steps


@pytest.mark.parametrize("loss", ["sft", "pretrain", "dpo"])
def test_accumulated_micro_batches_equal_one_big_batch(tmp_path, gradients, loss):
    """Catches a loss not divided by the accumulation count (k times the gradient), divided per micro-batch
    instead of per global batch, zero_grad inside the micro-batch loop (only the last micro-batch counts) or
    missing after the step (step 2 adds step 1's gradient), and for train_on=all (2 rows per example) a wrong
    rows-per-example count: the one-batch gradient must also equal a plain backward of the batch's mean loss.

    Gradients are compared, not weights: RMSprop/Adam turn an exactly-zero gradient (the key bias: softmax
    ignores it) into +-lr/100 steps driven by rounding noise, which differs with the micro-batch padding."""
    tok = small_pairs()
    if loss == "dpo":
        batch_fn, kind = (lambda ids: data.preference_batch(tok, ids)), "pref"
        loss_fn = dpo.make_loss(settings(dpo.Settings), small_model().eval())  # a live reference: the start point
    else:
        on, kind = ("all", "pref") if loss == "pretrain" else ("response", "sft")  # pretrain: 2 rows per example
        batch_fn, loss_fn = (lambda ids: data.sft_batch(tok, ids, on=on)), sft.sft_loss
    lengths = data.example_lengths(tok, kind)
    for micro in (2, 8):  # 4 micro-batches of 2, then 1 batch of 8; two steps each (save_every: weights of step 1)
        s = settings(out=str(tmp_path / f"micro{micro}"), max_steps=2, micro_batch_size=micro, grad_clip=1e9,
                     optimizer="adamw", save_every=1)
        sft.train(s, small_model(), loss_fn, batch_fn, batch_fn, data.n_examples(tok), lengths, loss)
    assert len(gradients) == 4, len(gradients)
    for step in (0, 1):
        # the oracle: one plain backward of the mean loss over this step's global batch, from this step's weights
        m = small_model() if step == 0 else gpt.load_model(str(tmp_path / "micro8" / "step_000001"))
        losses, _ = loss_fn(m, batch_fn(batch_order.epoch_batches(lengths, s.batch_size, s.seed, 0)[step]))
        losses.mean().backward()
        direct = {name: p.grad for name, p in m.named_parameters()}
        for what, got, want in ((f"step {step + 1}: 4 x 2 vs 1 x 8", gradients[step], gradients[2 + step]),
                                (f"step {step + 1}: 1 x 8 vs batch-mean backward", gradients[2 + step], direct)):
            diff, where = max_abs_diff(got, want)
            scale = max(g.abs().max().item() for g in want.values())
            assert diff <= 1e-6 * max(1.0, scale), f"{what}: max abs gradient diff {diff} at {where} (max |grad| " \
                f"there {got[where].abs().max().item()} vs {want[where].abs().max().item()}; largest {scale})"
    first = lambda run: records(tmp_path / run, "train")[0]  # noqa: E731
    a, b = first("micro2"), first("micro8")
    for key in ("loss", "grad_norm"):
        assert abs(a[key] - b[key]) <= 1e-5 * abs(b[key]), \
            f"{key}: 4 x 2 gives {a[key]}, 1 x 8 gives {b[key]}, diff {abs(a[key] - b[key])}"


def test_warmup_starts_above_zero_and_reaches_the_peak(tmp_path):
    """Catches an off-by-one in the linear warmup, min(1, step / warmup) instead of (step + 1) / warmup: the first
    step would run at learning rate 0 and leave the weights where they were. The logged schedule must be
    lr * (1/3, 2/3, 1, 1), and one step must move the weights."""
    start = small_model()
    s = settings(out=str(tmp_path / "run"), max_steps=4, warmup_steps=3, save_every=1)
    run_sft(s, small_model(), small_pairs())
    logged = [r["lr"] for r in records(tmp_path / "run", "train")]
    want = [s.lr / 3, 2 * s.lr / 3, s.lr, s.lr]
    assert logged == pytest.approx(want), f"lr schedule {logged}, expected {want}"
    moved = max_abs_diff(tensors(tmp_path / "run" / "step_000001" / "model.safetensors"), gpt.ours_to_hf(start))
    assert moved[0] > 0, "the first optimizer step left every weight unchanged"


RESUME = dict(checkpoint_every=2, eval_every=2, warmup_steps=3)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """4 steps in one go, with dropout 0.1 (so the RNG matters), lr warmup over 3 steps (so the step count
    matters) and a checkpoint every 2 steps."""
    out = tmp_path_factory.mktemp("uninterrupted")
    run_sft(settings(out=str(out), max_steps=4, **RESUME), small_model(dropout=0.1), category_pairs())
    return out


@pytest.mark.parametrize("crash", ["none", "leftover latest.tmp", "only latest.old"])
def test_resume_is_bit_for_bit(tmp_path, uninterrupted, crash):
    """Catches any state a resume loses or changes: RNG (dropout masks repeat -> weights differ), optimizer
    moments or their step count, the data position (batches re-seen), the lr schedule. And the latest/ swap:
    a kill mid-save leaves a half-written latest.tmp or only latest.old; either must still resume exactly."""
    out = tmp_path / "run"
    run_sft(settings(out=str(out), max_steps=2, **RESUME), small_model(dropout=0.1), category_pairs())
    if crash == "leftover latest.tmp":  # killed while writing the next checkpoint
        shutil.copytree(out / "latest", out / "latest.tmp")
        (out / "latest.tmp" / "state.json").unlink()
        (out / "latest.tmp" / "optimizer.safetensors").write_bytes(b"\x00" * 100)
    elif crash == "only latest.old":  # killed between the two renames of replace_dir
        (out / "latest").rename(out / "latest.old")
    # other initial weights and RNG state: only what latest/ restores can make the runs agree
    run_sft(settings(out=str(out), max_steps=4, **RESUME), small_model(seed=1, dropout=0.1), category_pairs())
    assert records(out, "train")[-1]["step"] == 4
    want = tensors(uninterrupted / "final" / "model.safetensors")
    got = tensors(out / "final" / "model.safetensors")
    unequal = [k for k in want if not torch.equal(want[k], got[k])]
    diff, where = max_abs_diff(want, got)
    assert not unequal, f"{crash}: weights differ in {unequal[:5]}; max abs diff {diff} at {where}"
    want = tensors(uninterrupted / "latest" / "optimizer.safetensors")  # moments, step counts, RNG state
    got = tensors(out / "latest" / "optimizer.safetensors")
    unequal = [k for k in want if not torch.equal(want[k], got[k])]
    assert want.keys() == got.keys() and not unequal, f"{crash}: optimizer/RNG state differs in {unequal[:5]}"
    leftovers = sorted(p.name for p in out.iterdir() if p.name.startswith("latest."))
    assert not leftovers, f"{crash}: {leftovers} left beside latest/"


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    """Catches training on through a NaN (every weight would turn NaN), a check placed after the optimizer
    step or after the checkpoint (latest/ would hold NaN weights), and an error that does not say what to do."""
    calls = {"n": 0}

    def nan_at_step_3(m, batch):
        losses, metrics = sft.sft_loss(m, batch)
        calls["n"] += 1
        return (losses * float("nan") if calls["n"] == 3 else losses), metrics

    out = tmp_path / "run"
    s = settings(out=str(out), max_steps=5, micro_batch_size=8, checkpoint_every=1)  # one loss_fn call per step
    with pytest.raises(RuntimeError, match=r"non-finite loss \(nan\) at step 2.*--lr"):
        run_sft(s, small_model(), category_pairs(), loss_fn=nan_at_step_3)
    state = json.loads((out / "latest" / "state.json").read_text())
    assert state["step"] == 2, f"latest/ is at step {state['step']}, expected the last good step 2"
    weights = tensors(out / "latest" / "model.safetensors")
    bad = [k for k, t in weights.items() if not torch.isfinite(t).all()]
    assert not bad, f"latest/ holds non-finite weights in {bad[:5]}"
    # the same run without the NaN, stopped after 2 steps, is what latest/ must hold
    run_sft(settings(out=str(tmp_path / "good"), max_steps=2, micro_batch_size=8), small_model(), category_pairs())
    diff, where = max_abs_diff(tensors(tmp_path / "good" / "final" / "model.safetensors"), weights)
    assert diff == 0, f"latest/ differs from 2 good steps: max abs diff {diff} at {where}"


# ----------------------------------------------------------------------------------------------------------------
# DPO end to end: precomputed vs live reference, learning, the reference cache


def test_reference_precomputed_and_live_give_log_2_at_the_first_step(tmp_path, cache, monkeypatch):
    """Catches a reference that is not the policy's starting point (e.g. --model=tiny loading a second random
    init), precomputed log-probs assigned to the wrong pairs, and chosen/rejected columns swapped: at step 0
    the policy equals the reference, so the loss is log 2 either way."""
    monkeypatch.setattr(data, "load_pairs", lambda dataset, split: data.synthetic_pairs(split, n=8))
    losses = {}
    for reference in ("precomputed", "live"):
        out = tmp_path / reference
        dpo.main([f"--{k}={v}" for k, v in {**FAST, "batch_size": 4, "micro_batch_size": 4}.items()] + [
            "--model=tiny", "--dataset=synthetic", f"--reference={reference}", f"--out={out}", "--max_steps=1"])
        losses[reference] = records(out, "train")[0]["loss"]
    diff = abs(losses["precomputed"] - losses["live"])
    assert diff <= 1e-5, f"first-step loss: precomputed {losses['precomputed']}, live {losses['live']}, diff {diff}"
    for reference, loss in losses.items():
        assert abs(loss - LOG2) <= 1e-5, f"{reference}: first-step loss {loss}, log 2 = {LOG2}, diff {abs(loss - LOG2)}"


def test_dpo_learns_the_preferences_of_a_small_fixture(tmp_path, cache):
    """Catches a DPO step that does not learn: the loss's sign flipped, chosen and rejected swapped, rewards
    computed from the wrong halves, gradients not reaching the weights. 30 AdamW steps on 32 synthetic pairs
    must make the implicit reward rank (almost) every pair of the fixture right (at step 0 it ties on all)."""
    s = settings(dpo.Settings, out=str(tmp_path / "run"), optimizer="adamw", max_steps=30,
                 micro_batch_size=8, n_eval=32, eval_every=1000, beta=0.1)
    run_dpo(s, small_model(), small_pairs(n=32))
    before, after = records(tmp_path / "run", "eval")[0], records(tmp_path / "run", "eval")[-1]
    assert (before["step"], after["step"]) == (0, 30), (before, after)
    assert abs(before["loss"] - LOG2) <= 1e-5, f"step 0: eval loss {before['loss']}, log 2 = {LOG2}"
    assert after["reward_accuracy"] > 0.9, f"reward accuracy {after['reward_accuracy']} after 30 steps " \
                                           f"(step 0: {before['reward_accuracy']}), want > 0.9"
    assert after["loss"] < before["loss"] - 0.1 and after["reward_margin"] > 0, \
        f"eval loss {before['loss']} -> {after['loss']}, reward margin {after['reward_margin']}"


def test_reference_cache_is_keyed_by_the_tokens(cache):
    """Catches a stale reference table: the cache key must change when the tokenized pairs change (an edited
    data.py, a re-downloaded dataset), not only with the settings, or DPO trains against another data set's
    log-probs (silently, when the number of pairs happens to match)."""
    s = settings(dpo.Settings, dataset="synthetic", micro_batch_size=4)
    reference = small_model().eval()
    for seed in (0, 1):  # same settings and split, different pairs
        tok = data.tokenize_pairs(data.synthetic_pairs("train", n=8, seed=seed), max_length=128,
                                  max_prompt_length=64)
        table = reference_logps.reference_logps(s, reference, tok, "train")
        want = torch.stack(dpo.concatenated_forward(reference, data.preference_batch(tok, range(8)))[:2], -1).detach()
        diff = (torch.from_numpy(table) - want).abs().max().item()
        assert diff <= 1e-4, \
            f"pairs of seed {seed}: table {table.tolist()}\nexpected {want.tolist()}\nmax abs diff {diff}"


# ----------------------------------------------------------------------------------------------------------------
# Which examples: the held-out subset, the batch order, the SFT targets


def spy_batches(tok, calls: list):
    """A batch function that records the example indices of every batch it builds."""
    def fn(ids):
        calls.append([int(i) for i in ids])
        return data.sft_batch(tok, ids)
    return fn


def test_evaluation_uses_the_same_seeded_subset_of_the_whole_split(tmp_path):
    """Catches evaluating the first n_eval held-out pairs (HH's test split is read subset by subset, so its first
    256 pairs are all harmless-base: the eval curves would describe one subset), and a subset that changes between
    evaluations (the curve would mix noise from different pairs into its trend)."""
    tok, evaluated = category_pairs(32), []
    s = settings(out=str(tmp_path), n_eval=8, eval_every=1, max_steps=2, micro_batch_size=8)
    sft.train(s, small_model(), sft.sft_loss, lambda ids: data.sft_batch(tok, ids), spy_batches(tok, evaluated), 32,
              data.example_lengths(tok, "sft"), "sft")
    want = batch_order.eval_subset(32, 8, s.seed).tolist()
    assert evaluated == [want] * 3, f"evaluated {evaluated} at steps 0, 1, 2; want {want} each time"
    assert want != list(range(8)) and max(want) >= 16, f"subset {want} is not spread over the 32 held-out pairs"
    assert batch_order.eval_subset(32, 8, 1).tolist() != want and batch_order.eval_subset(5, 8, 0).tolist() == list(range(5))


def test_dpo_precomputes_reference_logps_only_for_the_evaluated_rows(tmp_path, cache, monkeypatch):
    """Catches precomputing the reference over the whole test split (~8.5K HH pairs: minutes of a GPU for 256
    used rows), and a table whose rows are not the evaluated pairs (the step-0 eval loss would then not be log 2)."""
    monkeypatch.setattr(data, "load_pairs", lambda dataset, split: data.synthetic_pairs(split, n=16))
    sizes, precompute = {}, reference_logps.precompute
    spy = lambda s, run, ref, w, tok, split, *fns: sizes.setdefault(split, data.n_examples(tok)) and precompute(  # noqa: E731
        s, run, ref, w, tok, split, *fns)
    monkeypatch.setattr(reference_logps, "precompute", spy)
    out = tmp_path / "run"
    dpo.main([f"--{k}={v}" for k, v in {**FAST, "batch_size": 4, "micro_batch_size": 4}.items()] + [
        "--model=tiny", "--dataset=synthetic", f"--out={out}", "--max_steps=1", "--n_eval=4", "--eval_every=1"])
    assert sizes == {"train": 16, "test": 4}, f"reference log-probs computed for {sizes} pairs; want test: 4"
    loss = records(out, "eval")[0]["loss"]
    assert abs(loss - LOG2) <= 1e-5, f"step-0 eval loss {loss}, log 2 = {LOG2}: reference rows are not the eval rows"


@pytest.mark.parametrize("group_by_length", [True, False])
def test_group_by_length_switch_sets_the_batch_order(tmp_path, group_by_length):
    """Catches --group_by_length not reaching the sampler (the reference code's random batches could then not be
    reproduced): the training batches must be exactly batch_order.epoch_batches' with that flag."""
    tok, trained = category_pairs(32), []
    s = settings(out=str(tmp_path), max_steps=3, micro_batch_size=8, group_by_length=group_by_length)
    lengths = data.example_lengths(tok, "sft")
    sft.train(s, small_model(), sft.sft_loss, spy_batches(tok, trained), None, 32, lengths, "sft")
    want = [b.tolist() for b in batch_order.epoch_batches(lengths, 8, s.seed, 0, group_by_length=group_by_length)[:3]]
    assert trained == want, f"group_by_length={group_by_length}: trained on {trained}, want {want}"


def test_sft_targets_one_per_prompt_keeps_the_last_pair_of_each_prompt(monkeypatch):
    """Catches --sft_targets=one_per_prompt not reaching the training set, or keeping another pair than the
    reference code (its dict by prompt ends up with the LAST pair's chosen response as the SFT target)."""
    pairs = [{"prompt": f"{data.HUMAN} Q{q}?{data.ASSISTANT}", "chosen": f" answer {i}", "rejected": " no"}
             for i, q in enumerate([0, 1, 0, 2, 1, 0])]
    tok = data.tokenize_pairs(pairs, max_length=64, max_prompt_length=32)
    assert data.one_per_prompt(tok).tolist() == [3, 4, 5], data.one_per_prompt(tok)
    monkeypatch.setattr(sft, "prepare", lambda cls, argv, stage: (common.parse_settings(cls, argv), tok, tok))
    monkeypatch.setattr(sft, "load_policy", lambda s: None)
    trained = {}
    monkeypatch.setattr(sft, "train", lambda s, m, loss_fn, train_batch, eval_batch, n_eval, lengths, stage:
                        trained.update(lengths=lengths, batch=train_batch(range(len(lengths)))))
    enc = common.get_tokenizer()
    for targets, want in (("every_pair", range(6)), ("one_per_prompt", [3, 4, 5])):
        sft.main([f"--sft_targets={targets}"])
        batch = trained["batch"]
        answers = [enc.decode(row[mask].tolist()) for row, mask in zip(batch["target_ids"], batch["loss_mask"])]
        assert len(trained["lengths"]) == len(want) and answers == [f" answer {i}<|endoftext|>" for i in want], \
            f"--sft_targets={targets}: SFT targets {answers}, want the chosen answers of pairs {list(want)}"


# ----------------------------------------------------------------------------------------------------------------
# Several processes: DDP and FSDP on gloo against one process with the same global batch; checkpoints across modes

SMALL_SPLITS = {"train": 32, "test": 8}  # precomputing reference log-probs of all 4,500 pairs takes minutes here
DRIVER = """
import sys
sys.path.insert(0, {root!r})
import data, dpo
data.load_pairs = lambda dataset, split: data.synthetic_pairs(split, n={splits!r}[split])
dpo.main(sys.argv[1:])
"""
# Every multi-process comparison trains with these settings. 5 held-out examples split 3 + 2 over two ranks: in
# micro-batches of 2, rank 0 runs one more eval forward than rank 1, which FSDP's gathers must not wait on forever.
TWO = {**FAST, "lr": 1e-4, "eval_every": 2, "n_eval": 5}


def torchrun(args: list[str], env: dict | None = None) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    result = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """runs(script, mode, steps=3, name=None, resume=None, extra=()) -> the run directory, trained once per module.

    Every run starts from the same initial weights (runs.init) with the TWO settings; mode is "one" (this process),
    "ddp" or "fsdp" (torchrun, 2 processes on gloo). FSDP runs also recompute activations (--grad_checkpoint) and,
    at batch 8 = 2 micro-batches x 2 per rank, accumulate without reducing in between. resume: start from a copy of
    that run's directory (latest/, metrics) without its final/. dpo runs train on SMALL_SPLITS, each with its own
    cache (name-cache/), so each computes its own reference table."""
    root = tmp_path_factory.mktemp("runs")
    gpt.save_model(small_model(), root / "init")
    driver = root / "driver.py"
    driver.write_text(DRIVER.format(root=str(ROOT), splits=SMALL_SPLITS))

    def run(script: str, mode: str, steps: int = 3, name: str | None = None, resume: Path | None = None, extra=()):
        out = root / (name or f"{script}-{mode}-{steps}")
        if (out / "final").exists():
            return out
        if resume is not None:
            shutil.copytree(resume, out, ignore=shutil.ignore_patterns("final"))
        args = [*(f"--{k}={v}" for k, v in TWO.items()), f"--model={root / 'init'}", "--dataset=synthetic",
                f"--max_steps={steps}", f"--out={out}", *extra]
        args += ["--fsdp=true", "--grad_checkpoint=true"] if mode == "fsdp" else []
        cache = {"DPO_CACHE": str(root / f"{out.name}-cache")} if script == "dpo" else {}
        if mode == "one":
            with pytest.MonkeyPatch.context() as mp:
                if script == "dpo":
                    mp.setattr(data, "load_pairs", lambda dataset, split: data.synthetic_pairs(split, SMALL_SPLITS[split]))
                    mp.setenv("DPO_CACHE", cache["DPO_CACHE"])
                (sft.main if script == "sft" else dpo.main)(args)
        else:
            torchrun(["sft.py" if script == "sft" else str(driver), *args], env=cache)
        return out

    run.init = root / "init"
    return run


def compare_runs(one: Path, two: Path, atol: float, steps: int = 3, evals: bool = True) -> None:
    a, b = records(one, "train"), records(two, "train")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, steps + 1)), (a, b)
    # grad_norm catches a gradient scaled by the world size, which RMSprop would hide. Its tolerance is looser: FSDP
    # sums gradients in another order, and RMSprop's division by tiny second moments (embedding rows seen once)
    # amplifies those last-bit differences, ~1e-5 relative after 4 steps. A world-size error is a factor of 2.
    for ra, rb in zip(a, b):
        for key, rtol in (("loss", 1e-5), ("grad_norm", 1e-4)):
            assert abs(ra[key] - rb[key]) <= rtol * abs(ra[key]) + 1e-6, \
                f"step {ra['step']} {key}: {one.name} {ra[key]}, {two.name} {rb[key]}, diff {abs(ra[key] - rb[key])}"
    if evals:  # (a resumed run evaluates the step it resumes at once more)
        ea, eb = records(one, "eval"), records(two, "eval")
        assert [r["step"] for r in ea] == [r["step"] for r in eb] and ea, (ea, eb)
        diff = max(abs(ra["loss"] - rb["loss"]) for ra, rb in zip(ea, eb))
        assert diff <= 1e-5 * abs(ea[-1]["loss"]), f"eval loss: {one.name} {ea}, {two.name} {eb}, max abs diff {diff}"
    start = tensors(one.parent / "init" / "model.safetensors")
    want, got = tensors(one / "final" / "model.safetensors"), tensors(two / "final" / "model.safetensors")
    moved, _ = max_abs_diff(start, want)
    diff, where = max_abs_diff(want, got)
    assert diff <= atol, f"final weights: max abs diff {diff} at {where} (training moved them by up to {moved})"
    assert moved > 100 * atol, f"training moved the weights by only {moved}"


@pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch build has no torch.distributed")
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
@pytest.mark.parametrize("script", ["sft", "dpo"])
def test_two_processes_match_one(runs, script, mode):
    """Catches DDP bugs: gradients averaged over ranks without the x world correction (half the gradient),
    ranks training on the same examples instead of disjoint halves of the batch, no_sync misplaced (a rank's
    micro-batches lost), metrics or eval not all-reduced, and (dpo) the precomputed reference table assembled
    wrongly from the ranks' shards. The lr is small enough that Adam-style noise amplification of zero
    gradients (see the accumulation test) stays below the tolerance. And FSDP bugs: the tied head sharded apart
    from wte (one would miss the other's gradient), the last micro-batch not reducing its gradients (shards keep
    only their own rank's), shards gathered wrongly into final/, activation checkpointing at odds with the
    re-gathered weights."""
    one, two = runs(script, "one"), runs(script, mode)
    if script == "dpo":
        tables = sorted((one.parent / f"{one.name}-cache" / "reference_logps").glob("*.npy"))
        assert len(tables) == 2, tables  # train and test
        for table in tables:
            want, got = np.load(table), np.load(two.parent / f"{two.name}-cache" / "reference_logps" / table.name)
            diff = np.abs(want - got).max()
            assert diff <= 1e-4, f"{table.name}: reference table of 1 process vs 2 ({mode}): max abs diff {diff}"
    compare_runs(one, two, atol=1e-5)


def test_fsdp_holds_a_world_th_of_the_state(runs):
    """Each FSDP rank must hold half of the parameters, gradients and optimizer state that a DDP rank holds (the
    logged, measured bytes of the real tensors): catches a block or the root left unsharded (wte is most of this
    model), gradients or optimizer moments kept whole. bench.state_per_rank's numbers, computed from the shapes
    alone for the README's memory table, must equal the measured ones exactly for both modes."""
    measured = {mode: records(runs("sft", mode), "memory")[0] for mode in ("ddp", "fsdp")}
    with torch.device("meta"):
        shapes = gpt.GPT(SMALL)
    for mode, record in measured.items():
        computed = bench.state_per_rank(shapes, world=2, fsdp=mode == "fsdp")
        got = {k: record[k] for k in computed}
        assert got == computed, f"{mode}: measured {got}, computed from shapes {computed}"
    for key in ("params", "grads", "optimizer"):
        ddp, fsdp = measured["ddp"][key], measured["fsdp"][key]
        assert abs(fsdp - ddp / 2) <= 0.01 * ddp, f"{key}: FSDP rank holds {fsdp} bytes, DDP rank {ddp}, want ~{ddp / 2}"


def test_fsdp_resumes_exactly_and_with_another_number_of_processes(runs):
    """2 FSDP steps, then a second FSDP launch resumes from latest/ to step 3: bit-identical weights and optimizer
    state to 3 uninterrupted FSDP steps. Catches optimizer moments not re-sharded on load (each rank taking the whole
    tensor, or rank 0's chunk), shards saved from one rank only, the step count or lr schedule lost. The same
    checkpoint resumed by one plain process must match 3 one-process steps within 1e-5: the files hold whole
    tensors, so a run may resume with any number of processes."""
    first = runs("sft", "fsdp", steps=2)
    resumed = runs("sft", "fsdp", name="sft-fsdp-resumed", resume=first)
    straight = runs("sft", "fsdp")
    for file in ("final/model.safetensors", "latest/optimizer.safetensors"):
        want, got = tensors(straight / file), tensors(resumed / file)
        unequal = [k for k in want if not torch.equal(want[k], got[k])]
        assert want.keys() == got.keys() and not unequal, f"{file}: resumed differs in {unequal[:5]}"
    compare_runs(runs("sft", "one"), runs("sft", "one", name="sft-one-from-fsdp", resume=first), atol=1e-5, evals=False)


def test_ddp_checkpoint_resumes_under_fsdp_with_offload(runs):
    """DDP's latest/ after 3 steps, resumed by FSDP with CPU offload for a 4th: must match 4 one-process steps
    within 1e-5. Catches checkpoints that differ between the modes (optimizer state keyed otherwise, the tied
    weight saved twice or not at all), and an offload step that does not train (shards on the CPU that the
    optimizer never updates, gradients lost on their way there)."""
    mixed = runs("sft", "fsdp", steps=4, name="sft-ddp-then-fsdp-offload", resume=runs("sft", "ddp"),
                 extra=("--offload=true",))
    compare_runs(runs("sft", "one", steps=4), mixed, atol=1e-5, steps=4, evals=False)


def test_two_machines_train_like_one_process(runs, tmp_path):
    """Two torchrun launchers on localhost, one process each, as two machines run `make sft NNODES=2 NODE_RANK=i
    MASTER_ADDR=... MASTER_PORT=...`: must train as one process does. Catches a Makefile that drops a variable
    (the launchers would wait for each other, then time out), and ranks taken from LOCAL_RANK (both would be
    rank 0: the same examples, and each would write the checkpoints)."""
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    train_args = " ".join(f"--{k}={v}" for k, v in TWO.items()) + " --dataset=synthetic --max_steps=3"
    procs = [subprocess.Popen(["make", "sft", f"PY={sys.executable}", f"MODEL={runs.init}", f"RUN_DIR={tmp_path}",
                               "NNODES=2", f"NODE_RANK={i}", "MASTER_ADDR=127.0.0.1", f"MASTER_PORT={port}",
                               "FSDP=true", f"TRAIN_ARGS={train_args}"], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
    try:
        logs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    shutil.copytree(tmp_path / "sft", runs.init.parent / "sft-two-machines")  # compare_runs finds init beside it
    compare_runs(runs("sft", "one"), runs.init.parent / "sft-two-machines", atol=1e-5)


def test_bad_launches_stop_with_an_error_that_says_what_to_do(tmp_path):
    """Catches settings that cannot work silently ignored or failing late (after tokenizing, or in a collective
    that then waits forever): FSDP outside torchrun, offload without FSDP, a batch the processes cannot split."""
    args = [f"--{k}={v}" for k, v in FAST.items()] + ["--model=tiny", "--dataset=synthetic", f"--out={tmp_path}"]
    with pytest.raises(SystemExit, match=r"--fsdp=true .* plain python run; launch it with torchrun"):
        sft.main(args + ["--fsdp=true"])
    with pytest.raises(SystemExit, match=r"--offload=true .* add --fsdp=true"):
        dpo.main(args + ["--offload=true"])
    with pytest.raises(SystemExit, match=r"--batch_size=6 must be a multiple of micro_batch_size x processes = 4 x 1"):
        sft.main(args + ["--batch_size=6", "--micro_batch_size=4"])


def test_ctrl_c_saves_latest_and_the_same_command_resumes(tmp_path):
    """Ctrl-C must finish the step, save latest/ and exit 130; rerunning the command continues from there
    (catches a handler that exits without saving, or a save that a resume cannot read)."""
    import signal

    out = tmp_path / "run"
    cmd = [sys.executable, "sft.py", "--dataset=synthetic", "--model=tiny", "--device=cpu", "--dtype=float32",
           "--batch_size=4", "--micro_batch_size=4", "--eval_every=0", "--checkpoint_every=0", "--optimizer=adamw",
           f"--out={out}"]
    proc = subprocess.Popen(cmd + ["--max_steps=1000"], cwd=ROOT, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    for line in proc.stdout:  # wait until training is under way
        if "step 3/1000" in line:
            break
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, rest[-2000:]
    saved = json.loads((out / "latest" / "state.json").read_text())["step"]
    assert saved >= 3 and "interrupted" in rest, rest[-2000:]
    again = subprocess.run(cmd + [f"--max_steps={saved + 1}"], cwd=ROOT, env=dict(os.environ),
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert f"resumed from {out / 'latest'} at step {saved}" in again.stdout
    assert json.loads((out / "final" / "config.json").read_text())["meta"]["step"] == saved + 1


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_steps_run_and_stay_finite(tmp_path, dtype):
    """The autocast path (bf16) and the fp16 path with its gradient scaler (scale, unscale before clipping, step,
    update) on the CPU: catches a cast that breaks under autocast, or a clip applied to still-scaled gradients
    (the recorded grad_norm would then be ~65536x too large)."""
    out = tmp_path / dtype
    sft.main(["--dataset=synthetic", "--model=tiny", "--device=cpu", f"--dtype={dtype}", "--max_steps=3",
              "--batch_size=4", "--micro_batch_size=2", "--eval_every=0", "--optimizer=adamw", "--lr=1e-3",
              "--warmup_steps=1", f"--out={out}"])
    rows = records(out, "train")
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) for r in rows), rows
    # fp16: the scaler starts at 2^16, so the first steps overflow and are skipped while it backs off (inf/nan
    # norms are expected there); once it has, the recorded norm must be the unscaled one.
    assert 0 < rows[-1]["grad_norm"] < 1e4, [r["grad_norm"] for r in rows]
