"""Tests for reward.py and the parts of judge.py and plot.py built on it: Best of N and the accuracy table.

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
import plot
import reward
import sampling
import sft
from machinery import common, fast_generate

SMALL = gpt.GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=128)
TINY = gpt.PRESETS["tiny"]  # judge.py's tests sample from the `tiny` preset
FAST = dict(device="cpu", dtype="float32", warmup_steps=1, batch_size=16, micro_batch_size=8, max_length=128,
            max_prompt_length=64, eval_every=0, save_every=0, checkpoint_every=0, n_eval=128, optimizer="adamw")
# fp32: the oracles score in fp32, and dtype=auto picks bf16 autocast on CPUs with native bf16 matmuls
SYNTHETIC = ["--dataset=synthetic", "--judge=groundtruth", "--n=4", "--max_new_tokens=8", "--temperatures=0.5,1.0",
             "--device=cpu", "--dtype=float32"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is faster on a busy 2-core machine (see test_train.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_rm(config=SMALL, seed: int = 0) -> reward.RewardModel:
    """A reward model with a random (not zero) head, so that its rewards differ between answers."""
    torch.manual_seed(seed)
    rm = reward.RewardModel(gpt.GPT(config))
    torch.nn.init.normal_(rm.head.weight, std=1.0 / reward.HEAD_SCALE)  # rewards of order 1: |h| ~ 1 per unit
    return rm.eval()


def alone(rm, prompt: list[int], response: list[int]) -> float:
    """The reward of one sequence, computed without data.py or reward_inputs: the (scaled) head on the trunk's final
    hidden state at the last token of prompt + response."""
    tokens = torch.tensor([prompt + response])
    with torch.no_grad():
        return reward.HEAD_SCALE * rm.head(rm.gpt(tokens, hidden=True)[0, -1]).item()


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


# ----------------------------------------------------------------------------------------------------------------
# Best of N


def pool_row(scores: list[float], t: float = 1.0, prompt: str = "p") -> dict:
    return {"sampler": "s", "scorer": "rm", "temperature": t, "seed": 0, "prompt": prompt, "chosen": "c",
            "responses": [f"answer {i}" for i in range(len(scores))], "scores": scores}


def test_best_of_k_picks_the_argmax_of_the_first_k_per_prompt_and_temperature():
    """Catches picking the minimum, the best of the whole pool instead of its first k, one choice shared by all
    prompts or temperatures, and k > N passing silently (it would judge best-of-N and call it best-of-k)."""
    pool = [pool_row([0.1, 0.9, 0.3, 2.0], 0.5, "a"), pool_row([5.0, -1.0, 0.0, 1.0], 0.5, "b"),
            pool_row([-3.0, -2.0, -1.0, -4.0], 1.0, "a")]
    picks = {k: [x["response"] for x in sampling.best_of_k(pool, k)] for k in (1, 2, 3, 4)}
    assert picks == {1: ["answer 0"] * 3, 2: ["answer 1", "answer 0", "answer 1"],
                     3: ["answer 1", "answer 0", "answer 2"], 4: ["answer 3", "answer 0", "answer 2"]}, picks
    assert [x["model"] for x in sampling.best_of_k(pool, 2)] == ["best_of_2"] * 3
    with pytest.raises(ValueError, match="best of 5 asked of a pool holding 4"):
        sampling.best_of_k(pool, 5)
    assert sampling.best_of_ks(128, curve=True) == [1, 2, 4, 8, 16, 32, 64, 128]
    assert sampling.best_of_ks(6, curve=True) == [1, 2, 4, 6] and sampling.best_of_ks(6, curve=False) == [6]


@pytest.fixture
def best_of_run(tmp_path):
    """A tiny sampler (the `tiny` preset, random) and a random reward model of the same shape, on disk."""
    torch.manual_seed(0)
    gpt.save_model(gpt.GPT(TINY), tmp_path / "sft")
    random_rm(TINY).save(tmp_path / "rm")
    return tmp_path, SYNTHETIC + [f"--models=sft:{tmp_path / 'sft'}", "--best_of=4", f"--scorer={tmp_path / 'rm'}",
                                  f"--out={tmp_path / 'eval'}"]


def test_best_of_n_pool_scores_selection_results_and_figures(best_of_run):
    """Catches N samples of one prompt that are all the same draw (cache rows not really sampled apart), scores
    attached to the wrong answers (each is re-scored alone here), a judged answer that is not the pool's argmax,
    best_of rows missing from the results, and the win-rate-vs-N figure or Figure 3's Best-of-N line not drawn."""
    tmp_path, argv = best_of_run
    rows = judge.main(argv + ["--best_of_curve=true"])
    pool = common.read_jsonl(tmp_path / "eval" / "samples" / "best_of.jsonl")
    assert len(pool) == 4 * 2 and all(len(r["responses"]) == len(r["scores"]) == 4 for r in pool)
    assert all(len(set(r["responses"])) > 1 for r in pool), [r["responses"] for r in pool]
    enc, rm = common.get_tokenizer(), reward.load_reward_model(tmp_path / "rm").eval()
    for r in pool[:2]:
        want = [alone(rm, enc.encode_ordinary(r["prompt"]), enc.encode_ordinary(x) + [gpt.EOT]) for x in r["responses"]]
        assert r["scores"] == pytest.approx(want, abs=1e-4), (r["responses"], r["scores"], want)
    judged = [j for j in common.read_jsonl(tmp_path / "eval" / "judgments.jsonl") if j["model"] == "best_of_4"]
    assert len(judged) == 8
    best = {(r["temperature"], r["prompt"]): r["responses"][max(range(4), key=r["scores"].__getitem__)] for r in pool}
    samples = sampling.best_of_k(pool, 4)
    assert all(x["response"] == best[(x["temperature"], x["prompt"])] for x in samples)
    cells = {(r["model"], r["temperature"]) for r in rows}
    assert cells == {(m, t) for m in ("sft", "best_of_1", "best_of_2", "best_of_4") for t in (0.5, 1.0)}, cells
    plot.main([f"--out={tmp_path / 'eval'}", "--runs=", f"--sizes={tmp_path}/none"])
    assert (tmp_path / "eval" / "best_of_n.png").stat().st_size > 1000
    assert {r["model"] for r in plot.largest_best_of(rows)} == {"sft", "best_of_4"}


def test_best_of_n_sampling_resumes_after_a_kill(best_of_run, monkeypatch):
    """Catches a resumed Best-of-N run that samples everything again, loses or rewrites stored answers, or breaks
    on the torn line a kill leaves mid-write (the next rows must not continue it); and a pool reused after its
    sampler was retrained into the same directory."""
    tmp_path, argv = best_of_run
    argv = argv + ["--judge=none"]
    judge.main(argv)
    file = tmp_path / "eval" / "samples" / "best_of.jsonl"
    whole = common.read_jsonl(file)
    lines = file.read_text().splitlines(keepends=True)
    file.write_text("".join(lines[:3]) + lines[3][:50])  # killed while writing the 4th row
    generated = []
    generate = gpt.GPT.generate
    spy = lambda self, prompts, *a, **k: generated.extend(prompts) or generate(self, prompts, *a, **k)  # noqa: E731
    monkeypatch.setattr(gpt.GPT, "generate", spy)
    judge.main(argv)
    again = common.read_jsonl(file)
    assert len(generated) == 8 - 3, f"the resumed run sampled {len(generated)} prompts, 5 were missing"
    assert again[:3] == whole[:3] and len(again) == 8, (len(again), "rows kept or added wrongly")
    assert all(line.startswith("{") for line in file.read_text().splitlines()), "a torn line was continued"
    gpt.save_model(gpt.GPT(TINY), tmp_path / "sft")  # the sampler retrained in place: its pool is stale
    generated.clear()
    judge.main(argv)
    # 8 answers of the sft model itself (judge.py's stale-sample check) + the pool's 8 prompts
    assert len(generated) == 8 + 8, f"after retraining the sampler {len(generated)} prompts were sampled, not 16"


def test_bad_best_of_input_gives_clear_errors(best_of_run):
    """Catches each bad input the issue lists running on silently or failing obscurely: a scorer that is no
    reward model, an implicit scorer without a DPO checkpoint, N < 1, and a reward model built for another
    tokenizer or context size (k > N is checked in the selection test)."""
    tmp_path, argv = best_of_run
    cases = [
        ([f"--scorer={tmp_path / 'sft'}"], "is no reward model"),
        ([f"--scorer={tmp_path / 'nothing'}"], "is no reward model"),
        (["--scorer=implicit:"], "names no checkpoint"),
        ([f"--scorer=implicit:{tmp_path / 'sft'}"], "is no DPO checkpoint"),
        (["--best_of=0"], "at least 1"),
        (["--best_of=-2"], "at least 1"),
        ([f"--scorer={tmp_path / 'small_rm'}"], "another tokenizer or context size"),
    ]
    random_rm(SMALL).save(tmp_path / "small_rm")  # context 128, the sampler's is 256
    for extra, message in cases:
        with pytest.raises(ValueError, match=message):
            judge.main(argv + ["--judge=none"] + extra)


def test_compile_reaches_both_sampling_paths(best_of_run, monkeypatch):
    """judge.py --compile=true must reach generate for the models' own answers and for the Best-of-N pool (catches
    either call dropping it). The spy then generates eagerly: compiled generation itself is tested in test_engine."""
    tmp_path, argv = best_of_run
    seen, generate = [], fast_generate.generate

    def spy(net, *args, compiled=False, **kwargs):
        seen.append((kwargs.get("num_samples", 1), compiled))
        return generate(net, *args, **kwargs)

    monkeypatch.setattr(fast_generate, "generate", spy)
    judge.main(argv + ["--compile=true", "--judge=none"])
    assert {n for n, _ in seen} == {1, 4} and all(c for _, c in seen), seen
