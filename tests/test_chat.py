"""chat.py driven as a script is: turns and commands fed as lines, what the models were asked and what was printed
checked. The models are the `tiny` preset with generate replaced by a recorder (what was asked is the point), and
one scripted network for the real generate's stop string and streaming. Each docstring names the bug it catches."""

import dataclasses
import io

import pytest
import torch

import chat
import data
import model as gpt
import reward
from machinery import common

ENC = common.get_tokenizer()


@pytest.fixture
def recorder(monkeypatch):
    """GPT.generate replaced: each call records (model, decoded prompt) and answers from `replies` (model -> list),
    in turn; the model is told apart by its position among the loaded ones."""
    asked, replies, loaded = [], {}, []
    load = chat.load_chat_model

    def loading(name, path, device):
        net = load(name, path, device)
        loaded.append(net)
        return net

    def generate(self, prompts, max_new_tokens, temperature, **kwargs):
        who = loaded.index(self)
        asked.append((who, ENC.decode(prompts[0])))
        return [ENC.encode_ordinary(replies.get(who, [" A fruit is apple."] * 99).pop(0))]

    monkeypatch.setattr(chat, "load_chat_model", loading)
    monkeypatch.setattr(gpt.GPT, "generate", generate)
    return asked, replies


def run(argv: list[str], lines: list[str]) -> tuple[str, list]:
    out = io.StringIO()
    history = chat.main(["--device=cpu", "--dtype=float32"] + argv, lines=lines, out=out)
    return out.getvalue(), history


def test_the_prompt_is_hh_format_byte_for_byte(recorder):
    """Catches a missing space after "Assistant:" or "Human:", a turn appended twice to the history, the model's
    answer not kept (or kept with its leading space doubled), and a prompt that does not end in an open Assistant turn."""
    asked, replies = recorder
    replies[0] = [" A fruit is apple.", " A fruit is mango."]
    printed, history = run(["--models=dpo:tiny"], ["Can you name a fruit?", "Another one?"])
    assert [p for _, p in asked] == [
        "\n\nHuman: Can you name a fruit?\n\nAssistant:",
        "\n\nHuman: Can you name a fruit?\n\nAssistant: A fruit is apple.\n\nHuman: Another one?\n\nAssistant:"]
    assert history == [("Can you name a fruit?", "A fruit is apple."), ("Another one?", "A fruit is mango.")]
    assert "you> Another one?\ndpo>  A fruit is mango.\n" in printed, printed
    assert chat.hh_prompt(history, "x") == "".join(
        data.HUMAN + " " + q + data.ASSISTANT + " " + a for q, a in history) + data.HUMAN + " x" + data.ASSISTANT


def test_side_by_side_models_get_the_same_prompt_and_one_answer_goes_on(recorder):
    """Two models: both must be asked the same prompt each turn, each answer printed under its name, and the
    conversation continued with --continue_with's answer (then /use's). Catches the second model asked with the
    first one's answer already in the history, answers printed under the wrong name, and /use ignored."""
    asked, replies = recorder
    replies[0], replies[1] = [" sft one.", " sft two.", " sft three."], [" dpo one.", " dpo two.", " dpo three."]
    printed, history = run(["--models=sft:tiny,dpo:tiny", "--continue_with=sft"], ["q1", "q2", "/use dpo", "q3"])
    by_turn = [asked[i : i + 2] for i in range(0, 6, 2)]
    assert all(a[0] == 0 and b[0] == 1 and a[1] == b[1] for a, b in by_turn), asked
    assert by_turn[1][0][1].endswith("q1\n\nAssistant: sft one.\n\nHuman: q2\n\nAssistant:"), by_turn[1]
    assert by_turn[2][0][1].endswith("q2\n\nAssistant: sft two.\n\nHuman: q3\n\nAssistant:"), by_turn[2]
    assert history[-1] == ("q3", "dpo three.")
    assert "sft>  sft one.\ndpo>  dpo one.\n" in printed, printed


def test_reset_clears_the_history_and_commands_answer(recorder):
    """Catches /reset that leaves turns behind, commands sent to the model as messages, and a /temperature that
    does not reach the sampler."""
    asked, _ = recorder
    temperatures = []
    generate = gpt.GPT.generate
    printed, history = None, None
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gpt.GPT, "generate", lambda self, p, n, t, **k: temperatures.append(t) or generate(self, p, n, t, **k))
        printed, history = run(["--models=dpo:tiny"], ["q1", "/reset", "/temperature 0.25", "/temperature hot",
                                                          "/nope", "q2", "/quit", "q3"])
    assert [p for _, p in asked] == ["\n\nHuman: q1\n\nAssistant:", "\n\nHuman: q2\n\nAssistant:"], asked
    assert temperatures == [0.7, 0.25] and history == [("q2", "A fruit is apple.")]
    assert "(conversation cleared)" in printed and "(unknown command /nope" in printed, printed
    assert "/temperature takes a number" in printed and "q3" not in printed.split("/quit")[1], printed


def test_a_long_conversation_drops_its_oldest_whole_turns(recorder):
    """The tiny model's context is 256 tokens; with 200 kept for the answer, 56 remain for the conversation.
    Catches a prompt cut in the middle of a turn (or from the right, losing the new message), turns dropped without
    a note, and a message longer than the whole budget crashing instead of being cut from the left with a note."""
    asked, _ = recorder
    turns = [f"Question number {i}: can you name a fruit?" for i in range(6)]
    printed, history = run(["--models=dpo:tiny", "--max_new_tokens=200"], turns)
    last = asked[-1][1]
    assert len(ENC.encode_ordinary(last)) <= 56 and last.startswith("\n\nHuman: Question number"), last
    assert last.endswith(f"\n\nHuman: {turns[-1]}\n\nAssistant:") and turns[0] not in last, last
    kept = last.count("\n\nHuman:") - 1
    assert history[: -1] == [(q, "A fruit is apple.") for q in turns[-1 - kept : -1]], (history, kept)
    assert "(the conversation outgrew the context window of 56 prompt tokens: dropped its oldest" in printed, printed

    printed, _ = run(["--models=dpo:tiny", "--max_new_tokens=200"], ["fruit " * 100])
    assert len(ENC.encode_ordinary(asked[-1][1])) <= 56 and asked[-1][1].endswith("fruit\n\nAssistant:")
    assert "(the message alone is over 56 tokens: the model reads its last 56)" in printed, printed


def test_every_prompt_of_a_long_conversation_is_whole_turns(recorder):
    """Each of the six prompts of a conversation that outgrows the 56 prompt tokens (256 context - 200 for the
    answer) must be the longest run of the latest whole turns that fits, in HH's format, ending in the new message.
    Oracle: those prompts built here from the messages and the recorder's answers, without chat.py. Catches a prompt
    built from the whole history instead of the turns kept after truncation: then cut from the left, prompts 3 and
    5 start mid-turn, while the last one (all the test above checks) comes out right."""
    asked, _ = recorder
    turns = [f"Question number {i}: can you name a fruit?" for i in range(6)]
    run(["--models=dpo:tiny", "--max_new_tokens=200"], turns)
    want = []
    for i, message in enumerate(turns):
        for first in range(i + 1):  # drop the oldest whole turns until the prompt fits
            prompt = "".join(f"\n\nHuman: {q}\n\nAssistant: A fruit is apple." for q in turns[first:i])
            prompt += f"\n\nHuman: {message}\n\nAssistant:"
            if len(ENC.encode_ordinary(prompt)) <= 56:
                break
        want.append(prompt)
    got = [prompt for _, prompt in asked]
    wrong = [i + 1 for i, (a, b) in enumerate(zip(got, want)) if a != b]
    assert len(got) == 6 and not wrong, f"prompts {wrong} differ:\n" + "\n".join(
        f"{i}: got {got[i - 1]!r}\n   want {want[i - 1]!r}" for i in wrong)


def test_answers_stream_and_stop_at_the_next_human_turn(monkeypatch):
    """The real generate, on a scripted network whose answer runs on into a new Human turn. Catches the stop string
    not applied (the next turn printed and kept in the history, or sampled on past it), streamed text that differs
    from the final answer, and a half-written "\\n\\nHuman" printed, or kept when the answer's tokens ran out."""
    script = ENC.encode_ordinary(" Sure! A fruit is apple.\n\nHuman: and then") + [gpt.EOT]
    net, calls = gpt.GPT(dataclasses.replace(gpt.PRESETS["tiny"], n_layer=1)).eval(), []

    def scripted(idx, attention_mask=None, cache=None, select=None):  # call k answers the script's k-th token
        logits = torch.full((idx.shape[0], 50257), -1e9)
        logits[:, script[len(calls)]] = 0
        calls.append(idx)
        return logits if select is not None else logits[:, None]

    net.forward = scripted
    monkeypatch.setattr(chat, "load_chat_model", lambda name, path, device: net)
    writes = []

    class Out(io.StringIO):
        def write(self, text):
            writes.append(text)
            return super().write(text)

    out = Out()
    history = chat.main(["--models=dpo:tiny", "--device=cpu", "--temperature=0"], lines=["hi"], out=out)
    assert history == [("hi", "Sure! A fruit is apple.")], history
    assert out.getvalue().endswith("dpo>  Sure! A fruit is apple.\n"), out.getvalue()
    answer = writes[writes.index("dpo> ") + 1 :]
    assert len(answer) > 3 and not any("Human" in w or "\n\n" in w for w in answer), answer
    upto_stop = len(ENC.encode_ordinary(" Sure! A fruit is apple.\n\nHuman:"))
    assert len(calls) == upto_stop, f"{len(calls)} forward passes: generation went on past the stop string"

    calls.clear()  # answers cut by max_new_tokens halfway into "\n\nHuman:" lose that half-turn too
    history = chat.main(["--models=dpo:tiny", "--device=cpu", "--temperature=0", f"--max_new_tokens={upto_stop - 1}"],
                        lines=["hi"], out=io.StringIO())
    assert history == [("hi", "Sure! A fruit is apple.")], history


def test_bad_checkpoints_get_a_clear_error(tmp_path):
    """Catches a reward model accepted as a chat model (it would load its trunk and talk nonsense), and a missing
    path or a file that is no checkpoint failing with an unrelated error."""
    torch.manual_seed(0)
    rm = reward.RewardModel(gpt.GPT(gpt.PRESETS["tiny"]))
    rm.save(tmp_path / "rm")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    cases = [(f"--models=rm:{tmp_path / 'rm'}", ValueError, "is a reward model"),
             (f"--models=x:{tmp_path / 'nothing'}", FileNotFoundError, "no model at"),
             (f"--models=x:{tmp_path / 'junk.safetensors'}", ValueError, "is no GPT-2 checkpoint"),
             ("--models=a:tiny,a:tiny", ValueError, "must be unique"),
             ("--models=a:tiny --continue_with=b", ValueError, "is not one of")]
    for argv, error, message in cases:
        with pytest.raises(error, match=message):
            run(argv.split(), ["hi"])
