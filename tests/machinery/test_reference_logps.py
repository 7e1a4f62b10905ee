"""machinery/reference_logps.py: the precomputed reference table against the live reference model, and its cache
key against everything the table depends on (the tokens, the reference's weights). Tiny models, fp32 on the CPU.
Each test's docstring names the bug it would catch.
"""


import pytest
import torch

import data
import dpo
import model as gpt
from machinery import reference_logps
from tests.helpers import FAST, LOG2, records, reference_table, settings, small_model

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny tensors run faster on one thread


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


def test_reference_cache_is_keyed_by_the_tokens(cache):
    """Catches a stale reference table: the cache key must change when the tokenized pairs change (an edited
    data.py, a re-downloaded dataset), not only with the settings, or DPO trains against another data set's
    log-probs (silently, when the number of pairs happens to match)."""
    s = settings(dpo.Settings, dataset="synthetic", micro_batch_size=4)
    reference = small_model().eval()
    for seed in (0, 1):  # same settings and split, different pairs
        tok = data.tokenize_pairs(data.synthetic_pairs("train", n=8, seed=seed), max_length=128,
                                  max_prompt_length=64)
        table = reference_table(s, reference, tok, "train")
        want = torch.stack(dpo.concatenated_forward(reference, data.preference_batch(tok, range(8)))[:2], -1).detach()
        diff = (torch.from_numpy(table) - want).abs().max().item()
        assert diff <= 1e-4, \
            f"pairs of seed {seed}: table {table.tolist()}\nexpected {want.tolist()}\nmax abs diff {diff}"


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


def test_a_retrained_reference_at_the_same_path_is_computed_again(tmp_path, cache, monkeypatch):
    """dpo.py keys the reference table by the weights' content (model.weights_id), not by their path: after a
    retrained SFT model is written into the same directory, the next DPO run must compute the table again. Catches a
    key of the tokens and settings alone: DPO would train against the old model's log-probs, silently (here the
    step-0 losses, train and eval, would not be log 2: the policy is the new model, the table the old one's)."""
    monkeypatch.setattr(data, "load_pairs", lambda dataset, split: data.synthetic_pairs(split, n=8))
    sft_model = tmp_path / "sft" / "final"
    args = [f"--{k}={v}" for k, v in {**FAST, "batch_size": 4, "micro_batch_size": 4}.items()] + [
        f"--model={sft_model}", "--dataset=synthetic", "--max_steps=1", "--n_eval=4", "--eval_every=1"]
    for seed in (0, 1):  # the SFT model, then a retrained one written over it
        gpt.save_model(small_model(seed), sft_model)
        out = tmp_path / f"dpo-{seed}"
        dpo.main(args + [f"--out={out}"])
        losses = {split: records(out, split)[0]["loss"] for split in ("train", "eval")}
        assert all(abs(loss - LOG2) <= 1e-5 for loss in losses.values()), \
            f"SFT model {seed + 1} of 2 at {sft_model}: step-0 losses {losses}, log 2 = {LOG2}"
    tables = sorted(p.name for p in (cache / "reference_logps").glob("*.npy"))
    assert len(tables) == 4, f"reference tables {tables}: want train and test for each of the two models"
