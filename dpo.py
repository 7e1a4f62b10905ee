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
one forward pass gives both log-probs. The reference log-probs never change, so by default they are computed
once before training and cached; the reference model is then freed (a third less compute, half the weights).
The training loop is sft.py's; only the loss differs.

Machinery it leans on: parallel.py (the reference pass split over the processes, its table assembled with one
all_reduce) and common.py (the on-disk cache of the reference log-probs, autocast).
"""

import copy
import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import batching
import common
import data
import parallel
import sft


@dataclasses.dataclass
class Settings(sft.Settings):
    """Direct Preference Optimization: python dpo.py --key=value ... (defaults: the DPO paper, Sec. 6 / App. B)"""

    model: str = "runs/gpt2/sft/final"  # the SFT checkpoint: the policy's start AND the frozen reference
    out: str = "runs/gpt2/dpo"  # run directory
    lr: float = 1e-6  # DPO paper: RMSprop, lr 1e-6, 150 warmup steps, batch 64 pairs
    micro_batch_size: int = 4  # pairs per forward pass per GPU (the forward sees 2x rows: chosen and rejected)
    beta: float = 0.1  # KL leash strength (paper: 0.1 for dialogue)
    loss: str = "dpo"  # dpo (Eq. 7), cdpo (label smoothing), ipo (Azar et al.), or reference_free
    label_smoothing: float = 0.0  # cdpo: assumed probability that a preference label is flipped
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


def concatenated_forward(model, batch):
    """ONE forward over the stacked [chosen; rejected] rows (see data.py's diagram) -> two (B,) log-prob tensors.

    One pass instead of two: a single bigger matmul per layer uses the GPU better, and with DDP or FSDP it is one
    collective per layer instead of two."""
    logps = sft.sequence_logps(model, batch)  # (2B,)
    B = logps.shape[0] // 2
    return logps[:B], logps[B:]


def make_loss(s: Settings, reference=None):
    """loss_fn(model, batch) for sft.train; `reference` is the live model, or None to read precomputed logps."""
    if s.loss not in ("dpo", "cdpo", "ipo", "reference_free"):
        raise SystemExit(f"--loss must be dpo, cdpo, ipo or reference_free, got {s.loss!r}")
    if s.loss != "cdpo" and s.label_smoothing:
        raise SystemExit("--label_smoothing only applies to --loss=cdpo")

    def loss_fn(model, batch):
        policy_chosen_logps, policy_rejected_logps = concatenated_forward(model, batch)
        if reference is None:
            reference_chosen_logps, reference_rejected_logps = batch["reference_chosen_logps"], batch["reference_rejected_logps"]
        else:
            with torch.no_grad():
                reference_chosen_logps, reference_rejected_logps = concatenated_forward(reference, batch)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
            beta=s.beta, label_smoothing=s.label_smoothing, ipo=s.loss == "ipo", reference_free=s.loss == "reference_free")
        return losses, {
            "reward_chosen": chosen_rewards,
            "reward_rejected": rejected_rewards,
            "reward_accuracy": (chosen_rewards > rejected_rewards).float(),  # does the implicit reward rank it right?
            "reward_margin": chosen_rewards - rejected_rewards,
            "logp_chosen": policy_chosen_logps.detach(),
            "logp_rejected": policy_rejected_logps.detach(),
        }

    return loss_fn


# ----------------------------------------------------------------------------------------------------------------
# Reference log-probs, computed once


def reference_logps(s: Settings, reference, tok: dict, split: str) -> np.ndarray:
    """(N, 2) float32: log pi_ref(y_w|x), log pi_ref(y_l|x) for every pair, cached on disk.

    The cache key covers the reference weights (size and mtime of the file and its config), every setting that
    changes the tokens, and the tokens themselves: an edited data.py or a re-downloaded dataset changes them under
    the same settings. With several processes each computes every world-th pair and an all_reduce of the
    zero-filled rest assembles the whole table."""
    run = parallel.setup(s)
    device = run.device
    weights = Path(s.model) / "model.safetensors" if Path(s.model).is_dir() else Path(s.model)
    stamp = [str(weights.resolve()), weights.stat().st_size, weights.stat().st_mtime_ns] if weights.exists() else [s.model, s.seed]
    tokens = hashlib.sha256()
    for name in sorted(k for k in tok if k.endswith(("_ids", "_offsets"))):
        tokens.update(np.ascontiguousarray(tok[name]))
    key = json.dumps([stamp, tokens.hexdigest(), s.dataset, split, s.max_length, s.max_prompt_length, s.truncation,
                      str(run.dtype)])
    path = common.cache_dir() / "reference_logps" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.npy"
    if path.exists():
        return np.load(path, allow_pickle=False)
    n = data.n_examples(tok)
    table = torch.zeros(n, 2, dtype=torch.float64, device=device)
    reference.to(device).eval()
    ids = list(range(n))[run.rank :: run.world]
    step = 2 * s.micro_batch_size  # no gradients, so larger batches fit
    with torch.no_grad():
        for i in range(0, len(ids), step):
            chunk = ids[i : i + step]
            batch = {k: v.to(device) for k, v in data.preference_batch(tok, chunk).items()}
            with common.autocast(device, run.dtype):
                chosen, rejected = concatenated_forward(reference, batch)
            table[chunk] = torch.stack([chosen, rejected], -1).double()
            if run.rank == 0 and (i // step) % 50 == 0:
                print(f"  reference log-probs ({split}): {min(i + step, len(ids)) * run.world}/{n}", flush=True)
    if run.world > 1:
        torch.distributed.all_reduce(table)
    result = table.float().cpu().numpy()
    if run.rank == 0:
        common.atomic_write(path, lambda f: np.save(f, result))
    return result


def with_reference(batch_fn, table: np.ndarray):
    """Wrap a preference batch function so each batch also carries its pairs' reference log-probs."""

    def fn(ids):
        batch = batch_fn(ids)
        batch["reference_chosen_logps"] = torch.from_numpy(table[ids, 0])
        batch["reference_rejected_logps"] = torch.from_numpy(table[ids, 1])
        return batch

    return fn


def main(argv=None):
    prepared = sft.prepare(Settings, argv, "DPO")
    if prepared is None:
        return
    s, train_data, eval_data = prepared
    policy = sft.load_policy(s)
    reference = copy.deepcopy(policy)  # the same weights, frozen (load_model("tiny") again: another random init)
    reference.requires_grad_(False)
    # only the held-out pairs that sft.train evaluates (it then takes all of them): their reference log-probs,
    # not those of all ~8.5K HH test pairs
    eval_data = data.select_examples(eval_data, batching.eval_subset(data.n_examples(eval_data), s.n_eval, s.seed))
    train_batch = lambda ids: data.preference_batch(train_data, ids)  # noqa: E731
    eval_batch = lambda ids: data.preference_batch(eval_data, ids)  # noqa: E731
    if s.reference == "precomputed":
        train_batch = with_reference(train_batch, reference_logps(s, reference, train_data, "train"))
        eval_batch = with_reference(eval_batch, reference_logps(s, reference, eval_data, "test"))
        del reference  # its log-probs are all we need from it
        loss_fn = make_loss(s)
    elif s.reference == "live":
        device = parallel.setup(s).device
        loss_fn = make_loss(s, reference.to(device).eval())
    else:
        raise SystemExit(f"--reference must be precomputed or live, got {s.reference!r}")
    lengths = data.example_lengths(train_data, "pref")
    sft.train(s, policy, loss_fn, train_batch, eval_batch, data.n_examples(eval_data), lengths, stage="dpo")


if __name__ == "__main__":
    main()
