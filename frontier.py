"""What beta buys: the reward-KL frontier of the DPO paper's Figure 2 (left), offline, on the demo's task.

    make frontier                                   # after make demo (it reuses base, SFT and reward models)
    python frontier.py --demo=runs/demo --steps=60  # the same by hand; --help for the rest

Rafailov et al. 2023, arXiv:2305.18290, Sec. 6.1 and Fig. 2: RLHF maximises E[r(x, y)] - beta KL(pi || pi_ref)
(Eq. 3), so each trained policy trades reward for KL from the reference, and the better objective reaches more
reward at the same KL. The demo's task has a true reward (data.synthetic_reward), so every policy here gets two
numbers on held-out prompts, one answer each, sampled at temperature 1:

    reward  the mean true reward of the answers, with a 95% interval (mean +- 1.96 sd / sqrt(n))
    KL      KL(pi || pi_SFT) = E_{y ~ pi}[log pi(y|x) - log pi_SFT(y|x)], estimated by the mean of that log-ratio over
            the same answers. Unbiased: each answer is one draw from pi (temperature 1, no top-k or top-p, up to its
            <|endoftext|> or --max_new_tokens) and the log-ratio is taken on exactly its tokens, so its expectation is
            the KL by definition. Its error is that mean's standard error (the 95% interval); a policy very close to
            pi_SFT can show a small negative estimate.

Points: SFT at KL 0; DPO at five beta; IPO, cDPO, SimPO, ORPO and unlikelihood at two strengths each, trained by
dpo.py with the demo's settings (ORPO from the base model: it does its own SFT, and has no reference); what DPO
replaces, trained by ppo.py from the SFT model: PPO against the reward model at three beta_KL, PPO-GT against the
true reward at two, and online DPO at two beta, all on the same prompts (--ppo_iterations x its batch); Best of N
for N = 1, 2, 4, ..., 64 SFT answers, the one the reward model scores highest, at KL = log N - (N - 1) / N, the
standard analytic value for best-of-N (Stiennon et al. 2020, arXiv:2009.01325; an upper bound: Beirami et al.
2024, arXiv:2401.01879). Outputs in --out: frontier.jsonl, frontier.md, frontier.png, and each run's log.
"""

import contextlib
import dataclasses
import json
import math
import shlex
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt
import numpy as np
import torch

import data
import dpo
import model as gpt
import ppo
import reward
import sampling
import sft
from machinery import common, fast_generate


@dataclasses.dataclass
class Settings:
    """The reward-KL frontier on the demo task: python frontier.py --demo=runs/demo"""

    demo: str = "runs/demo"  # make demo's directory: its base/final, sft/final and reward/final are reused
    out: str = ""  # where the trained policies and the results go ("" = <demo>/frontier)
    dataset: str = "synthetic"  # the frontier needs a true reward: only the synthetic task has one
    train: str = "--dtype=float32 --dataset=synthetic --optimizer=adamw --batch_size=32 --micro_batch_size=32 --lr=3e-4 --warmup_steps=10"  # dpo.py flags of every run (the demo's)
    steps: int = 60  # optimizer steps per trained policy (ORPO, which also does SFT's job, twice as many)
    ppo: str = "--dtype=float32 --dataset=synthetic --batch_size=32 --minibatch_size=16 --epochs=2 --lr=3e-4 --max_new_tokens=40"  # ppo.py flags of every PPO, PPO-GT and online DPO run
    ppo_iterations: int = 20  # iterations of each ppo.py run: every one sees the same iterations x batch_size prompts
    n: int = 200  # held-out prompts, one answer each per policy
    best_of: int = 64  # the largest N of Best of N (answers per prompt from the SFT model)
    max_new_tokens: int = 40  # longest answer
    seed: int = 0  # sampling
    device: str = "auto"  # cuda, mps, cpu or auto


# method -> one set of dpo.py flags per point, weakest leash (largest KL expected) first where that is known
METHODS = {
    "DPO": [f"--beta={b}" for b in (0.1, 0.25, 0.5, 1.0, 2.0)],
    "IPO": [f"--loss=ipo --beta={b}" for b in (0.25, 1.0)],
    "cDPO": [f"--loss=cdpo --label_smoothing=0.1 --beta={b}" for b in (0.25, 1.0)],
    "SimPO": [f"--loss=simpo --beta={b}" for b in (1.0, 2.5)],
    "ORPO": [f"--loss=orpo --orpo_lambda={lam} --lr=1e-3" for lam in (1.0, 0.1)],
    "unlikelihood": [f"--loss=unlikelihood --unlikelihood_alpha={a}" for a in (1.0, 0.1)],
    # ppo.py: RLHF against the reward model, against the true reward (PPO-GT), and online DPO
    "PPO": [f"--kl_coef={k}" for k in (0.01, 0.05, 0.2)],
    "PPO-GT": [f"--reward=groundtruth --kl_coef={k}" for k in (0.01, 0.05)],
    "online DPO": [f"--algo=online_dpo --beta={b}" for b in (0.1, 0.5)],
}
RL_METHODS = ("PPO", "PPO-GT", "online DPO")  # trained by ppo.py, the rest by dpo.py


def train(method: str, flags: str, s: Settings, out: Path) -> Path:
    """One policy trained by dpo.py or ppo.py (skipped when its final/ exists), its output in <run>.log; returns
    final/. ppo.py's runs start from the SFT model, score with the demo's reward model (PPO-GT: the true reward)
    and initialise their value model from it."""
    name = f"{method.replace(' ', '_')}_{flags.replace('--', '').replace(' ', '_').replace('=', '')}"
    run = out / name
    if method in RL_METHODS:
        argv = shlex.split(s.ppo) + shlex.split(flags) + [
            f"--model={Path(s.demo) / 'sft' / 'final'}", f"--reward_model={Path(s.demo) / 'reward' / 'final'}",
            f"--out={run}", f"--iterations={s.ppo_iterations}", "--checkpoint_every=0", f"--seed={s.seed}"]
        run.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{run}.log", "a") as log, contextlib.redirect_stdout(log):
            ppo.main(argv)
        return run / "final"
    start = "base" if method == "ORPO" else "sft"  # ORPO starts from the base model: it does its own SFT
    steps = 2 * s.steps if method == "ORPO" else s.steps
    argv = shlex.split(s.train) + shlex.split(flags) + [
        f"--model={Path(s.demo) / start / 'final'}", f"--out={run}", f"--max_steps={steps}", "--eval_every=0",
        "--save_every=0", "--checkpoint_every=0"]
    run.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{run}.log", "a") as log, contextlib.redirect_stdout(log):
        dpo.main(argv)
    return run / "final"


def answer_logps(net, prompts: list[list[int]], answers: list[list[int]], s: Settings, device) -> list[float]:
    """log pi(answer | prompt) of each sampled answer, on exactly the tokens sampled: an answer shorter than
    max_new_tokens stopped at <|endoftext|>, which was drawn too, so it is scored with it."""
    rows = [(np.asarray(p), np.asarray(a + [gpt.EOT] if len(a) < s.max_new_tokens else a)) for p, a in zip(prompts, answers)]
    out = []
    with torch.no_grad():
        for i in range(0, len(rows), 100):
            batch = common.to_device(data.pad_rows(rows[i : i + 100]), device)
            out += sft.sequence_logps(net, batch).tolist()
    return out


def interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of its 95% normal interval, 1.96 sd / sqrt(n))."""
    values = np.asarray(values, dtype=float)
    return float(values.mean()), float(1.96 * values.std(ddof=1) / math.sqrt(len(values)))


def sample(net, prompts: list[list[int]], s: Settings, device, num_samples: int = 1) -> list[list[int]]:
    """Answers at temperature 1, exactly from the model (no top-k, no top-p, no stop string): what the KL needs."""
    generator, answers = torch.Generator(device).manual_seed(s.seed), []
    per_call = max(1, 100 // num_samples)
    for i in range(0, len(prompts), per_call):
        answers += fast_generate.generate(net, prompts[i : i + per_call], s.max_new_tokens, temperature=1.0,
                                   generator=generator, num_samples=num_samples)
    return answers


def true_rewards(texts: list[str], answers: list[list[int]], enc) -> list[float]:
    """The synthetic task's reward of each answer, read as the judge reads it (cut at a next Human turn)."""
    return [data.synthetic_reward(t, sampling.clean_response(enc.decode(a))) for t, a in zip(texts, answers)]


def measure(net, sft_net, texts: list[str], prompts: list[list[int]], s: Settings, device, enc) -> dict:
    """Mean true reward and KL(pi || pi_SFT) of one answer per prompt, each with its 95% interval."""
    answers = sample(net, prompts, s, device)
    ratio = [a - b for a, b in zip(answer_logps(net, prompts, answers, s, device),
                                    answer_logps(sft_net, prompts, answers, s, device))]
    (r, r_ci), (kl, kl_ci) = interval(true_rewards(texts, answers, enc)), interval(ratio)
    return {"reward": r, "reward_ci": r_ci, "kl": kl, "kl_ci": kl_ci, "n": len(answers)}


def best_of_n(sft_net, texts, prompts, s: Settings, device, enc) -> list[dict]:
    """Best of N for N = 1, 2, 4, ..., --best_of: the SFT answer the reward model scores highest among the first N
    of each prompt's; KL = log N - (N - 1) / N, not estimated."""
    N = s.best_of
    answers = sample(sft_net, prompts, s, device, num_samples=N)  # prompt j's: rows j*N ... j*N + N - 1
    score, config = reward.load_scorer(str(Path(s.demo) / "reward" / "final"), device)
    scores = reward.score_responses(score, [prompts[j // N] for j in range(len(answers))], answers,
                                    config.block_size, device, torch.float32, 100)
    rewards = true_rewards([texts[j // N] for j in range(len(answers))], answers, enc)
    points = []
    for k in sorted({min(2**i, N) for i in range(N.bit_length() + 1)}):
        best = [max(range(j * N, j * N + k), key=lambda i: scores[i]) for j in range(len(prompts))]
        r, r_ci = interval([rewards[i] for i in best])
        points.append({"method": "Best of N", "strength": f"N={k}", "reward": r, "reward_ci": r_ci,
                       "kl": math.log(k) - (k - 1) / k, "kl_ci": 0.0, "n": len(best)})
    return points


def plot(rows: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r for r in rows if r["method"] == method), key=lambda r: r["kl"])
        ax.errorbar([r["kl"] for r in pts], [r["reward"] for r in pts], xerr=[r["kl_ci"] for r in pts],
                    yerr=[r["reward_ci"] for r in pts], marker="^" if method in RL_METHODS else "o" if len(pts) > 1 else "s",
                    linestyle="--" if method in RL_METHODS else "-", capsize=2, label=method)  # ppo.py's dashed
    ax.set_xscale("symlog", linthresh=1.0)  # linear below 1 nat, logarithmic above: a collapsed run sits at ~50
    ax.set(xlabel="KL(π ‖ π_SFT), nats (estimated from the samples; Best of N: log N - (N-1)/N)",
           ylabel="mean true reward (95% CI)", title="Reward vs KL on the demo task (DPO paper, Figure 2 left)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    s = common.parse_settings(Settings, argv)
    if s.dataset != "synthetic":
        raise SystemExit(f"frontier.py needs the synthetic task's true reward (data.synthetic_reward) to score answers; "
                         f"--dataset={s.dataset} has none. Run it on the demo: make frontier (--dataset=synthetic)")
    demo, out = Path(s.demo), Path(s.out or Path(s.demo) / "frontier")
    for stage in ("base", "sft", "reward"):
        if not (demo / stage / "final" / "model.safetensors").exists():
            raise SystemExit(f"no {demo / stage / 'final'}: run make demo first (make frontier does), or set --demo")
    start, enc = time.time(), common.get_tokenizer()
    device, _, reason = common.pick_device(s.device, "float32")
    pairs = sampling.eval_prompts("synthetic", s.n, s.seed)
    texts, prompts = [p["prompt"] for p in pairs], [enc.encode_ordinary(p["prompt"]) for p in pairs]
    sft_net = gpt.load_model(str(demo / "sft" / "final")).to(device).eval()
    print(f"frontier: {len(pairs)} held-out prompts, one answer each at temperature 1; {device} ({reason})")
    rows = [{"method": "SFT", "strength": "", **measure(sft_net, sft_net, texts, prompts, s, device, enc)}]
    rows += best_of_n(sft_net, texts, prompts, s, device, enc)
    print(f"frontier: SFT and Best of 1-{s.best_of} measured ({time.time() - start:.0f} s)")
    for method, points in METHODS.items():
        for flags in points:
            t0 = time.time()
            net = gpt.load_model(str(train(method, flags, s, out))).to(device).eval()
            row = {"method": method, "strength": flags.split()[-1 if method != "ORPO" else 1].lstrip("-"),
                   **measure(net, sft_net, texts, prompts, s, device, enc)}
            rows.append(row)
            print(f"frontier: {method:12} {row['strength']:24} reward {row['reward']:.2f} ± {row['reward_ci']:.2f}  "
                  f"KL {row['kl']:.2f} ± {row['kl_ci']:.2f}  ({time.time() - t0:.0f} s)", flush=True)
    (out / "frontier.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = ["| method | strength | mean true reward (95% CI) | KL(π‖π_SFT) (95% CI) |", "|---|---|---:|---:|"]
    table += [f"| {r['method']} | {r['strength']} | {r['reward']:.2f} ± {r['reward_ci']:.2f} | "
              f"{r['kl']:.2f}" + (f" ± {r['kl_ci']:.2f} |" if r["method"] != "Best of N" else " (log N - (N-1)/N) |")
              for r in rows]
    (out / "frontier.md").write_text("\n".join(table) + "\n")
    plot(rows, out / "frontier.png")
    print("\n".join(table) + f"\nwrote {out / 'frontier.md'}, {out / 'frontier.png'}; frontier took "
          f"{(time.time() - start) / 60:.1f} min")
    return rows


if __name__ == "__main__":
    main()
