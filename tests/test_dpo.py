"""dpo.py: the DPO objective and its variants, the fused forward, the logged metrics, and a run that learns.

Oracles: closed forms (math.log/exp on floats) for every loss variant and for the gradient (Eq. 8), per-example
unpadded log-probs for the fused forward, loss = log 2 where policy == reference, hand-built margins for the tie
rule, and a learning check on a small fixture. Tiny models, fp32 on the CPU. Each test's docstring names the bug it
would catch.
"""

import math

import pytest
import torch

import data
import dpo
import model as gpt
import sft
from machinery import common
from tests.helpers import FAST, LOG2, records, run_dpo, settings, small_model, small_pairs

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny tensors run faster on one thread


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


def test_a_tie_is_not_a_right_ranking():
    """reward_accuracy counts a pair as ranked right only when its margin clears the tie tolerance (dpo.tie_tolerance:
    the fp32 rounding of four summed log-probs, 1e-5 beta times their sizes); such a pair is a tie. Catches a tie
    counted as a right ranking (`margin > 0` alone: at step 0, pi = pi_ref, the rounding leaves some margins a hair
    above 0 and the logged accuracy would not start at 0), a tie counted as a wrong ranking too, a clear margin
    taken for a tie, and a tolerance where no reference is (no rounding to allow for: only a margin of 0 ties)."""
    s = settings(dpo.Settings)  # beta 0.1
    reference_chosen = torch.tensor([-120.0, -80.0, -95.0, -60.0], dtype=torch.float64)
    reference_rejected = torch.tensor([-130.0, -85.0, -90.0, -61.0], dtype=torch.float64)
    # margins beta * [2e-5, 1, -1, 0]: within the tolerance (~5e-4 here), right, wrong, exactly 0
    policy_chosen = reference_chosen + torch.tensor([2e-5, 1.0, -1.0, 0.0], dtype=torch.float64)
    policy_rejected = reference_rejected.clone()
    _, chosen_rewards, rejected_rewards = dpo.dpo_loss(policy_chosen, policy_rejected, reference_chosen,
                                                       reference_rejected, beta=s.beta)
    batch = {"reference_chosen_logps": reference_chosen, "reference_rejected_logps": reference_rejected}
    metrics = dpo.reward_metrics(s, batch, policy_chosen, policy_rejected, chosen_rewards, rejected_rewards)
    margins = (chosen_rewards - rejected_rewards).tolist()
    got = (metrics["reward_accuracy"].tolist(), metrics["reward_ties"].tolist())
    assert got == ([0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 1.0]), f"margins {margins}: (accuracy, ties) {got}"

    chosen_rewards = torch.tensor([1e-9, -1e-9, 0.0], dtype=torch.float64)  # no reference (SimPO, ORPO, ...)
    zeros = torch.zeros(3, dtype=torch.float64)
    metrics = dpo.reward_metrics(s, {}, zeros - 5, zeros - 6, chosen_rewards, zeros)
    got = (metrics["reward_accuracy"].tolist(), metrics["reward_ties"].tolist())
    assert got == ([1.0, 0.0, 0.0], [0.0, 0.0, 1.0]), f"no reference, margins {chosen_rewards.tolist()}: {got}"


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
# DPO end to end: learning


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
