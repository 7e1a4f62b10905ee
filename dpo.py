"""Direct Preference Optimization: train a policy straight from preference pairs, no reward model, no RL.

    python dpo.py --model=runs/gpt2/sft/final --out=runs/gpt2/dpo
    torchrun --standalone --nproc_per_node=4 dpo.py --model=runs/gpt2-medium/sft/final --out=runs/gpt2-medium/dpo
    torchrun --standalone --nproc_per_node=4 dpo.py --fsdp=true ...   # sharded (FSDP2): see sft.py and the README

Rafailov et al. 2023, arXiv:2305.18290. RLHF maximises reward under a KL leash to a reference policy,
max_pi E[r(x, y)] - beta KL(pi || pi_ref). Its optimum is pi*(y|x) ∝ pi_ref(y|x) exp(r(x, y) / beta) (Eq. 4),
so any reward is determined by its optimal policy up to a per-prompt constant:

    r(x, y) = beta log pi(y|x) / pi_ref(y|x) + beta log Z(x)                          (Eq. 5)

Put that into the Bradley-Terry likelihood of the human preference y_w > y_l, p = sigma(r(x, y_w) - r(x, y_l)),
and Z(x) cancels. What is left is a classification loss on the policy itself:

    L_DPO = -E log sigma( beta log pi(y_w|x)/pi_ref(y_w|x) - beta log pi(y_l|x)/pi_ref(y_l|x) )   (Eq. 7)

Intuition: the implicit reward r_hat = beta log pi/pi_ref of the chosen response goes up, that of the rejected
one goes down, each pair weighted by sigma(r_hat_l - r_hat_w), i.e. by how wrongly the implicit reward model
ranks it now (Eq. 8's gradient). beta sets how far from pi_ref the policy may move: small beta, weak leash.

The step is fused (as in the reference code): chosen and rejected are stacked into one batch [y_w; y_l],
one forward pass gives both log-probs. The reference log-probs never change, so by default reference_logps.py computes
them once before training and caches them; the reference model is then freed. The training loop is sft.py's; only
the loss differs. Beside Eq. 7 stand the variants people ask about (LOSSES), each at its equation; `make frontier`
(frontier.py) trains them on the demo task and draws reward against KL, as the paper's Figure 2.
"""

import copy
import dataclasses

import torch
import torch.nn.functional as F

import data
import model as gpt
import sft
from machinery import batch_order, reference_logps


@dataclasses.dataclass
class Settings(sft.Settings):
    """Direct Preference Optimization: python dpo.py --key=value ... (defaults: the DPO paper, Sec. 6 / App. B)"""

    model: str = "runs/gpt2/sft/final"  # the SFT checkpoint: the policy's start AND the frozen reference
    out: str = "runs/gpt2/dpo"  # run directory
    lr: float = 1e-6  # DPO paper: RMSprop, lr 1e-6, 150 warmup steps, batch 64 pairs
    micro_batch_size: int = 4  # pairs per forward pass per GPU (the forward sees 2x rows: chosen and rejected)
    beta: float = 0.1  # KL leash strength (paper: 0.1 for dialogue)
    loss: str = "dpo"  # dpo (Eq. 7), cdpo, ipo, reference_free, simpo, orpo or unlikelihood: see LOSSES
    label_smoothing: float = 0.0  # cdpo: assumed probability that a preference label is flipped
    simpo_gamma: float = 0.5  # simpo: the margin by which beta/|y| log pi(y_w|x) must beat that of y_l
    orpo_lambda: float = 0.1  # orpo: weight of the log-odds-ratio term beside the chosen answer's NLL
    unlikelihood_alpha: float = 0.5  # unlikelihood: weight of the rejected tokens' log(1 - pi) term
    reference: str = "precomputed"  # precomputed (one pass before training, cached) or live (a second model)
    eval_every: int = 250  # optimizer steps between evaluations
    save_every: int = 250  # optimizer steps between saved models (Figure 3 right: win rate over training)


# ----------------------------------------------------------------------------------------------------------------
# The loss, as a pure function of four log-prob tensors


def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
             beta: float, label_smoothing: float = 0.0, ipo: bool = False, reference_free: bool = False):
    """Per-pair losses and implicit rewards. Every argument is (B,): log pi(y|x) summed over response tokens.

    Returns (losses (B,), chosen_rewards (B,), rejected_rewards (B,)); the rewards are beta * log pi/pi_ref,
    detached: they are what DPO's implicit reward model says, for logging (Eq. 5 without Z(x)).
    """
    pi_logratios = policy_chosen_logps - policy_rejected_logps  # log pi(y_w|x) - log pi(y_l|x)
    ref_logratios = (reference_chosen_logps - reference_rejected_logps).detach()  # pi_ref is frozen: no gradient
    if reference_free:  # a uniform pi_ref: the ratio's reference term vanishes
        ref_logratios = torch.zeros_like(ref_logratios)
    h = pi_logratios - ref_logratios  # = (r_hat_w - r_hat_l) / beta
    if ipo:
        # IPO (Azar et al. 2023, arXiv:2310.12036, Eq. 17): regress h onto 1/(2 beta) instead of pushing it to
        # infinity, which keeps deterministic preferences from driving the policy arbitrarily far from pi_ref.
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        # Eq. 7 when label_smoothing = 0. Conservative DPO (Mitchell 2023, "A note on DPO with noisy
        # preferences"): a label is wrong with probability eps, so the target is a soft eps / (1 - eps) mixture.
        losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    chosen_rewards = implicit_reward(policy_chosen_logps, reference_chosen_logps, beta).detach()
    rejected_rewards = implicit_reward(policy_rejected_logps, reference_rejected_logps, beta).detach()
    return losses, chosen_rewards, rejected_rewards


def implicit_reward(policy_logps, reference_logps, beta: float):
    """DPO's implicit reward model, beta log pi(y|x) / pi_ref(y|x) (Eq. 5 without beta log Z(x), which depends on x
    alone and cancels whenever two answers to one prompt are compared). (B,), (B,) -> (B,)."""
    return beta * (policy_logps - reference_logps)


def simpo_loss(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths, beta, gamma):
    """SimPO (Meng et al. 2024, arXiv:2405.14734, Eq. 6): no reference; the reward is the length-normalised
    log-prob beta/|y| log pi(y|x), and the chosen answer's must beat the rejected one's by a margin gamma:
    -log sigma(beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma). All (B,); returns as dpo_loss."""
    chosen_rewards, rejected_rewards = beta * policy_chosen_logps / chosen_lengths, beta * policy_rejected_logps / rejected_lengths
    return -F.logsigmoid(chosen_rewards - rejected_rewards - gamma), chosen_rewards.detach(), rejected_rewards.detach()


def orpo_loss(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths, lam):
    """ORPO (Hong et al. 2024, arXiv:2403.07691, Eq. 6-7): no reference, and no SFT before it: the chosen answer's
    NLL per token plus lam * -log sigma(log odds(y_w|x) - log odds(y_l|x)), odds = P / (1 - P) of the per-token
    likelihood P = exp(log pi(y|x) / |y|). All (B,); the rewards it returns are the log odds."""
    mean_chosen, mean_rejected = policy_chosen_logps / chosen_lengths, policy_rejected_logps / rejected_lengths
    log_odds = lambda m: m - torch.log(-torch.expm1(m))  # noqa: E731  log P - log(1 - P), exact near P = 1
    chosen_rewards, rejected_rewards = log_odds(mean_chosen), log_odds(mean_rejected)
    losses = -mean_chosen - lam * F.logsigmoid(chosen_rewards - rejected_rewards)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def unlikelihood_loss(policy_chosen_logps, policy_rejected_logps, rejected_unlikely, alpha):
    """Unlikelihood training (Welleck et al. 2019, arXiv:1908.04319; a baseline of the DPO paper's Figure 2): raise
    log pi(y_w|x) and push every token of y_l down, -log pi(y_w|x) - alpha sum_t log(1 - pi(y_l,t | x, y_l,<t)).
    rejected_unlikely (B,) is that sum; the rewards it returns are the two log-probs."""
    return -policy_chosen_logps - alpha * rejected_unlikely, policy_chosen_logps.detach(), policy_rejected_logps.detach()


def concatenated_forward(model, batch):
    """ONE forward over the stacked [chosen; rejected] rows (see data.py's diagram) -> (policy_chosen_logps (B,),
    policy_rejected_logps (B,), token_logps (N,): each response token's log-prob, for the objectives that look
    inside a response). One pass instead of two: a single bigger matmul per layer uses the GPU better, and with DDP
    or FSDP it is one collective per layer instead of two."""
    token_logps = sft.token_logps(model, batch)  # (N,) over both halves
    return (*data.split_pairs(sft.per_row(token_logps, batch["loss_mask"])), token_logps)


def reference_of(batch):
    """log pi_ref(y_w|x), log pi_ref(y_l|x) (B,) each: precomputed (reference_logps.py) or by the live reference."""
    return batch["reference_chosen_logps"], batch["reference_rejected_logps"]


def lengths_of(batch):
    """|y_w|, |y_l| (B,) each: the response tokens of each row, for the length-normalised objectives."""
    return data.split_pairs(batch["loss_mask"].sum(-1).float())


def rejected_unlikely(token_logps, batch):
    """sum_t log(1 - pi(y_l,t | x, y_l,<t)) of each rejected row (B,); log(-expm1(log p)) is exact near p = 1, and
    the clamp keeps p = 1 from giving -inf."""
    return data.split_pairs(sft.per_row(torch.log(-torch.expm1(token_logps.clamp(max=-1e-6))), batch["loss_mask"]))[1]


# --loss -> (its objective from (settings, batch, policy_chosen_logps, policy_rejected_logps, token_logps), returning
# (losses, chosen_rewards, rejected_rewards) (B,) each; the settings it reads: moving another's knob is an error)
LOSSES = {
    "dpo": (lambda s, batch, chosen, rejected, tokens: dpo_loss(chosen, rejected, *reference_of(batch), s.beta),
            ("beta",)),
    "cdpo": (lambda s, batch, chosen, rejected, tokens: dpo_loss(chosen, rejected, *reference_of(batch), s.beta,
                                                                 label_smoothing=s.label_smoothing),
             ("beta", "label_smoothing")),
    "ipo": (lambda s, batch, chosen, rejected, tokens: dpo_loss(chosen, rejected, *reference_of(batch), s.beta,
                                                                ipo=True), ("beta",)),
    "reference_free": (lambda s, batch, chosen, rejected, tokens: dpo_loss(chosen, rejected, *reference_of(batch),
                                                                           s.beta, reference_free=True), ("beta",)),
    "simpo": (lambda s, batch, chosen, rejected, tokens: simpo_loss(chosen, rejected, *lengths_of(batch), s.beta,
                                                                    s.simpo_gamma), ("beta", "simpo_gamma")),
    "orpo": (lambda s, batch, chosen, rejected, tokens: orpo_loss(chosen, rejected, *lengths_of(batch),
                                                                  s.orpo_lambda), ("orpo_lambda",)),
    "unlikelihood": (lambda s, batch, chosen, rejected, tokens: unlikelihood_loss(
        chosen, rejected, rejected_unlikely(tokens, batch), s.unlikelihood_alpha), ("unlikelihood_alpha",)),
}
NO_REFERENCE = ("simpo", "orpo", "unlikelihood")  # no pi_ref at all (reference_free still logs beta log pi/pi_ref)


def check_loss(s: Settings) -> None:
    """--loss exists, and no knob of another loss was moved from its default: it would silently do nothing."""
    if s.loss not in LOSSES:
        raise SystemExit(f"--loss must be one of {', '.join(LOSSES)}, got {s.loss!r}")
    default, reads = Settings(), LOSSES[s.loss][1]
    for knob in sorted({k for _, knobs in LOSSES.values() for k in knobs} - set(reads)):
        if getattr(s, knob) != getattr(default, knob):
            raise SystemExit(f"--{knob}={getattr(s, knob)} is not used by --loss={s.loss}, which reads "
                             f"{', '.join('--' + k for k in reads)}")
    if s.reference not in ("precomputed", "live"):
        raise SystemExit(f"--reference must be precomputed or live, got {s.reference!r}")
    if s.loss in NO_REFERENCE and s.reference != default.reference:
        raise SystemExit(f"--loss={s.loss} uses no reference model: drop --reference={s.reference}")


def tie_tolerance(s: Settings, batch, policy_chosen_logps, policy_rejected_logps):
    """The reward margin below which a pair is a tie, not a ranking, (B,) or 0. At step 0 (pi = pi_ref) every DPO
    margin is 0 up to the fp32 rounding of its four summed log-probs, taken in other batches (the reference's were
    precomputed): 1e-5 beta times their magnitudes covers it. Without a reference there is no such rounding."""
    if "reference_chosen_logps" not in batch:
        return 0.0
    magnitudes = [policy_chosen_logps, policy_rejected_logps, *reference_of(batch)]
    return 1e-5 * s.beta * sum(x.detach().abs() for x in magnitudes)


def reward_metrics(s: Settings, batch, policy_chosen_logps, policy_rejected_logps, chosen_rewards, rejected_rewards):
    """What the progress line and metrics.jsonl show of each pair (B,): its implicit rewards, whether they rank it
    right (a tie is not right), the margin, and the log-probs of policy and reference."""
    margin = chosen_rewards - rejected_rewards
    tie = margin.abs() <= tie_tolerance(s, batch, policy_chosen_logps, policy_rejected_logps)
    reference = dict(zip(("ref_logp_chosen", "ref_logp_rejected"), reference_of(batch))) \
        if "reference_chosen_logps" in batch else {}
    return reference | {
        "reward_chosen": chosen_rewards,
        "reward_rejected": rejected_rewards,
        "reward_accuracy": ((margin > 0) & ~tie).float(),  # does it rank the pair right?
        "reward_ties": tie.float(),  # neither way: every pair at step 0
        "reward_margin": margin,
        "logp_chosen": policy_chosen_logps.detach(),
        "logp_rejected": policy_rejected_logps.detach(),
    }


def make_loss(s: Settings, reference=None):
    """loss_fn(model, batch) for sft.train; `reference` is the live model, or None to read precomputed logps."""
    check_loss(s)
    objective = LOSSES[s.loss][0]

    def loss_fn(model, batch):
        if reference is not None:  # the frozen reference's log-probs of the same rows, without gradient
            with torch.no_grad():
                batch["reference_chosen_logps"], batch["reference_rejected_logps"], _ = concatenated_forward(reference, batch)
        policy_chosen_logps, policy_rejected_logps, token_logps = concatenated_forward(model, batch)  # ONE forward
        losses, chosen_rewards, rejected_rewards = objective(s, batch, policy_chosen_logps, policy_rejected_logps,
                                                             token_logps)  # dpo: Eq. 7
        return losses, reward_metrics(s, batch, policy_chosen_logps, policy_rejected_logps, chosen_rewards,
                                      rejected_rewards)

    return loss_fn


def main(argv=None):
    prepared = sft.prepare(Settings, argv, "DPO")
    if prepared is None:
        return
    s, run, train_data, eval_data = prepared
    policy = sft.load_policy(s)
    reference = copy.deepcopy(policy)  # the same weights, frozen (load_model("tiny") again: another random init)
    reference.requires_grad_(False)
    live = s.loss not in NO_REFERENCE and s.reference == "live"
    loss_fn = make_loss(s, reference.to(run.device).eval() if live else None)  # checks --loss and its knobs
    if s.loss == "orpo":
        print("--loss=orpo: ORPO does its own SFT and needs no reference: train it from a base model (--model), not "
              "from an SFT checkpoint")
    # only the held-out pairs that sft.train evaluates (it then takes all of them): their reference log-probs,
    # not those of all ~8.5K HH test pairs
    eval_data = data.select_examples(eval_data, batch_order.eval_subset(data.n_examples(eval_data), s.n_eval, s.seed))
    train_batch = lambda ids: data.preference_batch(train_data, ids)  # noqa: E731
    eval_batch = lambda ids: data.preference_batch(eval_data, ids)  # noqa: E731
    if s.loss not in NO_REFERENCE and s.reference == "precomputed":
        weights = gpt.weights_id(s.model)  # keys the cache: a retrained SFT model must never reuse old tables
        logps = lambda model, batch: concatenated_forward(model, batch)[:2]  # noqa: E731
        tables = [reference_logps.precompute(s, run, reference, weights, tok, split, batch_fn, logps)
                  for split, tok, batch_fn in (("train", train_data, train_batch), ("test", eval_data, eval_batch))]
        train_batch, eval_batch = (reference_logps.with_reference(fn, table)
                                   for fn, table in zip((train_batch, eval_batch), tables))
    del reference  # precomputed: its log-probs are all we need from it; live: loss_fn holds it
    lengths = data.example_lengths(train_data, "pref")
    sft.train(s, policy, loss_fn, train_batch, eval_batch, data.n_examples(eval_data), lengths, "dpo", run)


if __name__ == "__main__":
    main()
