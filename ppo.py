"""What DPO replaces: RLHF with PPO against a reward model, and, beside it, online DPO.

    python ppo.py --model=runs/gpt2/sft/final --reward_model=runs/gpt2/reward/final --out=runs/gpt2/ppo
    python ppo.py --algo=online_dpo --model=runs/gpt2/sft/final --reward_model=runs/gpt2/reward/final --out=...
    python ppo.py --dataset=synthetic --reward=groundtruth ...   # PPO-GT: the demo task's true reward, no model
    python ppo.py --help                                         # every setting, with its default

RLHF (Ziegler et al. 2019, arXiv:1909.08593; Stiennon et al. 2020, arXiv:2009.01325; Ouyang et al. 2022,
arXiv:2203.02155) maximises a learned reward r_phi under a KL leash to the SFT policy (DPO paper Eq. 3). Each
iteration: sample answers y ~ pi(.|x) to training prompts, score them, and take a few gradient steps of PPO
(Schulman et al. 2017, arXiv:1707.06347) on that batch. The reward PPO sees is shaped per token (Stiennon Eq. 1):

    r_t = -beta_KL (log pi(y_t|x, y_<t) - log pi_ref(y_t|x, y_<t))  + [t = last token] r_phi(x, y)

so its sum over an answer is r_phi(x, y) - beta_KL log pi(y|x)/pi_ref(y|x), a one-sample estimate of DPO's Eq. 3.
A value model V(x, y_<t) predicts the sum of the rewards still to come; the advantage of token t is GAE (Schulman
et al. 2015, arXiv:1506.02438, Eq. 16) with delta_t = r_t + gamma V_(t+1) - V_t:

    A_t = sum_l (gamma lambda)^l delta_(t+l),      return R_t = A_t + V_t (the value model's target)

and PPO's clipped surrogate (arXiv:1707.06347, Eq. 7), with ratio rho_t = pi(y_t|.) / pi_old(y_t|.):

    L_clip = -E_t min( rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t )

Every detail below follows the checklist of Huang et al. 2024, "The N+ implementation details of RLHF with PPO"
(arXiv:2403.17031): the value model is a scalar head on a trunk, both initialised from the reward model; the score
is read at the answer's EOT and an answer with no EOT within --max_new_tokens gets a fixed penalty instead; the
KL penalty falls on every answer token; gamma = 1, lambda = 0.95; advantages whitened over the real tokens only;
the value loss clipped like the ratio; K epochs over minibatches of each batch of rollouts. beta_KL is fixed (the
adaptive controller of Ziegler et al. Eq. 2 is left out: the frontier sweeps beta_KL instead).

Online DPO (Guo et al. 2024, arXiv:2402.04792; TRL's OnlineDPOTrainer): the same rollouts, two answers per prompt;
the reward model (or the true reward) picks the chosen one, a tie gives no pair, and dpo.dpo_loss (Eq. 7) against
the frozen SFT reference does the rest. Same data as DPO's, but drawn from the policy being trained, now.

Reading order: settings; the pure pieces (score, shaping, GAE, whitening, the two losses, the pairing), each beside
its equation; the models; one iteration (rollout, score, reference, update) for each algorithm; `main`, the loop.
A run directory holds config.json, metrics.jsonl (one line per iteration), latest/ (resume: policy, value/ and the
optimizer, through machinery/checkpoints.py) and final/ (the policy alone, a plain GPT-2 that judge.py, chat.py
and plot.py load)."""

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

import data
import dpo
import model as gpt
import reward
import sampling
import sft
from machinery import checkpoints, common, fast_generate, model_bundle


@dataclasses.dataclass
class Settings:
    """RLHF with PPO, or online DPO: python ppo.py --key=value ... (defaults: Huang et al. 2024, arXiv:2403.17031)"""

    algo: str = "ppo"  # ppo, or online_dpo (two answers per prompt, the better one chosen, DPO's loss)
    model: str = "runs/gpt2/sft/final"  # the SFT checkpoint: the policy's start AND the frozen reference
    reward_model: str = "runs/gpt2/reward/final"  # reward.py's model: the score, and the value model's start
    reward: str = "model"  # model (the reward model), or groundtruth (synthetic task only: PPO-GT)
    dataset: str = "hh"  # training prompts: hh, hh:<subset>,..., or synthetic (the demo)
    max_prompt_length: int = 256  # a longer prompt keeps its last tokens (as data.py truncates)
    out: str = "runs/gpt2/ppo"  # run directory
    # rollouts
    iterations: int = 200  # rollout + update rounds
    batch_size: int = 64  # prompts per iteration (online_dpo: two answers each)
    max_new_tokens: int = 128  # longest answer; one without EOT by then is scored missing_eot_penalty
    temperature: float = 1.0  # sampling temperature: 1 = the policy itself, which the KL and the ratios assume
    missing_eot_penalty: float = -1.0  # the score of an answer that never ended (Huang et al. detail 4.2)
    # PPO
    kl_coef: float = 0.05  # beta_KL: weight of the per-token KL penalty (Stiennon et al. Eq. 1)
    gamma: float = 1.0  # discount (1: the episode is one answer)
    lam: float = 0.95  # GAE lambda
    clip: float = 0.2  # PPO's epsilon: the ratio is clipped to [1 - clip, 1 + clip]
    value_clip: float = 0.2  # the value's change per iteration is clipped to +- value_clip
    vf_coef: float = 0.1  # weight of the value loss beside the policy loss
    epochs: int = 4  # K: passes over each iteration's rollouts (both algorithms)
    minibatch_size: int = 16  # rollouts (online_dpo: pairs) per optimizer step
    beta: float = 0.1  # online_dpo: DPO's beta against the SFT reference (Eq. 7)
    # optimisation
    optimizer: str = "adamw"  # AdamW (the only one; checkpoints.py records it)
    lr: float = 1e-6  # policy and value learning rate (Huang et al.: 3e-6 for 1B-2.8B models)
    grad_clip: float = 1.0  # max global gradient norm
    # bookkeeping
    checkpoint_every: int = 10  # iterations between resume checkpoints latest/ (0: at the end only)
    resume: bool = True  # continue from out/latest if it exists
    seed: int = 0  # prompts, sampling, minibatch order
    device: str = "auto"  # cuda, mps, cpu or auto
    dtype: str = "auto"  # bfloat16, float16, float32 or auto (common.pick_device)


# ----------------------------------------------------------------------------------------------------------------
# 1. The pure pieces. Per-token tensors are (B, T) in data.py's layout: position t holds target token t (see its
# diagram), and `mask` (B, T) is True on the answer's tokens (its EOT included), False on prompt and padding.


def scores_with_penalty(scores, ended, penalty: float):
    """The score r_phi(x, y) (B,) where the answer ended with EOT, else the fixed `penalty` (B,)."""
    return torch.where(ended, scores, torch.full_like(scores, penalty))


def last_token(mask):
    """(B, T) bool with one True per row: the last answer token (its EOT, or the last sampled one)."""
    final = mask.shape[1] - 1 - mask.flip(1).int().argmax(1)  # (B,) index of each row's last True
    return torch.nn.functional.one_hot(final, mask.shape[1]).bool() & mask


def shape_rewards(scores, logps, ref_logps, mask, kl_coef: float):
    """Per-token rewards (Stiennon et al. Eq. 1, spread over tokens): -beta_KL (log pi - log pi_ref) at every answer
    token, plus the score at the last one. scores (B,); logps, ref_logps, mask (B, T). -> (rewards, kl), (B, T)."""
    kl = (logps - ref_logps) * mask  # log pi(y_t|.) - log pi_ref(y_t|.): its sum over t estimates KL(pi || pi_ref)
    return -kl_coef * kl + scores[:, None] * last_token(mask), kl


def gae(rewards, values, mask, gamma: float, lam: float):
    """Generalised advantage estimation (arXiv:1506.02438, Eq. 16), backwards over the answer. rewards, values,
    mask (B, T) -> (advantages, returns) (B, T), zero off the mask. The value after the last token is 0: the answer
    is over."""
    advantages, carry = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])  # carry: A_(t+1), (B,)
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] * mask[:, t + 1] if t + 1 < rewards.shape[1] else 0.0
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # delta_t = r_t + gamma V_(t+1) - V_t
        carry = (delta + gamma * lam * carry) * mask[:, t]  # A_t = delta_t + gamma lambda A_(t+1)
        advantages[:, t] = carry
    return advantages, (advantages + values) * mask  # R_t = A_t + V_t


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x, mask):
    """(x - mean) / std over the masked entries only (B, T): prompt and padding zeros would drag both."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def policy_loss(logps, old_logps, advantages, mask, clip: float):
    """PPO's clipped surrogate (arXiv:1707.06347, Eq. 7), a mean over answer tokens. All (B, T) -> (loss, clip
    fraction, approx-KL): the share of tokens where the clipped term won, and KL(pi_old || pi) by Schulman's
    k3 estimator (rho - 1) - log rho (the ratio rho = pi / pi_old; "Approximating KL divergence", 2020)."""
    log_ratio = logps - old_logps
    ratio = torch.exp(log_ratio)  # rho_t
    unclipped, clipped = -advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)  # max of the negatives = -min(rho A, clip(rho) A)
    clip_frac = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = masked_mean((ratio - 1) - log_ratio, mask)
    return loss, clip_frac.detach(), approx_kl.detach()


def value_loss(values, old_values, returns, mask, clip: float):
    """0.5 max((V - R)^2, (V_clipped - R)^2), V_clipped = V_old + clip(V - V_old, -clip, clip): the value may not
    move further than `clip` from its rollout-time estimate per iteration, as the ratio may not (OpenAI's
    baselines ppo2; Huang et al. 2024). All (B, T) -> (loss, the share of tokens where the clipped term won)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    unclipped_error, clipped_error = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    return loss, masked_mean((clipped_error > unclipped_error).float(), mask).detach()


def pick_pairs(scores):
    """Online DPO's labels: scores (B, 2) of two answers per prompt -> (chosen (B,) 0 or 1, the higher-scored
    answer; keep (B,) bool, False on a tie, which says nothing about which is better)."""
    return scores.argmax(1), scores[:, 0] != scores[:, 1]


# ----------------------------------------------------------------------------------------------------------------
# 2. The models: the policy pi (trained), pi_ref (frozen SFT), the value model (trained), the scorer (frozen)


def value_model(s: Settings) -> reward.RewardModel:
    """A scalar head on a GPT-2 trunk, both from the reward model (Huang et al.: it already reads answers); PPO-GT
    without a reward model starts from the SFT trunk and a zero head."""
    if s.reward == "groundtruth" and not gpt.weights_file(Path(s.reward_model)).exists():
        return reward.RewardModel(gpt.load_model(s.model))
    return reward.load_reward_model(s.reward_model)


def make_scorer(s: Settings, device, dtype):
    """score(prompt texts, prompt ids, answers) -> (B,) before the EOT penalty. --reward=model: r_phi read at the EOT
    (reward.score_responses appends it); groundtruth: data.synthetic_reward of the decoded answer, as judge.py
    reads it. Loaded here, so a bad --reward_model stops the run before anything is sampled."""
    if s.reward == "groundtruth":
        if s.dataset != "synthetic":
            raise SystemExit(f"--reward=groundtruth needs the synthetic task's true reward; --dataset={s.dataset} "
                             "has none. Use --reward=model with --reward_model=<reward.py's final/>")
        enc = common.get_tokenizer()
        return lambda texts, prompts, answers: torch.tensor(
            [data.synthetic_reward(t, sampling.clean_response(enc.decode(a))) for t, a in zip(texts, answers)])
    common.check_choice(s.reward, ("model", "groundtruth"), "--reward")
    rm = reward.load_reward_model(s.reward_model).to(device).eval()  # ValueError: missing, or a policy
    score = lambda batch: rm(*reward.reward_inputs(batch))  # noqa: E731
    return lambda texts, prompts, answers: torch.tensor(reward.score_responses(
        score, prompts, answers, rm.config.block_size, device, dtype, s.minibatch_size))


def per_token(values, mask):
    """(N,) values in the order of mask's True entries -> (B, T), zero elsewhere."""
    return torch.zeros(mask.shape, device=values.device).masked_scatter(mask, values.float())


def logps_of(net, batch):
    """log pi(y_t | x, y_<t) of every answer token, (B, T) fp32 (sft.token_logps: fp32 head)."""
    return per_token(sft.token_logps(net, batch), batch["loss_mask"])


def values_of(value: reward.RewardModel, batch):
    """V at each answer token, (B, T): the value head read at the input position that predicts that token."""
    return per_token(value(batch["input_ids"], batch["loss_mask"]), batch["loss_mask"])


# ----------------------------------------------------------------------------------------------------------------
# 3. One iteration


def rollout(s: Settings, policy, texts, prompts, samples: int, device, dtype, generator):
    """Answers of the current policy, `samples` per prompt (rows j*samples ...), as a data.py batch of prompt +
    answer + its EOT when one was sampled (exactly the sampled tokens), and ended (rows,) bool."""
    with common.autocast(device, dtype):
        answers = fast_generate.generate(policy, prompts, s.max_new_tokens, temperature=s.temperature,
                                         generator=generator, num_samples=samples)
    ended = torch.tensor([len(a) < s.max_new_tokens for a in answers])  # generate stops at EOT, not returned
    rows = [(torch.tensor(prompts[j // samples]).numpy(), torch.tensor(a + [gpt.EOT] * bool(e)).numpy())
            for j, (a, e) in enumerate(zip(answers, ended.tolist()))]
    return answers, ended, data.pad_rows(rows)


def ppo_update(s: Settings, trained, reference, optimizer, batch, scores, device, dtype, times,
               generator) -> dict:
    """Reference and rollout-time (old) log-probs and values, shaped rewards, GAE, then K epochs of minibatches."""
    batch, scores, mask = common.to_device(batch, device), scores.to(device), batch["loss_mask"].to(device)
    t0 = time.time()
    with torch.no_grad(), common.autocast(device, dtype):
        ref_logps = logps_of(reference, batch)
        times["reference"] += time.time() - t0
        old_logps, old_values = logps_of(trained.policy, batch), values_of(trained.value, batch)
    rewards, kl = shape_rewards(scores, old_logps, ref_logps, mask, s.kl_coef)
    advantages, returns = gae(rewards, old_values, mask, s.gamma, s.lam)
    advantages = whiten(advantages, mask)
    sums = {}
    for _ in range(s.epochs):
        for rows in torch.randperm(len(scores), generator=generator).split(s.minibatch_size):
            r = rows.to(device)
            mb = {k: v[r] for k, v in batch.items()}
            with common.autocast(device, dtype):
                logps, values = logps_of(trained.policy, mb), values_of(trained.value, mb)
            pg, clip_frac, approx_kl = policy_loss(logps, old_logps[r], advantages[r], mask[r], s.clip)
            vf, vf_clip_frac = value_loss(values, old_values[r], returns[r], mask[r], s.value_clip)
            step(s, trained, optimizer, pg + s.vf_coef * vf)
            for k, v in dict(pg_loss=pg, vf_loss=vf, clip_frac=clip_frac, approx_kl=approx_kl, vf_clip_frac=vf_clip_frac,
                             value_error=masked_mean((values - returns[r]) ** 2, mask[r])).items():
                sums[k] = sums.get(k, 0.0) + v.item() / (s.epochs * len(range(0, len(scores), s.minibatch_size)))
    return sums | {"kl": kl.sum(1).mean().item(), "entropy": -masked_mean(old_logps, mask).item(),
                   "kl_penalty": (s.kl_coef * kl.sum(1)).mean().item()}


def online_dpo_update(s: Settings, trained, reference, optimizer, batch, scores, device, dtype,
                      times, generator) -> dict:
    """Pairs from two answers per prompt, the higher-scored chosen (ties dropped), K epochs of DPO (Eq. 7) on them."""
    rows = list(zip(batch["input_ids"], batch["target_ids"], batch["loss_mask"]))  # 2 per prompt, in order
    chosen, keep = pick_pairs(scores.view(-1, 2))
    pairs = [(2 * j + c, 2 * j + 1 - c) for j, (c, k) in enumerate(zip(chosen.tolist(), keep.tolist())) if k]
    sums, n_steps = {"ties": 1 - len(pairs) / len(chosen)}, 0
    for _ in range(s.epochs if pairs else 0):
        for ids in torch.randperm(len(pairs), generator=generator).split(s.minibatch_size):
            picked = [pairs[i][0] for i in ids] + [pairs[i][1] for i in ids]  # [chosen; rejected], data.py's layout
            mb = common.to_device({k: torch.stack([rows[i][n] for i in picked]) for n, k in
                                   enumerate(("input_ids", "target_ids", "loss_mask"))}, device)
            t0 = time.time()
            with torch.no_grad(), common.autocast(device, dtype):
                ref_chosen, ref_rejected, _ = dpo.concatenated_forward(reference, mb)
            times["reference"] += time.time() - t0
            with common.autocast(device, dtype):
                policy_chosen, policy_rejected, _ = dpo.concatenated_forward(trained.policy, mb)
            losses, chosen_rewards, rejected_rewards = dpo.dpo_loss(policy_chosen, policy_rejected, ref_chosen,
                                                                    ref_rejected, s.beta)
            step(s, trained, optimizer, losses.mean())
            n_steps += 1
            for k, v in dict(dpo_loss=losses.mean(), reward_margin=(chosen_rewards - rejected_rewards).mean(),
                             kl=(policy_chosen + policy_rejected - ref_chosen - ref_rejected).mean() / 2).items():
                sums[k] = sums.get(k, 0.0) + v.item()
    return {k: v / n_steps if k != "ties" else v for k, v in sums.items()} if n_steps else sums


def step(s: Settings, trained, optimizer, loss) -> None:
    """backward, clip, step; a non-finite loss stops the run before it touches the weights (latest/ stays good)."""
    if not torch.isfinite(loss):
        raise RuntimeError(f"non-finite loss ({loss.item()}); {Path(s.out) / 'latest'} keeps the last good "
                           "checkpoint. Lower --lr, or try --dtype=float32 to rule out fp16 overflow.")
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trained.parameters(), s.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------------------------------------------
# 4. The loop: rollout -> score -> reference -> update, one line of metrics.jsonl per iteration


def main(argv=None):
    s = common.parse_settings(Settings, argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit("ppo.py runs as one process (its rollouts, scoring and update are not split over ranks); "
                         "run it with plain `python ppo.py ...`, not torchrun")
    common.check_choice(s.algo, ("ppo", "online_dpo"), "--algo")
    out = Path(s.out)
    if gpt.weights_file(out / "final").exists():
        print(f"{out}/final exists: {s.algo} already done (delete it to train again)")
        return
    print(json.dumps(common.settings_dict(s), indent=2))
    device, dtype, reason = common.pick_device(s.device, s.dtype)
    print(f"device {device}, {dtype}: {reason}")
    torch.manual_seed(s.seed)
    score = make_scorer(s, device, dtype)  # a missing or wrong reward model, or groundtruth on HH: stops here
    trained = model_bundle.Bundle(policy=gpt.load_model(s.model), value=value_model(s)).to(device)  # one checkpoint
    reference = gpt.load_model(s.model).to(device).eval().requires_grad_(False)
    if s.algo == "online_dpo":
        trained.value.requires_grad_(False)  # online DPO has no value model: kept only so checkpoints look alike
    tok = data.tokenize_dataset(s.dataset, "train", max_length=s.max_prompt_length + s.max_new_tokens + 1,
                                max_prompt_length=s.max_prompt_length)
    prompts = list(dict.fromkeys(tuple(data.example(tok, i)[0].tolist()) for i in range(data.n_examples(tok))))
    enc, settings = common.get_tokenizer(), common.settings_dict(s)
    optimizer = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=s.lr)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(settings, indent=2))
    it = checkpoints.resume(out, trained, optimizer, True) if s.resume else 0
    samples, update = (2, online_dpo_update) if s.algo == "online_dpo" else (1, ppo_update)
    print(f"{s.algo}: {len(prompts)} distinct training prompts, {s.batch_size} per iteration, {samples} answer(s) each")
    t_start, start_it = time.time(), it
    with checkpoints.ctrl_c_finishes_the_step(True) as interrupted:
        while it < s.iterations:
            # the prompts and the sampler are seeded by the iteration: a resumed run draws what it would have
            generator = torch.Generator().manual_seed(s.seed * 1_000_003 + it)
            ids = torch.randint(len(prompts), (s.batch_size,), generator=generator).tolist()
            batch_prompts = [list(prompts[i]) for i in ids]
            texts = [enc.decode(p) for p in batch_prompts]
            times = dict.fromkeys(("rollout", "scoring", "reference", "update"), 0.0)
            t0 = time.time()
            answers, ended, batch = rollout(s, trained.policy, texts, batch_prompts, samples, device, dtype,
                                            torch.Generator(device).manual_seed(s.seed * 1_000_003 + it))
            times["rollout"], t0 = time.time() - t0, time.time()  # then: the score of each answer, penalty included
            raw = score([texts[j // samples] for j in range(len(answers))],
                        [batch_prompts[j // samples] for j in range(len(answers))], answers)
            scores = scores_with_penalty(raw.float(), ended, s.missing_eot_penalty)
            times["scoring"], t0 = time.time() - t0, time.time()
            trained.train()
            stats = update(s, trained, reference, optimizer, batch, scores, device, dtype, times, generator)
            times["update"] = time.time() - t0 - times["reference"]
            it += 1
            record = {"iteration": it, "score": scores.mean().item(), "eot": ended.float().mean().item(),
                      "length": batch["loss_mask"].sum(1).float().mean().item(), **stats,
                      **{f"time_{k}": v for k, v in times.items()}}
            common.append_jsonl(out / "metrics.jsonl", [record])
            elapsed = time.time() - t_start
            eta = (s.iterations - it) * elapsed / (it - start_it)
            shown = "  ".join(f"{k} {record[k]:.3f}" for k in ("score", "kl", "entropy", "ties", "clip_frac",
                                                                "value_error") if k in record)
            print(f"{s.algo} iteration {it}/{s.iterations}  {shown}  rollout {times['rollout']:.1f}s scoring "
                  f"{times['scoring']:.1f}s reference {times['reference']:.1f}s update {times['update']:.1f}s  "
                  f"ETA {eta / 60:.1f} min", flush=True)
            if s.checkpoint_every and it % s.checkpoint_every == 0 or interrupted():
                checkpoints.save_checkpoint(out / "latest", trained, optimizer, it, settings)
            if interrupted():
                print(f"interrupted: saved {out / 'latest'} at iteration {it}; run the same command to resume")
                sys.exit(130)
    checkpoints.save_checkpoint(out / "latest", trained, optimizer, it, settings)
    gpt.save_model(trained.policy, out / "final", {"stage": s.algo, "step": it, "settings": settings})
    print(f"saved {out / 'final'}")


if __name__ == "__main__":
    main()
