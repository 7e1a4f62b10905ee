"""The figures of the evaluation, as PNG files beside its results.

    python plot.py --out=runs/gpt2/eval --runs=runs/gpt2/sft,runs/gpt2/dpo

Reads what judge.py and the training runs wrote and draws, in `--out`:

  fig3_temperature.png  DPO paper (arXiv 2305.18290) Figure 3 left: win rate against the chosen answers vs
                        sampling temperature, one line per model (base 2-shot, SFT, DPO), 95% Wilson intervals
  best_of_n.png         Best of N: win rate vs N (judge.py --best_of_curve), one line per temperature
  fig3_steps.png        Figure 3 right: DPO win rate vs training step (judge.py --dpo_steps), one line per temperature
  win_rate_vs_size.png  win rate vs GPT-2 size, from every eval dir matching --sizes (skipped with fewer than 2)
  training.png          training curves from metrics.jsonl: SFT eval loss; DPO loss, reward accuracy, reward margin
  length.png            answer length per model vs temperature (the chosen answers' as a dashed line), and raw vs
                        length-controlled win rate: DPO lengthens answers, judges like length (judge.py's score)

The numbers themselves are in results.md (judge.py), ready to include in the README.
"""

import dataclasses
import glob
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed (servers, CI)
import matplotlib.pyplot as plt

import model as gpt
import sampling
from machinery import common


@dataclasses.dataclass
class Settings:
    """Draw the evaluation figures: python plot.py --out=runs/gpt2/eval --runs=runs/gpt2/sft,runs/gpt2/dpo"""

    out: str = "runs/gpt2/eval"  # judge.py's output dir: reads results.jsonl, writes the PNGs here
    runs: str = "runs/gpt2/sft,runs/gpt2/dpo"  # training run dirs whose metrics.jsonl to plot (comma separated)
    sizes: str = "runs/*/eval"  # glob of eval dirs, one per GPT-2 size, for the win rate vs size plot
    size_temperature: float = 0.25  # sampling temperature whose win rates the size plot compares


def error_bars(rows: list[dict], key: str = "win_rate", low: str = "ci_low", high: str = "ci_high") -> list[list[float]]:
    """matplotlib's yerr: distances from each rows[key] down to rows[low] and up to rows[high] (never negative: a
    bootstrap interval need not contain its point estimate)."""
    return [[max(0, r[key] - r[low]) for r in rows], [max(0, r[high] - r[key]) for r in rows]]


def line_plot(groups: dict[str, list[dict]], x: str, xlabel: str, title: str, path: Path,
              xticklabels: list[str] | None = None) -> None:
    """Win rate (with its 95% interval) against `x`, one line per group."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    xs = [r[x] for rows in groups.values() for r in rows]
    dodge = 0.01 * (max(xs) - min(xs)) if xs else 0  # shift lines apart a little so error bars do not overlap
    for k, (label, rows) in enumerate(groups.items()):
        rows = sorted((r for r in rows if r["win_rate"] is not None), key=lambda r: r[x])
        shift = (k - (len(groups) - 1) / 2) * dodge
        ax.errorbar([r[x] + shift for r in rows], [r["win_rate"] for r in rows], yerr=error_bars(rows), marker="o",
                    capsize=3, label=label)
    ax.axhline(0.5, color="gray", lw=0.8, ls="--")  # a tie with the chosen answers
    ax.set(xlabel=xlabel, ylabel="win rate vs chosen", title=title, ylim=(0, 1))
    if xticklabels:
        ax.set_xticks(range(len(xticklabels)), xticklabels)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def group_by(rows: list[dict], key: str) -> dict[str, list[dict]]:
    groups = {}
    for r in rows:
        groups.setdefault(str(r[key]), []).append(r)
    return groups


def plot_temperature(rows: list[dict], path: Path) -> None:
    """Figure 3 left: the models of --models (not the intermediate DPO checkpoints)."""
    rows = [r for r in largest_best_of(rows) if r["model"] != sampling.STEPS_MODEL]
    line_plot(group_by(rows, "model"), "temperature", "sampling temperature", "Win rate vs temperature", path)


def best_of_size(row: dict) -> int | None:
    """k of a best_of_<k> row (judge.py's Best of N), else None."""
    return int(row["model"][len(sampling.BEST_OF) :]) if row["model"].startswith(sampling.BEST_OF) else None


def largest_best_of(rows: list[dict]) -> list[dict]:
    """Figure 3 left shows Best of N at the largest N judged; the smaller k of --best_of_curve go to best_of_n.png."""
    ks = [best_of_size(r) for r in rows if best_of_size(r)]
    return [r for r in rows if best_of_size(r) in (None, max(ks, default=None))]


def plot_best_of(rows: list[dict], path: Path) -> None:
    """Win rate of best_of_<k> against k (evenly spaced 1, 2, 4, ..., N), one line per temperature."""
    rows = [r for r in rows if best_of_size(r)]
    ks = sorted({best_of_size(r) for r in rows})
    if len(ks) < 2:
        print(f"Best of N judged at {len(ks)} value(s) of N: skipping {path.name} (judge.py --best_of_curve draws it)")
        return
    rows = [{**r, "k_index": ks.index(best_of_size(r))} for r in rows]
    groups = {f"T = {t}": rs for t, rs in group_by(rows, "temperature").items()}
    line_plot(groups, "k_index", "N (answers sampled, best one judged)", "Best of N: win rate vs N", path,
              xticklabels=[str(k) for k in ks])


def plot_steps(rows: list[dict], path: Path) -> None:
    """Figure 3 right, one line per temperature: the --dpo_steps checkpoints, plus the model named "sft" (where DPO
    starts: step 0) and the one named "dpo" (where it ends) when they were evaluated too."""
    steps = [r for r in rows if r["model"] == sampling.STEPS_MODEL]
    if not steps:
        print(f"no --dpo_steps results: skipping {path.name}")
        return
    rows = steps + [dict(r, step=0) for r in rows if r["model"] == "sft"] + [r for r in rows if r["model"] == "dpo"]
    groups = {f"T = {t}": rs for t, rs in group_by(rows, "temperature").items()}
    line_plot(groups, "step", "DPO training step", "DPO win rate during training", path)


def plot_sizes(pattern: str, temperature: float, path: Path) -> None:
    """Win rate vs model size: each eval dir runs/<size>/eval is one size; one line per model name."""
    rows = []
    for results in sorted(glob.glob(str(Path(pattern) / "results.jsonl"))):
        size = Path(results).parent.parent.name  # runs/gpt2-medium/eval/results.jsonl -> gpt2-medium
        rows += [{**r, "size": size} for r in common.read_jsonl(Path(results))
                 if r["temperature"] == temperature and r["model"] != sampling.STEPS_MODEL]
    sizes = sorted({r["size"] for r in rows}, key=lambda s: list(gpt.PRESETS).index(s) if s in gpt.PRESETS else 99)
    if len(sizes) < 2:
        print(f"results for {len(sizes)} model size(s) under {pattern}: skipping {path.name}")
        return
    for r in rows:
        r["size_index"] = sizes.index(r["size"])
    line_plot(group_by(rows, "model"), "size_index", "model", f"Win rate vs model size (T = {temperature})", path,
              xticklabels=sizes)


def plot_training(run_dirs: list[str], path: Path) -> None:
    """SFT eval loss; DPO loss, reward accuracy (ties apart), reward margin (train and eval), and the policy's mean
    chosen and rejected log-probs beside the reference's (flat: pi_ref does not move), against the step."""
    panels = [("loss", "SFT eval loss", False), ("loss", "DPO loss", True),
              ("reward_accuracy", "DPO reward accuracy (ties: dotted)", True), ("reward_margin", "DPO reward margin", True),
              ("logp", "DPO log-probs, eval (reference: dashed)", True)]
    fig, axes = plt.subplots(2, 3, figsize=(15, 7))
    axes.flat[-1].axis("off")
    drawn = 0
    for run in run_dirs:
        metrics = common.read_jsonl(Path(run) / "metrics.jsonl")
        is_dpo = any("reward_accuracy" in m for m in metrics)  # what tells a DPO run's metrics from SFT's
        for ax, (key, title, dpo_panel) in zip(axes.flat, panels):
            if dpo_panel != is_dpo:
                continue
            ax.set(title=title, xlabel="step")
            if key == "logp":  # mean log pi(y|x) of the chosen and rejected answers, policy vs reference
                evals = [m for m in metrics if m.get("split") == "eval" and "logp_chosen" in m]
                for side, color in (("chosen", "tab:green"), ("rejected", "tab:red")):
                    for prefix, style in (("", "-"), ("ref_", "--")):
                        points = [(m["step"], m[f"{prefix}logp_{side}"]) for m in evals if f"{prefix}logp_{side}" in m]
                        if points:
                            ax.plot(*zip(*points), style, color=color, label=f"{'reference' if prefix else 'policy'} {side}")
                            drawn += 1
                if evals:
                    ax.legend(fontsize=8)
                continue
            for split in ("train", "eval") if is_dpo else ("eval",):
                points = [(m["step"], m[key]) for m in metrics if m.get("split") == split and key in m]
                if points:
                    line = ax.plot(*zip(*points), marker="." if split == "eval" else None, label=f"{Path(run).name} {split}")
                    drawn += 1
                if key == "reward_accuracy":  # at step 0 every margin is exactly 0: a tie, not a wrong ranking
                    ties = [(m["step"], m["reward_ties"]) for m in metrics if m.get("split") == split and "reward_ties" in m]
                    if ties and points:
                        ax.plot(*zip(*ties), ":", color=line[0].get_color(), label=f"{Path(run).name} {split} ties")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    if drawn:
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        print(f"wrote {path}")
    else:
        print(f"no metrics.jsonl with data in {run_dirs}: skipping {path.name}")
    plt.close(fig)


def plot_length(rows: list[dict], path: Path) -> None:
    """Left: mean answer tokens vs temperature per model, and the chosen answers' mean. Right: raw win rate (solid,
    Wilson interval) and length-controlled win rate (dashed, bootstrap interval) vs temperature per model. A gap
    between the two lines is the part of the win rate that length explains."""
    rows = [r for r in rows if r["model"] != sampling.STEPS_MODEL]
    old = [r for r in rows if not {"response_tokens", "chosen_tokens", "lc_win_rate"} <= set(r)]
    if old:
        print(f"results.jsonl: {len(old)} rows without answer lengths or LC win rate, written by an older judge.py; "
              f"rerun judge.py with the same settings to rescore, then plot.py. Skipping {path.name}")
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for k, (name, group) in enumerate(group_by(rows, "model").items()):
        group = sorted(group, key=lambda r: r["temperature"])
        color = f"C{k}"
        left.plot([r["temperature"] for r in group], [r["response_tokens"] for r in group], marker="o", color=color,
                  label=name)
        for key, low, high, style, what in (("win_rate", "ci_low", "ci_high", "-", "raw"),
                                            ("lc_win_rate", "lc_ci_low", "lc_ci_high", "--", "LC")):
            shown = [r for r in group if r[key] is not None]
            right.errorbar([r["temperature"] for r in shown], [r[key] for r in shown], capsize=3, marker="o",
                           yerr=error_bars(shown, key, low, high), ls=style, color=color, label=f"{name} {what}")
    chosen = sum(r["chosen_tokens"] for r in rows) / len(rows)
    left.axhline(chosen, color="gray", ls="--", lw=0.8, label="chosen answers")
    left.set(xlabel="sampling temperature", ylabel="mean answer length (GPT-2 tokens)", title="Answer length")
    right.axhline(0.5, color="gray", lw=0.8, ls="--")
    right.set(xlabel="sampling temperature", ylabel="win rate vs chosen", ylim=(0, 1),
              title="Raw (solid) vs length-controlled (dashed) win rate")
    left.legend()
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    s = common.parse_settings(Settings, argv)
    out = Path(s.out)
    rows = common.read_jsonl(out / "results.jsonl")
    if not rows:
        raise FileNotFoundError(f"no {out / 'results.jsonl'}: run judge.py --out={out} first")
    plot_temperature(rows, out / "fig3_temperature.png")
    plot_steps(rows, out / "fig3_steps.png")
    plot_best_of(rows, out / "best_of_n.png")
    plot_sizes(s.sizes, s.size_temperature, out / "win_rate_vs_size.png")
    plot_training([r for r in s.runs.split(",") if r], out / "training.png")
    plot_length(rows, out / "length.png")


if __name__ == "__main__":
    main()
