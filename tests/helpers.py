"""What several test files share, defined once: tiny models and tokenized pairs on the CPU, a run directory read
back, the scripted comparisons of the fake OpenAI server, and command lines of a small evaluation. The fixtures
that use them (loopback servers, a private cache, one thread) are in conftest.py.

Test files import these as `from tests.helpers import ...` (tests/ is a package, so tests/machinery/test_*.py can
never collide with the `machinery` package or with a test file of the same name elsewhere).
"""

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import torch

import data
import dpo
import judge
import model as gpt
import reward
import sft
from machinery import distributed, reference_logps

ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------------------------------------------
# Training: a small model, small tokenized pairs, fast settings, and what a run writes

SMALL = gpt.GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=128)  # 1.7M parameters, 1.6M of them wte
LOG2 = math.log(2)
# Every run: CPU, fp32, full lr from the first step (warmup would scale step 1 by 1/150), no periodic work.
FAST = dict(device="cpu", dtype="float32", warmup_steps=1, lr=1e-3, batch_size=8, micro_batch_size=2,
            max_length=128, max_prompt_length=64, eval_every=0, save_every=0, checkpoint_every=0, n_eval=8)


def small_model(seed: int = 0, dropout: float = 0.0) -> gpt.GPT:
    torch.manual_seed(seed)
    return gpt.GPT(dataclasses.replace(SMALL, dropout=dropout))


def small_pairs(split: str = "train", n: int = 32) -> dict:
    return data.tokenize_pairs(data.synthetic_pairs(split, n=n), max_length=128, max_prompt_length=64)


def category_pairs(n: int = 32) -> dict:
    """n pairs "name a <category>" -> chosen: an item of it, rejected: an item of another category. Responses of
    2-3 tokens keep a step cheap (on a CPU the 50257-way softmax at every response token dominates)."""
    names, pairs = list(data.CATEGORIES), []
    for i in range(n):
        asked, other = names[i % 8], names[(i + 1 + i // 8) % 8]
        question = data.QUESTIONS[i % 3].format(a=data.article(asked), category=asked)
        chosen, rejected = data.CATEGORIES[asked][i // 8], data.CATEGORIES[other][i % 6]
        pairs.append({"prompt": f"{data.HUMAN} {question}{data.ASSISTANT}", "chosen": f" {chosen}.",
                      "rejected": f" {rejected}."})
    return data.tokenize_pairs(pairs, max_length=128, max_prompt_length=64)


def settings(cls=sft.Settings, **kw):
    return cls(**{**FAST, **kw})


def reference_table(s, reference, tok: dict, split: str):
    """reference_logps.precompute as dpo.main calls it, in this process: the (N, 2) table of the reference's chosen
    and rejected log-probs of `tok`, cached under DPO_CACHE. The weights' identity is the hash of `reference`'s
    tensors, so two different models never share a table."""
    weights = hashlib.sha256(b"".join(t.detach().cpu().float().numpy().tobytes()
                                      for t in reference.state_dict().values())).hexdigest()[:16]
    batch_fn = lambda ids: data.preference_batch(tok, ids)  # noqa: E731
    logps = lambda model, batch: dpo.concatenated_forward(model, batch)[:2]  # noqa: E731
    run = distributed.setup(s)
    return reference_logps.precompute(s, run, reference, f"test:{weights}", tok, split, batch_fn, logps)


def run_sft(s, m, tok, loss_fn=sft.sft_loss, on="response"):
    """sft.train on the tokenized pairs `tok` (also its eval set), as sft.main would call it."""
    batch = lambda ids: data.sft_batch(tok, ids, on=on)  # noqa: E731
    kind = "sft" if on == "response" else "pref"
    return sft.train(s, m, loss_fn, batch, batch, data.n_examples(tok), data.example_lengths(tok, kind), "sft")


def run_dpo(s, m, tok, reference=None):
    """sft.train with the DPO loss, as dpo.main calls it: a live `reference` model, or None to precompute."""
    batch = lambda ids: data.preference_batch(tok, ids)  # noqa: E731
    if reference is None:
        reference = small_model()  # the policy's starting weights (small_model is seeded)
        batch = reference_logps.with_reference(batch, reference_table(s, reference, tok, "train"))
        loss_fn = dpo.make_loss(s)
    else:
        loss_fn = dpo.make_loss(s, reference.eval())
    return sft.train(s, m, loss_fn, batch, batch, data.n_examples(tok), data.example_lengths(tok, "pref"), "dpo")


def records(out: Path, split: str) -> list[dict]:
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return gpt.read_safetensors(Path(path))[0]


def max_abs_diff(a: dict, b: dict) -> tuple[float, str]:
    """Largest |a - b| over every tensor of two state dicts with the same keys, and where it is."""
    assert a.keys() == b.keys(), f"different tensors: {sorted(a.keys() ^ b.keys())[:5]}"
    return max(((a[k].double() - b[k].double()).abs().max().item(), k) for k in a)


# ----------------------------------------------------------------------------------------------------------------
# Generation: a small model of a 97-token vocabulary with non-zero biases, and the decoder that re-runs everything

SMALL_VOCAB = gpt.GPTConfig(n_layer=2, n_head=4, n_embd=64, vocab_size=97, block_size=64)


def greedy_without_cache(m: gpt.GPT, prompt: list[int], n: int) -> list[int]:
    """The naive reference: re-run the whole sequence for every token."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(m(torch.tensor([seq]))[0, -1].argmax().item())
    return seq[len(prompt) :]


def small_with_biases(seed: int = 0) -> gpt.GPT:
    """SMALL with non-zero biases and LayerNorm terms (GPT-2's init zeroes them), so a path that drops one shows."""
    torch.manual_seed(seed)
    m = gpt.GPT(SMALL_VOCAB).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return m


# ----------------------------------------------------------------------------------------------------------------
# Evaluation: judge.py's command line on the synthetic task, reward models, the fake OpenAI server's script

TINY = gpt.PRESETS["tiny"]  # judge.py's tests sample from the `tiny` preset
SYNTHETIC = ["--dataset=synthetic", "--judge=groundtruth", "--n=4", "--max_new_tokens=8", "--temperatures=0.5,1.0"]
# fp32: the oracles score in fp32, and dtype=auto picks bf16 autocast on CPUs with native bf16 matmuls
SYNTHETIC_FP32 = SYNTHETIC + ["--device=cpu", "--dtype=float32"]


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


KEY = "sk-test-do-not-leak-0123456789"  # the fake OpenAI server's key (conftest.py: fake_openai)


def comparison(i: int, response: str, position: str) -> dict:
    return {"model": "dpo", "path": "runs/x", "step": 10, "temperature": 0.5, "seed": 0,
            "prompt": f"\n\nHuman: Question {i}?\n\nAssistant:", "response": response, "chosen": " a meh answer",
            "position": position, "swap": False}


SCRIPT = [  # (model's answer, its position, expected outcome, requests the fake server should see)
    (" good", "A", "win", 1), (" good", "B", "win", 1), (" bad", "A", "loss", 1), (" bad", "B", "loss", 1),
    (" good [429]", "A", "win", 2), (" good [500]", "B", "win", 2), (" bad [slow]", "A", "loss", 2),
    (" good [badjson]", "B", "win", 2), (" good [garbled-once]", "A", "win", 2), (" good [garbled]", "B", "invalid", 2),
]
OPENAI_FAST = judge.Settings(judge="openai", timeout_s=0.5, backoff_s=0.01, concurrency=4)
