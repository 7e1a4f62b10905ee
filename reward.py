"""A reward model learned from the preference pairs, and every way of scoring an answer that the evaluation uses.

    python reward.py --model=runs/gpt2/sft/final --out=runs/gpt2/reward     # train it (sft.py's loop, a third loss)
    python judge.py --best_of=128 --scorer=runs/gpt2/reward/final ...        # Best of N with it (judge.py)

The DPO paper (Rafailov et al. 2023, arXiv:2305.18290, Sec. 3) starts where RLHF starts: humans prefer y_w to y_l
with the Bradley-Terry probability of a latent reward r*

    p*(y_w > y_l | x) = sigma( r*(x, y_w) - r*(x, y_l) )                                   (Eq. 1)

and RLHF fits a reward model r_phi to the pairs by maximum likelihood, a binary classification loss

    L_R(r_phi) = -E log sigma( r_phi(x, y_w) - r_phi(x, y_l) )                                (Eq. 2)

DPO skips this model: its policy's beta log pi/pi_ref IS a reward model (Eq. 5, "your language model is secretly a
reward model"). We train r_phi anyway, for two reasons. It gives Figure 3's fourth line, Best of N: sample N answers
from the SFT model, keep the one r_phi scores highest (judge.py --best_of). And it measures the title claim: the
preference accuracy on held-out pairs of r_phi, of DPO's implicit reward and of plain SFT likelihood (judge.py
--accuracy), side by side.

The model: the SFT model's GPT-2 trunk and a scalar head on its final hidden state (after ln_f) at the response's
last token, the <|endoftext|> that ends it. Causal attention makes that position the only one that has read the
whole prompt and the whole response (transformers' GPT2ForSequenceClassification reads the last token too). Training is
sft.py's loop; chosen and rejected go through one concatenated forward pass, as in DPO.

Reading order: the model (where its reward is read; saved as the trunk in the hub layout and the head beside it),
the Bradley-Terry loss, the scorers judge.py uses (reward model, DPO implicit reward, likelihood), `main`.

Machinery it leans on: sft.py's loop and, through it, checkpoints.py (which saves and resumes this model through its
`save` and `load`); common.py for the atomic directory swap that keeps the trunk and its head together.
"""

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import dpo
import model as gpt
import sft
from machinery import common


@dataclasses.dataclass
class Settings(sft.Settings):
    """Train a reward model with the Bradley-Terry loss (DPO paper Eq. 2): python reward.py --key=value ..."""

    model: str = "runs/gpt2/sft/final"  # the SFT checkpoint: the trunk starts from it (as in RLHF, Sec. 3)
    out: str = "runs/gpt2/reward"  # run directory
    lr: float = 1e-5  # SFT's, not DPO's 1e-6: the head starts from zero and has far to go (an untuned default)
    micro_batch_size: int = 4  # pairs per forward pass per GPU (the forward sees 2x rows: chosen and rejected)
    eval_every: int = 250  # optimizer steps between evaluations (preference accuracy and margin, held out)


HEAD_FILE = "reward_head.safetensors"  # beside the trunk's model.safetensors: what makes a directory a reward model
# The head's learning rate, in effect: Adam moves each weight by about lr per step whatever its gradient's scale, so
# r = s * (w . h) learns s times faster than r = w . h, and nothing else changes (the trunk's gradient only grows by
# s, which Adam normalises away). Without it the zero-init head crawls at the trunk's lr: the demo's reward model
# underfit (train accuracy no higher than held-out; |w| = 0.12 after 125 steps at lr 3e-4): 73-83% held out over
# four seeds, 81-84% with s = 30 (README). Accuracy only compares rewards, so any s > 0 ranks alike once trained.
HEAD_SCALE = 30.0

# ----------------------------------------------------------------------------------------------------------------
# 1. The model: a GPT-2 trunk and a scalar head, read at the last real token
#
# A training batch (data.py) holds input_ids = seq[:-1] and target_ids = seq[1:]: the EOT that ends a response is a
# target, never an input. The reward must read the hidden state AT that EOT, so we rebuild the whole sequence,
# seq = [input_ids[:, 0], target_ids], and read at one past the last loss-mask position (the last response target):
#
#   seq            p p p c c E .        last = 0 0 0 0 0 1 0     (p prompt, c response, E its EOT, . padding)
#   loss_mask        0 0 1 1 1 0              (over target positions, i.e. seq[1:])
#
# Right padding sits after E, so causal attention keeps it out of the reward: a padded row scores as if alone.


def reward_inputs(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """A data.py batch -> (tokens (B, T + 1), the whole sequences; last (B, T + 1) bool, True at each row's last
    real token: its EOT, or its last response token when truncation cut the EOT off)."""
    tokens = torch.cat([batch["input_ids"][:, :1], batch["target_ids"]], 1)  # (B, T + 1)
    mask = batch["loss_mask"]
    final = mask.shape[1] - 1 - mask.flip(1).int().argmax(1)  # (B,) index of the last True of each row
    last = torch.zeros_like(tokens, dtype=torch.bool)
    last[torch.arange(len(tokens), device=tokens.device), final + 1] = True  # +1: target t is seq[t + 1]
    return tokens, last


class RewardModel(nn.Module):
    """r_phi(x, y) = w . h_L(x, y), with h_L the trunk's final hidden state at the response's last token."""

    def __init__(self, trunk: gpt.GPT):
        super().__init__()
        self.gpt = trunk
        self.config = trunk.config  # sft.train and load_policy read model.config (grad_checkpoint, dropout)
        # No bias: Bradley-Terry sees only reward differences (Eq. 1), so a constant gets no gradient. Zero init:
        # every pair starts at p = 1/2, loss log 2, as DPO starts from pi = pi_ref.
        self.head = nn.Linear(trunk.config.n_embd, 1, bias=False)
        nn.init.zeros_(self.head.weight)

    def forward(self, tokens, last):
        """tokens (B, T) and last (B, T) bool with one True per row (see reward_inputs) -> rewards (B,) in fp32."""
        h = self.gpt(tokens, select=last, hidden=True)  # (B, C): only the read positions leave the trunk
        with torch.autocast(h.device.type, enabled=False):  # fp32 head: rewards are compared to ~1e-3
            return HEAD_SCALE * (h.float() @ self.head.weight[0])  # (B,) = s w . h; a new tensor, not a view (FSDP)

    # sft.train saves and resumes any model through these two (checkpoint.write_weights / checkpoint.read_weights)

    def save(self, directory: Path, meta: dict | None = None, state_dict: dict | None = None) -> None:
        """The trunk exactly as model.save_model writes a GPT-2 (model.load_model and `transformers` read it), the
        head in reward_head.safetensors beside it. Written aside and swapped in: never a trunk without its head.
        `state_dict`: whole weights to write instead of this module's (a sharded model's, gathered by sft.py)."""
        sd = self.state_dict() if state_dict is None else state_dict
        trunk = {k.removeprefix("gpt."): v for k, v in sd.items() if k.startswith("gpt.")}
        with common.new_dir(directory, ".rm") as tmp:
            # the head also goes into model.safetensors as transformers' score.weight, scaled: see README "Use your
            # model elsewhere" (GPT2ForSequenceClassification's logits[0, 0] on one sequence ending in EOT = r_phi)
            gpt.save_model(self.gpt, tmp, meta=meta, state_dict=trunk, score=HEAD_SCALE * sd["head.weight"].float())
            gpt.write_safetensors(tmp / HEAD_FILE, {"head.weight": sd["head.weight"]}, {"format": "pt"})

    def load(self, directory: Path) -> dict:
        """The whole weights `save` wrote, keyed as this module's state_dict()."""
        return load_reward_model(directory).state_dict()


def load_reward_model(path) -> RewardModel:
    """A reward model directory written by RewardModel.save; a clear error for anything else."""
    path = Path(path)
    if not (path / HEAD_FILE).exists():
        what = "a DPO or SFT checkpoint (a plain GPT-2)" if (path / "model.safetensors").exists() else "no checkpoint"
        raise ValueError(f"{path} is no reward model: {what}, no {HEAD_FILE}. Train one with "
                         f"`python reward.py --out=...`, or score with --scorer=implicit:<dpo checkpoint>")
    rm = RewardModel(gpt.load_model(str(path)))
    tensors, _ = gpt.read_safetensors(path / HEAD_FILE)
    if set(tensors) != {"head.weight"} or tensors["head.weight"].shape != rm.head.weight.shape:
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        raise ValueError(f"{path / HEAD_FILE}: expected head.weight {tuple(rm.head.weight.shape)}, found {shapes}")
    rm.head.weight.data.copy_(tensors["head.weight"])
    return rm


# ----------------------------------------------------------------------------------------------------------------
# 2. The loss


def bradley_terry_loss(chosen_rewards, rejected_rewards):
    """-log sigma(r(x, y_w) - r(x, y_l)) per pair (Eq. 2; Eq. 1 is the probability inside). Both (B,) -> (B,).

    logsigmoid, not log(sigmoid(.)): sigmoid of a margin below about -100 rounds to 0 in fp32, whose log is -inf."""
    return -F.logsigmoid(chosen_rewards - rejected_rewards)


def reward_loss(model, batch):
    """loss_fn for sft.train: one forward over the stacked [chosen; rejected] rows, Bradley-Terry per pair."""
    chosen, rejected = data.split_pairs(model(*reward_inputs(batch)))  # (B,) each
    margin = (chosen - rejected).detach()
    return bradley_terry_loss(chosen, rejected), {
        "accuracy": (margin > 0).float(),  # the held-out preference accuracy, at every evaluation
        "margin": margin,
        "reward_chosen": chosen.detach(),
        "reward_rejected": rejected.detach(),
    }


# ----------------------------------------------------------------------------------------------------------------
# 3. Scorers: reward(batch) -> (B,) for any data.py batch, used by judge.py's Best of N and accuracy table
#
#   <reward model dir>     r_phi(x, y)                                  this file's model
#   implicit:<dpo dir>     beta log pi_dpo(y|x) / pi_ref(y|x)            DPO's implicit reward (Eq. 5 without Z(x))
#   likelihood:<model>     log pi(y|x)                                   the baseline: does SFT already rank pairs?
#
# For the implicit reward, pi_ref is the model passed as `reference` (Best of N: the sampler), else the reference
# the DPO run trained against (its settings' --model). Z(x) depends on the prompt only, so it cancels both in a
# pair's comparison and in picking the best of N answers to one prompt.


def parse_scorer(spec: str) -> tuple[str, str]:
    """A spec of the table above -> (kind: rm, implicit or likelihood; the checkpoint it reads)."""
    kind, _, path = spec.partition(":") if spec.startswith(("implicit:", "likelihood:")) else ("rm", "", spec)
    return kind, path


def scorer_id(spec: str) -> str | None:
    """model.weights_id of the checkpoint a spec reads, or None when there is none (load_scorer says why): what keys
    the cached scores and accuracies."""
    path = gpt.weights_file(parse_scorer(spec)[1])
    return gpt.weights_id(str(path)) if path.exists() else None


def load_scorer(spec: str, device, reference: gpt.GPT | None = None):
    """(score(batch) -> rewards (B,), the GPTConfig of the scoring trunk) for a spec in the table above."""
    kind, path = parse_scorer(spec)
    if not path:
        raise ValueError(f"--scorer={spec!r} names no checkpoint: use {kind}:<checkpoint directory>")
    if kind == "rm":
        rm = load_reward_model(path).to(device).eval()
        return (lambda batch: rm(*reward_inputs(batch))), rm.config
    policy = gpt.load_model(path).to(device).eval()
    if kind == "likelihood":
        return (lambda batch: sft.sequence_logps(policy, batch)), policy.config
    settings = json.loads((Path(path) / "config.json").read_text()).get("meta", {}).get("settings", {}) \
        if (Path(path) / "config.json").exists() else {}
    if "beta" not in settings:
        raise ValueError(f"--scorer={spec}: {path} is no DPO checkpoint (its config.json records no beta); "
                         "give the final/ or step_*/ directory of a dpo.py run")
    if reference is None:
        reference = gpt.load_model(settings["model"])  # the SFT checkpoint the DPO run started from
    reference.to(device).eval()

    def implicit(batch):
        policy_logps, reference_logps = sft.sequence_logps(policy, batch), sft.sequence_logps(reference, batch)
        return dpo.implicit_reward(policy_logps, reference_logps, settings["beta"])

    return implicit, policy.config


@torch.no_grad()
def score_responses(score, prompts: list[list[int]], responses: list[list[int]], max_length: int, device,
                    dtype, batch_size: int) -> list[float]:
    """Rewards of token-id (prompt, response) pairs, EOT appended to each response as in training; a prompt is cut
    from the left (as data.py truncates) so that prompt + response fits in max_length tokens."""
    rows = []
    for prompt, response in zip(prompts, responses):
        response = list(response)[: max_length - 1] + [gpt.EOT]
        rows.append((prompt[len(prompt) - max(1, max_length - len(response)):], response))
    rewards = []
    for i in range(0, len(rows), batch_size):
        batch = common.to_device(data.pad_rows(rows[i : i + batch_size]), device)
        with common.autocast(device, dtype):
            rewards += score(batch).float().tolist()
    return rewards


def pair_margins(score, tok: dict, n: int, device, dtype, batch_size: int) -> list[float]:
    """score(x, y_w) - score(x, y_l) for the first n tokenized pairs (n = 0: all): > 0 where the scorer agrees
    with the preference label. One forward per [chosen; rejected] batch, as in training."""
    n = min(n or data.n_examples(tok), data.n_examples(tok))
    margins = []
    with torch.no_grad():
        for i in range(0, n, batch_size):
            batch = common.to_device(data.preference_batch(tok, range(i, min(i + batch_size, n))), device)
            with common.autocast(device, dtype):
                chosen, rejected = data.split_pairs(score(batch).float())
            margins += (chosen - rejected).tolist()
    return margins


# ----------------------------------------------------------------------------------------------------------------


def main(argv=None):
    prepared = sft.prepare(Settings, argv, "reward model")
    if prepared is None:
        return
    s, run, train_data, eval_data = prepared
    rm = RewardModel(sft.load_policy(s))
    sft.train(s, rm, reward_loss, lambda ids: data.preference_batch(train_data, ids),
              lambda ids: data.preference_batch(eval_data, ids), data.n_examples(eval_data),
              data.example_lengths(train_data, "pref"), stage="reward", run=run)


if __name__ == "__main__":
    main()
