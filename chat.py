"""Talk to what you trained: a chat with one model, or several side by side, each answer under its model's name.

    make chat RUN_DIR=runs/demo                                                  # the run directory's DPO model
    python chat.py --models=sft:runs/demo/sft/final,dpo:runs/demo/dpo/final      # SFT and DPO, the same questions
    python chat.py --models=... --input=questions.txt                            # one turn per line; or pipe stdin

The models learned Anthropic HH's dialogue format (data.py), so the conversation so far is sent as one HH prompt,
one Human/Assistant turn after another, ending with an open Assistant turn for the model to continue:

    "\\n\\nHuman: Can you name a fruit?\\n\\nAssistant: A fruit is apple.\\n\\nHuman: Another one?\\n\\nAssistant:"

An answer ends where the model starts the user's next turn ("\\n\\nHuman:", cut off as in evaluation) or at
<|endoftext|>, and is printed as it is sampled (model.GPT.generate's `stream`). With several models each answers
the same prompt, and the conversation goes on with one answer: --continue_with's, or /use NAME's (default: the
last model's). When the conversation outgrows the context window, its oldest whole turns are dropped, with a note.

Commands: /reset (forget the conversation), /temperature 0.7, /use NAME, /quit; Ctrl-D and Ctrl-C leave too.
"""

import dataclasses
import importlib
import struct
import sys
from pathlib import Path

import torch

import data
import model as gpt
import reward
import sampling
from machinery import common


@dataclasses.dataclass
class Settings:
    """Chat with trained models: python chat.py --models=sft:runs/demo/sft/final,dpo:runs/demo/dpo/final"""

    models: str = "dpo:runs/gpt2/dpo/final"  # name:checkpoint pairs, comma separated: each answers every turn
    continue_with: str = ""  # whose answer the conversation keeps when several models answer ("" = the last one)
    temperature: float = 0.7  # sampling temperature (0 = greedy); /temperature changes it
    top_p: float = 0.95  # nucleus sampling: the smallest set of likeliest tokens holding this much probability
    max_new_tokens: int = 128  # longest answer, in tokens
    input: str = ""  # a file of turns and commands, one per line ("" = the terminal, or stdin when it is piped)
    seed: int = 0  # for the sampler
    device: str = "auto"  # cuda, mps, cpu or auto
    dtype: str = "auto"  # bfloat16, float16, float32 or auto (common.pick_device)


COMMANDS = "/reset, /temperature T, /use NAME, /quit"


def load_chat_model(name: str, path: str, device) -> gpt.GPT:
    """The GPT-2 checkpoint at `path`, ready to sample; a clear error for a reward model or for no model."""
    if (Path(path) / reward.HEAD_FILE).exists():
        raise ValueError(f"--models {name}:{path} is a reward model (it scores answers, it does not write them); "
                         "give a chat model, e.g. the sft/final or dpo/final directory of the same run")
    try:
        return gpt.load_model(path).to(device).eval()  # a missing path: FileNotFoundError, saying what to give
    except (ValueError, UnicodeDecodeError, struct.error) as e:  # a file that is no safetensors, or no GPT-2
        raise ValueError(f"--models {name}:{path} is no GPT-2 checkpoint ({type(e).__name__}: {e})") from None


def hh_prompt(history: list[tuple[str, str]], message: str) -> str:
    """The conversation in HH's format: every past turn "\\n\\nHuman: <message>\\n\\nAssistant: <answer>", then the
    new message and an open "\\n\\nAssistant:", after which the model's answer brings its own leading space."""
    turns = [f"{data.HUMAN} {human}{data.ASSISTANT} {answer}" for human, answer in history]
    return "".join(turns) + f"{data.HUMAN} {message}{data.ASSISTANT}"


def fit(history: list[tuple[str, str]], message: str, enc, budget: int) -> tuple[list[int], int]:
    """The prompt's tokens within `budget`, the oldest whole turns dropped first -> (token ids, turns dropped).
    A message too long on its own keeps its last `budget` tokens (as evaluation cuts prompts: from the left)."""
    for dropped in range(len(history) + 1):
        ids = enc.encode_ordinary(hh_prompt(history[dropped:], message))
        if len(ids) <= budget:
            return ids, dropped
    return ids[-budget:], len(history)


def visible(text: str) -> str:
    """The part of an answer being sampled that is surely answer: before the next turn's "\\n\\nHuman:", without a
    tail that may turn into it (e.g. "\\n\\nHu"), and without a character still missing bytes (shown as U+FFFD)."""
    text = sampling.clean_response(text).rstrip("\ufffd")
    stop = sampling.STOP[0]
    return next((text[: -k] for k in range(len(stop) - 1, 0, -1) if text.endswith(stop[:k])), text)


def answer(net: gpt.GPT, ids: list[int], s: Settings, temperature: float, enc, generator, out) -> str:
    """One model's answer to the prompt `ids`, written to `out` as it is sampled; returns it, cut as evaluation
    cuts answers (sampling.clean_response)."""
    shown = ""

    def stream(answers):  # after every sampled token: write what has become surely answer
        nonlocal shown
        text = visible(enc.decode(answers[0]))
        if text.startswith(shown):
            out.write(text[len(shown) :])
            out.flush()
            shown = text

    new = net.generate([ids], s.max_new_tokens, temperature, top_p=s.top_p, stop=sampling.STOP, decode=enc.decode,
                       generator=generator, stream=stream)[0]
    text = sampling.clean_response(enc.decode(new))
    out.write((text[len(shown) :] if text.startswith(shown) else "\n" + text) + "\n")
    return text


def terminal_lines(prompt: str = "you> "):
    """Lines typed at the terminal, with line editing and history where the platform has readline; Ctrl-D ends."""
    try:
        importlib.import_module("readline")  # importing it is what turns line editing on for input()
    except ImportError:
        pass
    while True:
        try:
            yield input(prompt)
        except EOFError:
            print()
            return


def main(argv: list[str] | None = None, lines=None, out=None) -> list[tuple[str, str]]:
    """The chat loop over `lines` (default: --input, the terminal, or piped stdin); returns the conversation kept."""
    s = common.parse_settings(Settings, argv)
    out = out or sys.stdout
    models = sampling.parse_models(s.models)
    names = [name for name, _ in models]
    keep = s.continue_with or names[-1]
    if keep not in names:
        raise ValueError(f"--continue_with={keep} is not one of --models {names}")
    device, dtype, reason = common.pick_device(s.device, s.dtype)
    nets = {name: load_chat_model(name, path, device) for name, path in models}
    budget = min(net.config.block_size for net in nets.values()) - s.max_new_tokens
    if budget < 1:
        raise ValueError(f"--max_new_tokens={s.max_new_tokens} leaves no room for the conversation in a context "
                         f"of {budget + s.max_new_tokens} tokens; lower it")
    enc, generator = common.get_tokenizer(), torch.Generator(device).manual_seed(s.seed)
    typed = lines is None and not s.input and sys.stdin.isatty()
    if lines is None:
        lines = terminal_lines() if typed else open(s.input) if s.input else sys.stdin
    temperature, history = s.temperature, []
    out.write(f"chat with {', '.join(names)} ({device}, {reason}); commands: {COMMANDS}\n")
    try:
        for line in lines:
            message = line.strip()
            if not message:
                continue
            if not typed:  # a transcript that reads as one: the turn, then the answers
                out.write(f"you> {message}\n")
            command, _, arg = message.partition(" ")
            if command == "/quit":
                break
            if command == "/reset":
                history.clear()
                out.write("(conversation cleared)\n")
            elif command == "/temperature":
                try:
                    temperature = float(arg)
                    out.write(f"(temperature {temperature})\n")
                except ValueError:
                    out.write(f"(/temperature takes a number, e.g. /temperature 0.7; it stays {temperature})\n")
            elif command == "/use":
                if arg in names:
                    keep = arg
                    out.write(f"(the conversation goes on with {keep}'s answers)\n")
                else:
                    out.write(f"(/use takes one of {', '.join(names)})\n")
            elif command.startswith("/"):
                out.write(f"(unknown command {command}; commands: {COMMANDS})\n")
            else:
                ids, dropped = fit(history, message, enc, budget)
                if dropped:
                    out.write(f"(the conversation outgrew the context window of {budget} prompt tokens: dropped "
                              f"its oldest {dropped} turn{'s' * (dropped > 1)})\n")
                    history = history[dropped:]
                if len(ids) < len(enc.encode_ordinary(hh_prompt([], message))):
                    out.write(f"(the message alone is over {budget} tokens: the model reads its last {budget})\n")
                answers = {}
                for name, net in nets.items():
                    out.write(f"{name}> ")
                    with common.autocast(device, dtype):
                        answers[name] = answer(net, ids, s, temperature, enc, generator, out)
                history.append((message, answers[keep].strip()))
    except KeyboardInterrupt:
        out.write("\n")
    return history


if __name__ == "__main__":
    main()
