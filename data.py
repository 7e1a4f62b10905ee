"""Preference data for DPO: Anthropic HH-RLHF (or an offline synthetic task), parsed, tokenized and batched.

    python data.py --dataset=synthetic       # or hh, hh:helpful-base, shp, shp:askculinary: summary + one decoded batch
    python data.py --dataset=pairs.jsonl     # your own pairs (or train.jsonl,test.jsonl): README, "Your own data"

DPO (Rafailov et al., arXiv 2305.18290) learns from pairs (x, y_w, y_l): a prompt, a preferred ("chosen") and a
dispreferred ("rejected") response. The paper's dialogue experiment (Sec. 6) uses Anthropic's HH-RLHF (Bai et al.,
arXiv 2204.05862). One raw line of `helpful-base/train.jsonl.gz`, abridged:

    {"chosen":   "\\n\\nHuman: What kind of noises did dinosaurs make?\\n\\nAssistant: Humans and dinosaurs didn't
                  live at the same time, [...]\\n\\nHuman: you cant read\\n\\nAssistant: You can read?",
     "rejected": "\\n\\nHuman: What kind of noises did dinosaurs make?\\n\\nAssistant: Humans and dinosaurs didn't
                  live at the same time, [...]\\n\\nHuman: you cant read\\n\\nAssistant: there's a lot of stuff [...]"}

The whole conversation appears twice; the copies differ after the last "\\n\\nAssistant:", where we split:

    prompt   = "\\n\\nHuman: What kind of noises [...]\\n\\nHuman: you cant read\\n\\nAssistant:"
    chosen   = " You can read?"                       <- the leading space stays with the response
    rejected = " there's a lot of stuff [...]"

GPT-2's BPE attaches a space to the word after it (" You" is one token), so the prompt's last token is ":" and the
response's first is " You": tokenizing prompt and response separately gives the tokens of the whole text, and the
boundary between them is exact. Every response then gets an <|endoftext|> (EOT) so the model learns to stop.

Reading order: HH parsed (quirks counted), the synthetic task, your files and SHP as HH text, tokenization with the
reference code's truncation (eric-mitchell/direct-preference-optimization), batches. Machinery: common.py (downloads,
the .npz cache), preference_files.py (the hub's files; yours, checked line by line), tokenized_pairs.py.
"""

import dataclasses
import json
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import torch

import model as gpt
from machinery import common, preference_files
from machinery.preference_files import HH_SUBSETS, hh_file, hh_subsets  # HH's files on the hub
from machinery.tokenized_pairs import PARTS, example, example_lengths, n_examples, pack, select_examples

# ----------------------------------------------------------------------------------------------------------------
# 1. HH-RLHF: download and parse

SPLITS = ("train", "test")
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
QUIRKS = {  # counter key -> what we do about it; the summary line prints every count, zeros included
    "no_assistant": "dropped (no '\\n\\nAssistant:' to split at)",
    "prompt_mismatch": "dropped (chosen and rejected differ before their last Assistant turn)",
    "identical": "dropped (chosen == rejected: no preference)",
    "empty": "kept with an empty response (the rater still preferred one side)",
    "assistant_inside": "kept with 'Assistant:' inside a turn",
}


def split_conversation(chosen: str, rejected: str) -> dict | str:
    """Two whole conversations -> {"prompt", "chosen", "rejected"}, split at their last Assistant turn; or the
    QUIRKS key saying why they cannot be ("no_assistant", "prompt_mismatch")."""
    cut_c, cut_r = chosen.rfind(ASSISTANT), rejected.rfind(ASSISTANT)
    if cut_c < 0 or cut_r < 0:
        return "no_assistant"
    prompt = chosen[: cut_c + len(ASSISTANT)]
    # The reference code slices the rejected text at len(prompt), trusting that both share the prompt. We split each
    # at its own last Assistant turn and keep the pair if the prompts agree (a run-on response's last turn differs).
    if rejected[: cut_r + len(ASSISTANT)] != prompt:
        return "prompt_mismatch"
    return {"prompt": prompt, "chosen": chosen[len(prompt):], "rejected": rejected[len(prompt):]}


def parse_hh(text: str, source: str, counts: Counter) -> list[dict]:
    """JSON lines of {"chosen", "rejected"} -> [{"prompt", "chosen", "rejected"}]; quirks are tallied in `counts`."""
    pairs = []
    for line_no, line in enumerate(text.split("\n"), start=1):  # not splitlines(): JSON may hold a raw U+2028
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            chosen, rejected = record["chosen"], record["rejected"]
            if not (isinstance(chosen, str) and isinstance(rejected, str)):
                raise TypeError("chosen and rejected must be strings")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{source}, line {line_no}: not a JSON record with string 'chosen' and 'rejected' "
                             f"({type(e).__name__}: {e}). The file decompressed cleanly, so its content is wrong: "
                             f"check HF_ENDPOINT, or delete the file to download it again") from None
        counts["records"] += 1
        if isinstance(pair := split_conversation(chosen, rejected), str):  # the quirk that makes it unusable
            counts[pair] += 1
            continue
        prompt, chosen, rejected = pair["prompt"], pair["chosen"], pair["rejected"]
        if chosen.strip() == rejected.strip():
            counts["identical"] += 1
            continue
        if not chosen.strip() or not rejected.strip():
            counts["empty"] += 1
        full = prompt + chosen + rejected
        if full.count("Assistant:") > full.count(ASSISTANT):  # e.g. a human quoting "Assistant: ..." mid-turn
            counts["assistant_inside"] += 1
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def load_hh(split: str, subsets: list[str] | tuple[str, ...] | None = None) -> list[dict]:
    """HH-RLHF pairs of the chosen subsets (default: all four, ~160.8K train / 8.5K test pairs)."""
    subsets = hh_subsets(subsets)
    pairs, counts = [], Counter()
    for subset in subsets:
        path, text = common.read_gzip(lambda: hh_file(subset, split))  # a corrupt file is fetched once more
        pairs += parse_hh(text, str(path), counts)
    quirks = ", ".join(f"{counts[key]} {what}" for key, what in QUIRKS.items())
    print(f"hh-rlhf {split} ({', '.join(subsets)}): {len(pairs)} pairs from {counts['records']} records; {quirks}")
    return pairs


def single_turn(pairs: list[dict]) -> list[dict]:
    """Pairs whose prompt has exactly one Human turn: the paper's single-turn dialogue evaluation."""
    return [pair for pair in pairs if pair["prompt"].count(HUMAN) == 1]


# ----------------------------------------------------------------------------------------------------------------
# 2. The synthetic task: HH's format, a known reward, small enough for a 2-core CPU
#
# A miniature of the paper's controlled experiment (Sec. 6.1, Fig. 2): preferences come from a ground-truth
# reward, so we can measure how much reward a policy gains, not just ask a judge. A behaviour policy writes
# responses from independent parts; a pair is two responses to one prompt, labelled by the reward with 10% flips.

CATEGORIES = {  # no item belongs to two categories, so "is the answer right?" has one answer
    "fruit": ("apple", "banana", "cherry", "grape", "lemon", "mango"),
    "color": ("red", "blue", "green", "yellow", "purple", "pink"),
    "animal": ("dog", "cat", "horse", "rabbit", "tiger", "bear"),
    "city": ("Paris", "London", "Tokyo", "Rome", "Berlin", "Madrid"),
    "drink": ("tea", "coffee", "milk", "juice", "water", "soda"),
    "tool": ("hammer", "saw", "drill", "wrench", "shovel", "ladder"),
    "sport": ("tennis", "soccer", "golf", "hockey", "rugby", "boxing"),
    "instrument": ("piano", "guitar", "violin", "drum", "flute", "harp"),
}
QUESTIONS = ("Can you name {a} {category}?", "What is {a} {category}?", "Tell me {a} {category}, please.")
OPENER, P_OPENER = " Sure!", 0.5  # reward +0.0: a distractor the policy should learn to ignore
P_RIGHT = 0.5  # the answer is about the asked category (else another one, e.g. "A tool is saw."); reward +2.0
FILLERS = (" I think so.", " Let me think.", " Maybe.", " Good question.")  # reward -0.5 each
P_NO_MORE_FILLER, MAX_FILLERS = 0.4, 4  # number of fillers ~ geometric: P(k=0) = 0.4, capped at 4
CLOSING, P_CLOSING = " Hope that helps!", 0.2  # reward +1.0; rare, so even the chosen answers mostly lack it
LABEL_NOISE = 0.1  # chance a pair's labels are flipped, as a human rater sometimes would
# The best response is " A fruit is apple. Hope that helps!" (opener optional): reward 3.0.


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def behaviour_response(rng: random.Random, category: str) -> str:
    """One response of the behaviour policy: opener, answer, fillers and closing, each drawn independently."""
    parts = [OPENER] if rng.random() < P_OPENER else []
    named = category if rng.random() < P_RIGHT else rng.choice([c for c in CATEGORIES if c != category])
    parts.append(f" {article(named).capitalize()} {named} is {rng.choice(CATEGORIES[named])}.")
    n_fillers = 0
    while n_fillers < MAX_FILLERS and rng.random() > P_NO_MORE_FILLER:
        n_fillers += 1
    parts += [rng.choice(FILLERS) for _ in range(n_fillers)]
    if rng.random() < P_CLOSING:
        parts.append(CLOSING)
    return "".join(parts)


def synthetic_reward(prompt: str, response: str) -> float:
    """Ground truth: 2*(answer is "A <asked category> is <one of its items>.") + 1*(polite closing) - 0.5*(fillers).
    Also scores model samples, which may be garbage: anything unparsable simply earns nothing."""
    asked = re.findall(r"\b(" + "|".join(CATEGORIES) + r")\b", prompt)
    answer = re.search(r"(\w+) is (\w+)\.", response)  # the first answer sentence counts
    right = bool(asked and answer and answer.group(1) == asked[-1] and answer.group(2) in CATEGORIES[asked[-1]])
    fillers = sum(response.count(f.strip()) for f in FILLERS)
    return 2.0 * right + 1.0 * (CLOSING.strip() in response) - 0.5 * fillers


def synthetic_pairs(split: str, n: int | None = None, seed: int = 0) -> list[dict]:
    """n preference pairs (train: 4000, test: 500 by default); the same (split, n, seed) gives the same pairs."""
    common.check_choice(split, SPLITS, "split")
    n = {"train": 4000, "test": 500}[split] if n is None else n
    rng = random.Random(f"synthetic/{split}/{seed}")  # a string seed per split: test draws its own samples
    pairs = []
    while len(pairs) < n:
        category = rng.choice(list(CATEGORIES))
        question = rng.choice(QUESTIONS).format(a=article(category), category=category)
        prompt = f"{HUMAN} {question}{ASSISTANT}"
        a, b = behaviour_response(rng, category), behaviour_response(rng, category)
        reward_a, reward_b = synthetic_reward(prompt, a), synthetic_reward(prompt, b)
        if reward_a == reward_b:  # no preference to learn from
            continue
        chosen, rejected = (a, b) if reward_a > reward_b else (b, a)
        if rng.random() < LABEL_NOISE:
            chosen, rejected = rejected, chosen
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


# ----------------------------------------------------------------------------------------------------------------
# 3. Your own preference files, and SHP: every source becomes HH text
#
# A .jsonl(.gz) file in one of three formats (TRL's names; preference_files.py tells which and checks every line
# first) becomes section 1's HH text, so one conversation gives the same tokens in any format (README: examples):
#   standard:        {"prompt": "Why is the sky blue?", "chosen": "Rayleigh scattering.", "rejected": "It isn't."}
#   conversational:  the same keys holding lists of {"role": "system"|"user"|"assistant", "content": str} messages
#   implicit:        {"chosen": "\n\nHuman: ...\n\nAssistant: ...", "rejected": ...}: whole conversations (or lists
#                    of messages), split at the last Assistant turn as HH's lines are
# A prompt in HH text (starting "\n\nHuman:") stays as it is, any other prompt string is one Human turn; every turn
# and answer gets one leading space unless it has one. A system message becomes the first paragraph of the first
# Human turn, "\n\nHuman: <system>\n\n<user>": HH has two speakers, and a "System:" turn or text before the first
# "\n\nHuman:" would be a format the model never met, while instructions in the human's words are what HH holds.


def turn(marker: str, text: str) -> str:
    return marker + (text if text.startswith(" ") else " " + text)


def render(messages: list[dict]) -> str:
    """Checked messages (preference_files.check_messages) -> HH text; a system message opens the first Human turn."""
    has_system = messages[0]["role"] == "system"
    system = messages[0]["content"] + "\n\n" if has_system and messages[0]["content"].strip() else ""
    return "".join(turn(HUMAN if m["role"] == "user" else ASSISTANT, (system if i == 0 else "") + m["content"])
                   for i, m in enumerate(messages[has_system:]))


def file_pair(kind: str, record: dict) -> dict:
    """One line of a preference file, format `kind`, its messages checked -> {"prompt", "chosen", "rejected"}."""
    if kind == "implicit":
        pair = split_conversation(*(x if isinstance(x, str) else render(x) for x in (record["chosen"], record["rejected"])))
        if isinstance(pair, str) or HUMAN in pair["chosen"] + pair["rejected"]:  # HUMAN: an answer that runs on
            raise ValueError("chosen and rejected must be one conversation up to their last '\\n\\nAssistant:' and "
                             "end with an assistant turn")  # preference_files.read_pairs adds the file and line
        prompt, answers = pair["prompt"], (pair["chosen"], pair["rejected"])
    elif kind == "conversational":
        prompt, answers = render(record["prompt"]) + ASSISTANT, (record["chosen"][0]["content"], record["rejected"][0]["content"])
    else:  # standard
        prompt, answers = record["prompt"], (record["chosen"], record["rejected"])
        if not prompt.startswith(HUMAN):
            prompt = turn(HUMAN, prompt) + ASSISTANT
        elif not prompt.endswith(ASSISTANT):
            raise ValueError("the prompt is HH text but does not end with '\\n\\nAssistant:', the turn to answer")
    return {"prompt": prompt, "chosen": turn("", answers[0]), "rejected": turn("", answers[1])}


def dataset_source(dataset: str) -> tuple[str, tuple[str, ...]]:
    """--dataset, checked before any download -> (kind: synthetic, hh, shp or file; subsets, subreddits or paths)"""
    name, _, names = dataset.partition(":")
    names = tuple(names.split(",")) if names else None
    if name in ("hh", "shp") or dataset == "synthetic":
        subsets = {"hh": hh_subsets, "shp": preference_files.shp_subreddits}.get(name, lambda _: ())
        return name, subsets(names)
    if files := preference_files.dataset_files(dataset):
        return "file", files
    raise ValueError(f"unknown dataset {dataset!r}: use synthetic, hh, hh:helpful-base,..., shp, shp:askculinary,..., "
                     "a file pairs.jsonl (or .jsonl.gz), or two: train.jsonl,test.jsonl")


def load_pairs(dataset: str, split: str) -> list[dict]:
    common.check_choice(split, SPLITS, "split")
    kind, names = dataset_source(dataset)
    if kind == "file":  # one file: a seeded tenth of its prompts is the test split (printed)
        return preference_files.load_file(names, split, file_pair)
    if kind == "shp":  # a post is one Human turn, a comment an answer
        return preference_files.load_shp(names, split, lambda post: turn(HUMAN, post) + ASSISTANT, lambda c: turn("", c))
    return load_hh(split, names) if kind == "hh" else synthetic_pairs(split)


# ----------------------------------------------------------------------------------------------------------------
# 4. Tokenization, truncation, and the on-disk cache


def tokenize_pairs(pairs: list[dict], max_length: int = 512, max_prompt_length: int = 256,
                   truncation: str = "truncate") -> dict[str, np.ndarray]:
    """Token ids of every pair, stored ragged: `{part}_ids` (all rows end to end, uint16) and `{part}_offsets`
    (row i is ids[offsets[i]:offsets[i+1]]), for part in PARTS (machinery/tokenized_pairs.py).

    Truncation as in the reference code: if prompt + the longer response exceeds max_length, keep the prompt's
    last max_prompt_length tokens (its end holds the turn being answered); if still too long, cut both responses
    to max_length - len(prompt) (the reference cuts to max_length - max_prompt_length, which wastes room when the
    prompt is short). truncation="drop" drops over-long pairs instead.
    """
    common.check_choice(truncation, ("truncate", "drop"), "truncation")
    if not 0 < max_prompt_length < max_length:
        raise ValueError(f"need 0 < max_prompt_length < max_length so every response keeps a token; "
                         f"got max_prompt_length={max_prompt_length}, max_length={max_length}")
    enc = common.get_tokenizer()
    rows, counts = {part: [] for part in PARTS}, Counter()
    for start in range(0, len(pairs), 4096):  # in chunks: Python lists of all ids at once would take GBs
        chunk = pairs[start: start + 4096]
        # encode_ordinary: a literal "<|endoftext|>" in the text is plain text, so EOT only ever ends a response
        ids = [enc.encode_ordinary_batch([pair[part] for pair in chunk]) for part in PARTS]
        for prompt, chosen, rejected in zip(*ids):
            chosen, rejected = chosen + [gpt.EOT], rejected + [gpt.EOT]
            longer = max(len(chosen), len(rejected))
            if len(prompt) + longer > max_length:
                if truncation == "drop":
                    counts["dropped"] += 1
                    continue
                counts["prompt_cut"] += len(prompt) > max_prompt_length
                prompt = prompt[-max_prompt_length:]
                if len(prompt) + longer > max_length:
                    counts["responses_cut"] += 1
                    chosen, rejected = chosen[: max_length - len(prompt)], rejected[: max_length - len(prompt)]
            for part, row in zip(PARTS, (prompt, chosen, rejected)):
                rows[part].append(np.array(row, dtype=np.uint16))  # GPT-2's 50257 ids fit in 16 bits
    if not rows["prompt"]:
        raise ValueError(f"no pairs left to train on ({len(pairs)} given, {counts['dropped']} dropped as longer "
                         f"than max_length={max_length}); raise max_length or use truncation='truncate'")
    tok = {}
    for part in PARTS:
        tok[f"{part}_ids"], tok[f"{part}_offsets"] = pack(rows[part])
    summary = (f"{len(rows['prompt'])} pairs tokenized (max_length={max_length}, max_prompt_length="
               f"{max_prompt_length}): {counts['prompt_cut']} prompts cut to their end, "
               f"{counts['responses_cut']} pairs with responses cut, {counts['dropped']} over-long pairs dropped")
    print(summary)
    tok["summary"] = np.array(summary)  # a plain unicode array: np.load needs no pickle for it
    return tok


def tokenize_dataset(dataset: str, split: str, max_length: int = 512, max_prompt_length: int = 256,
                     truncation: str = "truncate") -> dict[str, np.ndarray]:
    """load_pairs + tokenize_pairs, cached as .npz: a second run loads the arrays in about a second."""
    # keyed by all the arrays depend on: settings, the source's content (or the generated pairs), the code
    files = preference_files.source_files(*dataset_source(dataset), split)
    source = [common.content_id(f) for f in files] or json.dumps(load_pairs(dataset, split))
    path = preference_files.cache_path(dataset, split, [max_length, max_prompt_length, truncation], source,
                                       code=[__file__, preference_files.__file__])
    return common.cached_arrays(path, lambda: tokenize_pairs(load_pairs(dataset, split), max_length,
                                                              max_prompt_length, truncation), f"{dataset} {split}")


def one_per_prompt(tok: dict) -> np.ndarray:
    """Indices of one pair per distinct prompt: the last one, whose chosen response the reference code keeps as its
    SFT target (it overwrites `sft_target` with each pair's chosen; SHP's best answer comes last, see load_shp).
    Prompts are compared as tokens after truncation: two that differ only before their last max_prompt_length
    tokens count as one (rare)."""
    last = {example(tok, i)[0].tobytes(): i for i in range(n_examples(tok))}  # later pairs overwrite earlier ones
    return np.sort(np.fromiter(last.values(), dtype=np.int64))


# ----------------------------------------------------------------------------------------------------------------
# 5. Batches
#
# A model predicts token t+1 from tokens <= t, so inputs = seq[:-1] and targets = seq[1:], and the loss counts a
# position when its TARGET is a response token (the prompt is given, not learned). Rows are right-padded with EOT;
# padding sits after every real token, so causal attention never lets a real token see it, and the mask keeps it
# out of the loss. A preference batch for B = 2 (p prompt, c chosen, r rejected, E the EOT ending a response,
# . padding), one common length for all 2B rows so one forward pass serves both halves:
#
#                 seq = prompt + response     input_ids = seq[:-1]   target_ids = seq[1:]   loss_mask
#   chosen 1      p p p c c E                 p p p c c .            p p c c E .            0 0 1 1 1 0
#   chosen 2      p p c c c c E               p p c c c c            p c c c c E            0 1 1 1 1 1
#   rejected 1    p p p r E                   p p p r . .            p p r E . .            0 0 1 1 0 0
#   rejected 2    p p r r E                   p p r r . .            p r r E . .            0 1 1 1 0 0


def pad_rows(rows: list[tuple[np.ndarray, np.ndarray]], loss_on_prompt: bool = False) -> dict[str, torch.Tensor]:
    """(prompt_ids, response_ids) per row -> input_ids, target_ids (B, T) int64 and loss_mask (B, T) bool."""
    T = max(len(prompt) + len(response) for prompt, response in rows) - 1
    input_ids = torch.full((len(rows), T), gpt.EOT, dtype=torch.int64)  # (B, T)
    target_ids = torch.full((len(rows), T), gpt.EOT, dtype=torch.int64)  # (B, T)
    loss_mask = torch.zeros((len(rows), T), dtype=torch.bool)  # (B, T)
    for b, (prompt, response) in enumerate(rows):
        assert len(prompt) >= 1 and len(response) >= 1, f"row {b}: prompt {len(prompt)}, response {len(response)}"
        seq = torch.from_numpy(np.concatenate([prompt, response]).astype(np.int64))
        n = len(seq) - 1
        input_ids[b, :n], target_ids[b, :n] = seq[:-1], seq[1:]
        loss_mask[b, 0 if loss_on_prompt else len(prompt) - 1: n] = True  # target t is seq[t + 1]
    return {"input_ids": input_ids, "target_ids": target_ids, "loss_mask": loss_mask}


def sft_batch(tok: dict, indices, on: str = "response") -> dict[str, torch.Tensor]:
    """Rows prompt + chosen, loss on the response (B, T). on="all": prompt + chosen and prompt + rejected rows with
    loss on every real token (2B, T): plain language modelling, used to pretrain the demo's base model."""
    common.check_choice(on, ("response", "all"), "sft_batch on")
    examples = [example(tok, i) for i in indices]
    if on == "response":
        return pad_rows([(prompt, chosen) for prompt, chosen, _ in examples])
    rows = [(prompt, chosen) for prompt, chosen, _ in examples] + [(prompt, rej) for prompt, _, rej in examples]
    return pad_rows(rows, loss_on_prompt=True)


def preference_batch(tok: dict, indices) -> dict[str, torch.Tensor]:
    """Rows [chosen_1 .. chosen_B; rejected_1 .. rejected_B], (2B, T): row i and row B + i share a prompt."""
    examples = [example(tok, i) for i in indices]
    return pad_rows([(prompt, chosen) for prompt, chosen, _ in examples]
                    + [(prompt, rejected) for prompt, _, rejected in examples])


def split_pairs(rows):
    """Anything with one entry per row of a preference batch (2B, ...) -> (its chosen half, its rejected half)."""
    return rows[: len(rows) // 2], rows[len(rows) // 2 :]


# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Settings:
    """Show a dataset: python data.py --dataset=synthetic"""

    dataset: str = "synthetic"  # synthetic, hh, hh:<subset>,..., shp, shp:<subreddit>,..., pairs.jsonl[,test.jsonl]
    split: str = "train"  # train or test
    max_length: int = 512  # prompt + response tokens (the reference code's max_length)
    max_prompt_length: int = 256  # prompt tokens kept, from the end, when a pair is too long
    batch_size: int = 2  # pairs in the decoded example batch


if __name__ == "__main__":
    s = common.parse_settings(Settings)
    tok = tokenize_dataset(s.dataset, s.split, s.max_length, s.max_prompt_length)
    lengths = example_lengths(tok, "pref")
    print(f"pair lengths (prompt + longer response): median {np.median(lengths):.0f}, max {lengths.max()}")
    enc, s.batch_size = common.get_tokenizer(), min(s.batch_size, n_examples(tok))
    batch = preference_batch(tok, range(s.batch_size))
    for row, mask in enumerate(batch["loss_mask"]):
        first = int(mask.nonzero()[0])  # the first position whose target is a response token
        prompt = enc.decode(batch["input_ids"][row, : first + 1].tolist())
        response = enc.decode(batch["target_ids"][row][mask].tolist())
        side = "chosen" if row < s.batch_size else "rejected"
        print(f"{side} {row % s.batch_size}: {prompt!r} + loss on {response!r} + {int((~mask[first:]).sum())} padding")
