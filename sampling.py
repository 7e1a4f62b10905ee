"""The evaluation's first stage: each model answers the test prompts, stored so that a re-run samples nothing twice.

    python judge.py --models=base:gpt2,sft:runs/gpt2/sft/final,dpo:runs/gpt2/dpo/final ...   # calls it, then judges

Rafailov et al., "Direct Preference Optimization", arXiv 2305.18290, Sec. 6.1: the models answer the single-turn
dialogues of Anthropic HH's test split at several temperatures; the base model is prompted 2-shot, since it has
never seen the dialogue format. Best of N, the paper's fourth baseline, samples N answers per prompt from the SFT
model and keeps the one a reward model scores highest (reward.py).

Reading order: the prompts and their few-shot prefix, where an answer ends, the sampling loop (through fast_generate.py,
whose weights are prepared once per call), the answers of one model (reused from disk through answer_store.py when
the same weights made them), then Best of N: the scored pool and best-of-k read from it.
"""

import json
import random
import time
from pathlib import Path

import torch

import data
import model as gpt
import reward
from machinery import answer_store, common, fast_generate

STOP = ("\n\nHuman:",)  # an answer ends where the model starts writing the user's next turn
STEPS_MODEL = "dpo_steps"  # model name of the --dpo_steps checkpoints in the results (plot.py looks for it)
BEST_OF = "best_of_"  # model name prefix: best_of_128 is the best of 128 answers


# ----------------------------------------------------------------------------------------------------------------
# 1. Sample


def parse_models(spec: str) -> list[tuple[str, str]]:
    """"base:gpt2,sft:runs/gpt2/sft/final" -> [("base", "gpt2"), ("sft", "runs/gpt2/sft/final")]."""
    pairs = []
    for item in filter(None, spec.split(",")):
        name, sep, path = item.partition(":")
        if not sep or not name or not path:
            raise ValueError(f"--models takes name:path pairs separated by commas, got {item!r}")
        pairs.append((name, path))
    names = [n for n, _ in pairs]
    if len(set(names)) != len(names) or STEPS_MODEL in names:
        raise ValueError(f"--models names must be unique and not {STEPS_MODEL!r}, got {names}")
    return pairs


def step_checkpoints(run_dir: str) -> list[str]:
    """The intermediate checkpoints step_000200, step_000400, ... that a DPO run saved every save_every steps."""
    steps = sorted(str(p) for p in Path(run_dir).glob("step_*") if gpt.weights_file(p).exists())
    if not steps:
        raise FileNotFoundError(f"no step_*/model.safetensors in {run_dir}; train with dpo.py --save_every=N")
    return steps


def checkpoint_step(path: str) -> int | None:
    """The training step stored in a checkpoint's config.json; None for a preset (base model)."""
    config = Path(path) / "config.json"
    return json.loads(config.read_text()).get("meta", {}).get("step") if config.exists() else None


def eval_prompts(dataset: str, n: int, seed: int) -> list[dict]:
    """The single-turn test dialogues ({"prompt", "chosen", ...}); n > 0 takes a fixed seeded subset."""
    pairs = data.single_turn(data.load_pairs(dataset, "test"))
    if 0 < n < len(pairs):
        pairs = [pairs[i] for i in sorted(random.Random(seed).sample(range(len(pairs)), n))]
    return pairs


def few_shot_prefix(dataset: str, shots: int, seed: int, max_tokens: int) -> str:
    """`shots` whole train dialogues (prompt + chosen answer) to put before a test prompt.

    A base model has never seen the "\n\nHuman: ...\n\nAssistant:" format; two examples of it show the model
    where its answer goes and where it ends (the paper's "2-shot prompted" Pythia-2.8B baseline). Examples come
    from the train split, so no test answer leaks, and each fits in max_tokens so the test prompt keeps its room.
    """
    enc = common.get_tokenizer()
    pairs = data.single_turn(data.load_pairs(dataset, "train"))
    examples = []
    for i in random.Random(seed).sample(range(len(pairs)), len(pairs)):
        text = pairs[i]["prompt"] + pairs[i]["chosen"]
        if len(examples) == shots:
            break
        if len(enc.encode_ordinary(text)) <= max_tokens:
            examples.append(text)
    if len(examples) < shots:
        print(f"few-shot: only {len(examples)} of {shots} train dialogues fit in {max_tokens} tokens each")
    return "".join(examples)


def clean_response(text: str) -> str:
    """Cut the answer where the user's next turn begins; a "\n\nHuman" cut off by max_new_tokens goes too."""
    text = text.split(STOP[0])[0]
    return text.removesuffix("\n\nHuman")


def load_sampler(name: str, path: str, s):
    """(model, device, dtype, budget): the model at `path` on its device, ready to sample, and how many prompt tokens
    fit in its context before an answer of --max_new_tokens."""
    torch.manual_seed(s.seed)  # the `tiny` preset is a random init
    net = gpt.load_model(path)
    device, dtype, reason = common.pick_device(s.device, s.dtype)
    print(f"sample {name}: {device}, {reason}")
    net.to(device).eval()
    budget = net.config.block_size - s.max_new_tokens
    if budget < 1:
        raise ValueError(f"--max_new_tokens={s.max_new_tokens} leaves no room for a prompt in {path}'s "
                         f"context of {net.config.block_size} tokens")
    return net, device, dtype, budget


def sample_batches(name: str, path: str, missing: list[tuple[float, dict]], s, shots: int = 0,
                   num_samples: int = 1, scorer: str = ""):
    """Answers of the model at `path` to the (temperature, prompt) pairs `missing`, yielded one generate call at a
    time as (temperature, prompts, answers, scores): num_samples answers per prompt (prompt j's are answers j*n ...
    j*n + n - 1), cleaned as the judge reads them; with a --scorer spec each answer's score, else None. A base model
    gets `shots` example dialogues before each prompt (few_shot_prefix)."""
    net, device, dtype, budget = load_sampler(name, path, s)
    if scorer:
        score, config = reward.load_scorer(scorer, device, reference=net)
        check_scorer_fits(config, net.config, scorer, path)
    enc = common.get_tokenizer()
    prefix = few_shot_prefix(s.dataset, shots, s.seed, budget // (shots + 1)) if shots else ""
    per_call = max(1, s.batch_size // num_samples)  # prompts per generate call: about batch_size rows of answers
    start, n_answers = time.time(), 0
    for t in s.temperatures:
        # similar lengths in a batch waste less compute on left padding
        todo = sorted((p for tt, p in missing if tt == t), key=lambda p: len(p["prompt"]))
        gen = torch.Generator(device).manual_seed(s.seed)
        for i in range(0, len(todo), per_call):
            batch = todo[i : i + per_call]
            ids = [enc.encode_ordinary(prefix + p["prompt"]) for p in batch]
            with common.autocast(device, dtype):  # prompts cut from the left: the end of the dialogue matters most
                new = fast_generate.generate(net, [x[-budget:] for x in ids], s.max_new_tokens, temperature=t, stop=STOP,
                                      decode=enc.decode, generator=gen, num_samples=num_samples, compiled=s.compile)
            texts = [clean_response(enc.decode(out)) for out in new]
            scores = None
            if scorer:  # scored as the judge will read them: the cleaned text, tokenized as data.py tokenizes it
                scores = reward.score_responses(score, [ids[j // num_samples] for j in range(len(texts))],
                                                [enc.encode_ordinary(x) for x in texts], config.block_size,
                                                device, dtype, s.batch_size)
            n_answers += len(texts)
            yield t, batch, texts, scores
        print(f"sample {name}: temperature {t} done ({n_answers / (time.time() - start):.1f} answers/s so far)")


def sample_model(name: str, path: str, prompts: list[dict], s, file: Path) -> list[dict]:
    """One answer per (prompt, temperature), appended to `file` batch by batch. Answers already there are reused
    only if the same weights (their content hash) and the same generation settings made them."""
    step = checkpoint_step(path)
    shots = s.shots if name == "base" or path in gpt.HUB_MODELS else 0
    generation = {"fingerprint": gpt.weights_id(path), "max_new_tokens": s.max_new_tokens,
                  "shots": shots, "seed": s.seed}  # everything that changes the answers, besides prompt and temperature
    done = answer_store.stored_answers(name, path, file, generation)
    missing = [(t, p) for t in s.temperatures for p in prompts if (t, p["prompt"], p["chosen"]) not in done]
    if missing:
        print(f"sample {name} ({path}): {len(missing)} answers to generate, {len(done)} reused from {file}")
        for t, batch, texts, _ in sample_batches(name, path, missing, s, shots=shots):
            rows = [{"model": name, "path": path, "step": step, "temperature": t, **generation,
                     "prompt": p["prompt"], "response": text, "chosen": p["chosen"]} for p, text in zip(batch, texts)]
            common.append_jsonl(file, rows)
            done.update({(t, r["prompt"], r["chosen"]): r for r in rows})
    return [done[(t, p["prompt"], p["chosen"])] for t in s.temperatures for p in prompts]


# ----------------------------------------------------------------------------------------------------------------
# 1b. Best of N: N answers per prompt from the sampler (the SFT model), the one the scorer likes best is judged
#
# The paper's fourth baseline (Sec. 6.1, Fig. 3): strong, but N times the sampling cost. Every answer is stored with
# its score, one row per (prompt, temperature), so a killed run resumes and best-of-k for any k <= N is read from
# the same pool: best_of_<k> takes the highest score among the first k answers (k = 1 is a plain sample).


def best_of_ks(n: int, curve: bool) -> list[int]:
    """The k to judge: N alone, or 1, 2, 4, ..., N with --best_of_curve."""
    return sorted({min(2**i, n) for i in range(n.bit_length() + 1)}) if curve else [n]


def check_scorer_fits(scorer_config, sampler_config, scorer: str, sampler: str) -> None:
    """The scorer must read the sampler's tokens: same vocabulary (tokenizer) and same context length."""
    got = (scorer_config.vocab_size, scorer_config.block_size)
    want = (sampler_config.vocab_size, sampler_config.block_size)
    if got != want:
        raise ValueError(f"--scorer={scorer} has vocabulary {got[0]} and context {got[1]}, the sampler {sampler} "
                         f"{want[0]} and {want[1]}: another tokenizer or context size. Train the reward model "
                         f"from the sampler's checkpoint (reward.py --model={sampler})")


def sample_best_of(path: str, prompts: list[dict], s, file: Path) -> list[dict]:
    """The pool: N answers to every (prompt, temperature) from the sampler at `path`, each scored by --scorer,
    appended to `file` one generate call at a time (a killed run loses at most that call). Rows made by other
    weights (sampler or scorer retrained in place), another N, max_new_tokens or seed are sampled again."""
    N, key = s.best_of, lambda t, p: (t, p["prompt"], p["chosen"])  # noqa: E731
    generation = {"sampler": path, "scorer": s.scorer, "sampler_fingerprint": gpt.weights_id(path),
                  "scorer_fingerprint": reward.scorer_id(s.scorer), "max_new_tokens": s.max_new_tokens,
                  "seed": s.seed}
    done = answer_store.stored_pool(file, generation, N)
    missing = [(t, p) for t in s.temperatures for p in prompts if key(t, p) not in done]
    if missing:
        print(f"best of {N} from {path}: {len(missing)} prompts x {N} answers to generate, {len(done)} reused")
        for t, batch, texts, scores in sample_batches(f"best of {N}", path, missing, s, num_samples=N, scorer=s.scorer):
            rows = [{**generation, "temperature": t, "prompt": p["prompt"], "chosen": p["chosen"],
                     "responses": texts[j * N : j * N + N], "scores": scores[j * N : j * N + N]}
                    for j, p in enumerate(batch)]
            common.append_jsonl(file, rows)
            done.update({key(t, p): r for p, r in zip(batch, rows)})
    return [done[key(t, p)] for t in s.temperatures for p in prompts]


def best_of_k(pool: list[dict], k: int) -> list[dict]:
    """Model best_of_<k>: per (prompt, temperature), the highest-scoring of the pool's first k answers (the first
    one on a tie), as a sample the judge takes like any other."""
    samples = []
    for r in pool:
        if not 1 <= k <= len(r["responses"]):
            raise ValueError(f"best of {k} asked of a pool holding {len(r['responses'])} answers per prompt; "
                             f"sample a larger pool with --best_of={k} (k must be 1 ... N)")
        best = max(range(k), key=lambda i: r["scores"][i])
        samples.append({"model": f"{BEST_OF}{k}", "path": r["sampler"], "step": None, "temperature": r["temperature"],
                        "seed": r["seed"], "shots": 0, "prompt": r["prompt"], "response": r["responses"][best],
                        "chosen": r["chosen"], "score": r["scores"][best]})
    return samples


def best_of_samples(s, prompts: list[dict], out: Path) -> list[dict]:
    """Settings checked, the pool sampled (or resumed), and the samples of best_of_<k> for every k to judge."""
    if s.best_of < 1:
        raise ValueError(f"--best_of is the number of samples N per prompt and must be at least 1, got {s.best_of} "
                         "(--scorer, --best_of_from and --best_of_curve need it)")
    if not s.scorer:
        raise ValueError("--best_of needs --scorer: a reward model directory (reward.py) or implicit:<dpo checkpoint>")
    sampler = s.best_of_from or dict(parse_models(s.models)).get("sft")
    if not sampler:
        raise ValueError("--best_of samples from the sft entry of --models; there is none: add one or set --best_of_from")
    prompts = prompts[: s.best_of_prompts or len(prompts)]
    pool = sample_best_of(sampler, prompts, s, out / "samples" / "best_of.jsonl")
    return [x for k in best_of_ks(s.best_of, s.best_of_curve) for x in best_of_k(pool, k)]


def sample_all(s, out: Path) -> list[dict]:
    """Stage 1 of judge.py: every model of --models, every step checkpoint of --dpo_steps and Best of N answer the
    evaluation prompts at every temperature (stored under out/samples/, reused when nothing changed)."""
    prompts = eval_prompts(s.dataset, s.n, s.seed)
    print(f"{len(prompts)} single-turn test prompts from {s.dataset}, {len(s.temperatures)} temperatures")
    samples = []
    for name, path in parse_models(s.models):
        samples += sample_model(name, path, prompts, s, out / "samples" / f"{name}.jsonl")
    for path in step_checkpoints(s.dpo_steps) if s.dpo_steps else []:
        samples += sample_model(STEPS_MODEL, path, prompts, s, out / "samples" / f"dpo_{Path(path).name}.jsonl")
    if s.best_of or s.scorer or s.best_of_from or s.best_of_curve:
        samples += best_of_samples(s, prompts, out)
    return samples
