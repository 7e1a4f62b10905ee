"""sft.py: the training loop and the SFT loss, each against an independent reference.

Oracles: one big batch (and a plain backward of its mean loss) for accumulated micro-batches, the warmup formula for
the logged learning rates, two good steps for the checkpoint kept at a NaN, fp32 for log-probs under bf16 autocast,
and the reference code's rule for the SFT targets. Tiny models, fp32 on the CPU, a few steps each. Each test's
docstring names the bug it would catch.
"""

import json
import math
from functools import partial

import numpy as np
import pytest
import torch

import data
import dpo
import model as gpt
import sft
from machinery import batch_order, common, fast_generate
from tests.helpers import (SMALL, category_pairs, max_abs_diff, records, reference_table, run_sft, settings,
                           small_model, small_pairs, tensors)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny tensors run faster on one thread


# ----------------------------------------------------------------------------------------------------------------
# Log-probs under bf16 autocast at GPT-2's logit sizes


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

    tables = {dtype: reference_table(settings(dpo.Settings, dtype=dtype), m, tok, "train")
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
# The loop: accumulation, warmup, non-finite loss, mixed precision


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


# ----------------------------------------------------------------------------------------------------------------
# The SFT targets


def test_sft_targets_one_per_prompt_keeps_the_last_pair_of_each_prompt(monkeypatch):
    """Catches --sft_targets=one_per_prompt not reaching the training set, or keeping another pair than the
    reference code (its dict by prompt ends up with the LAST pair's chosen response as the SFT target)."""
    pairs = [{"prompt": f"{data.HUMAN} Q{q}?{data.ASSISTANT}", "chosen": f" answer {i}", "rejected": " no"}
             for i, q in enumerate([0, 1, 0, 2, 1, 0])]
    tok = data.tokenize_pairs(pairs, max_length=64, max_prompt_length=32)
    assert data.one_per_prompt(tok).tolist() == [3, 4, 5], data.one_per_prompt(tok)
    monkeypatch.setattr(sft, "prepare", lambda cls, argv, stage: (common.parse_settings(cls, argv), None, tok, tok))
    monkeypatch.setattr(sft, "load_policy", lambda s: None)
    trained = {}
    monkeypatch.setattr(sft, "train", lambda s, m, loss_fn, train_batch, eval_batch, n_eval, lengths, stage, run:
                        trained.update(lengths=lengths, batch=train_batch(range(len(lengths)))))
    enc = common.get_tokenizer()
    for targets, want in (("every_pair", range(6)), ("one_per_prompt", [3, 4, 5])):
        sft.main([f"--sft_targets={targets}"])
        batch = trained["batch"]
        answers = [enc.decode(row[mask].tolist()) for row, mask in zip(batch["target_ids"], batch["loss_mask"])]
        assert len(trained["lengths"]) == len(want) and answers == [f" answer {i}<|endoftext|>" for i in want], \
            f"--sft_targets={targets}: SFT targets {answers}, want the chosen answers of pairs {list(want)}"
