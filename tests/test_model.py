"""model.py against independent references: transformers' GPT-2, a loopback hub, the naive decoder. The safetensors
format, downloads and settings it uses are tested in tests/machinery/."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import model as gpt
from machinery import common
from tests.helpers import SMALL_VOCAB as SMALL
from tests.helpers import greedy_without_cache, small_with_biases


def hf_gpt2(config: gpt.GPTConfig, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd,
                     vocab_size=config.vocab_size, n_positions=config.block_size)
    hf = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # non-zero biases and LayerNorm affine terms, so a dropped or misplaced one shows
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return hf


@pytest.mark.parametrize("layout", ["transformers", "hub"])
def test_logits_match_transformers(tmp_path, layout):
    """Catches any error in the weight map (a missed Conv1D transpose, a wrong key, untied head), in the
    attention (scaling, causal mask), GELU variant, LayerNorm eps, and in left-padding positions/masks."""
    hf = hf_gpt2(SMALL)
    if layout == "transformers":  # "transformer."-prefixed keys, as save_pretrained writes them
        hf.save_pretrained(tmp_path)
    else:  # the hub files: bare keys, plus the causal-mask buffers old checkpoints carry
        sd = {k.removeprefix("transformer."): v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
        for i in range(SMALL.n_layer):
            sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
        save_file(sd, tmp_path / "model.safetensors")
        cfg = {"n_layer": 2, "n_head": 4, "n_embd": 64, "vocab_size": 97, "n_positions": 64}
        (tmp_path / "config.json").write_text(json.dumps(cfg))
    ours = gpt.load_model(str(tmp_path)).eval()

    # a batch of several lengths, left-padded, with the mask and positions transformers needs to match
    lengths = [17, 5, 11]
    T = max(lengths)
    idx = torch.randint(0, 97, (3, T))
    mask = torch.zeros(3, T, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, T - n :] = True
    position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(idx, attention_mask=mask.long(), position_ids=position_ids).logits
        got = ours(idx, attention_mask=mask)
        full_ref = hf(idx).logits
        full_got = ours(idx)
    diff = (got - ref)[mask].abs().max().item()  # padding positions are don't-cares
    assert diff <= 1e-4, f"padded batch: max abs diff {diff}"
    diff = (full_got - full_ref).abs().max().item()
    assert diff <= 1e-4, f"unpadded: max abs diff {diff}"


def test_our_checkpoint_loads_in_transformers(tmp_path):
    """Our checkpoints are written in the hub layout; catches a transpose missing on the way out."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    ours = gpt.GPT(SMALL).eval()
    gpt.save_model(ours, tmp_path / "ckpt", meta={"step": 3})
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=97, n_positions=64)).eval()
    missing, unexpected = hf.transformer.load_state_dict(load_file(tmp_path / "ckpt" / "model.safetensors"), strict=False)
    assert not unexpected and all(k.endswith("attn.bias") for k in missing), (missing, unexpected)
    idx = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        diff = (ours(idx) - hf(idx).logits).abs().max().item()
    assert diff <= 1e-4, diff
    again = gpt.load_model(str(tmp_path / "ckpt"))
    assert again.config == SMALL
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["meta"] == {"step": 3}


def test_preset_parameter_counts():
    """Catches a preset with the wrong shape, or an untied lm_head counted twice."""
    expected = {"gpt2": 124.44e6, "gpt2-medium": 354.82e6, "gpt2-large": 774.03e6, "gpt2-xl": 1557.61e6}
    for name, count in expected.items():
        with torch.device("meta"):
            n = gpt.GPT(gpt.PRESETS[name]).num_params()
        assert abs(n - count) / count < 1e-3, f"{name}: {n / 1e6:.2f}M parameters, expected {count / 1e6:.2f}M"


# ----------------------------------------------------------------------------------------------------------------
# Loading from the hub (tests/conftest.py: file_server), and its errors


def test_from_pretrained_via_hub_and_errors(file_server, tmp_path, monkeypatch):
    """A preset name goes to {HF_ENDPOINT}/openai-community/<name>/resolve/main/model.safetensors; 404 and an
    unreachable host give errors that name the URL and what to do."""
    monkeypatch.setitem(gpt.PRESETS, "gpt2", SMALL)  # same protocol, a small file
    hf_gpt2(SMALL).save_pretrained(tmp_path / "hf")
    file_server.files["/openai-community/gpt2/resolve/main/model.safetensors"] = (tmp_path / "hf" / "model.safetensors").read_bytes()
    m = gpt.GPT.from_pretrained("gpt2")
    assert m.config == SMALL
    with pytest.raises(common.DownloadError, match="no such file.*gpt2-medium.*404"):
        gpt.load_model("gpt2-medium")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    with pytest.raises(common.DownloadError, match="HF_ENDPOINT.*local file"):
        gpt.load_model("gpt2-large")


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model at"):
        gpt.load_model(str(tmp_path / "nope"))
    save_file({"wte.weight": torch.zeros(97, 64), "wpe.weight": torch.zeros(64, 64)}, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="match no GPT-2 preset"):
        gpt.load_model(str(tmp_path / "x.safetensors"))


# ----------------------------------------------------------------------------------------------------------------
# Generation


def test_generate_cache_and_batching_match_naive():
    """Catches KV-cache indexing errors, wrong positions or masks under left padding, and a generation path (the
    weights generate prepares, see gpt.Linear) that drops a bias."""
    m = small_with_biases()
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8, 9], [10, 11, 12, 13]]
    batched = m.generate(prompts, 12, temperature=0, eos_id=-1)
    for p, got in zip(prompts, batched):
        assert got == m.generate([p], 12, temperature=0, eos_id=-1)[0]
        assert got == greedy_without_cache(m, p, 12)
    # An end token that row 1 produces early: that row leaves the batch, the others must be unaffected.
    eos = batched[1][2]
    with_eos = m.generate(prompts, 12, temperature=0, eos_id=eos)
    assert len(with_eos[1]) <= 2
    for p, got, full in zip(prompts, with_eos, batched):
        assert got == m.generate([p], 12, temperature=0, eos_id=eos)[0]
        assert got == full[: full.index(eos)] if eos in full else got == full


def test_generate_stops_at_eos_and_stop_strings():
    """Rows end independently; the stop string and anything after it are not returned."""
    enc = common.get_tokenizer()
    torch.manual_seed(0)
    m = gpt.GPT(dataclasses.replace(SMALL, vocab_size=50257)).eval()
    # A scripted forward replaces the network: each token determines the next. Row 0 says " fine." then starts a
    # new Human turn, row 1 says " ok" then EOT, so row 1 leaves the batch first and row 0 goes on alone.
    # Generation must cut row 0 before the stop string and row 1 at EOT.
    scripts = [[3] + enc.encode(" fine. Human: more"), [6] + enc.encode(" ok") + [gpt.EOT]]
    successor = {a: b for s in scripts for a, b in zip(s, s[1:])}
    assert len(successor) == sum(len(s) - 1 for s in scripts), "scripts must not repeat a token"

    def scripted(idx, attention_mask=None, cache=None, select=None):
        logits = torch.full((idx.shape[0], 50257), -1e9)
        logits[torch.arange(idx.shape[0]), [successor[t] for t in idx[:, -1].tolist()]] = 0
        return logits if select is not None else logits[:, None]  # (B, V) at the selected last positions, or (B, T, V)

    m.forward = scripted
    out = m.generate([[1, 2, 3], [4, 5, 6]], 10, temperature=0, stop=("Human:",), decode=enc.decode)
    assert enc.decode(out[0]) == " fine."
    assert enc.decode(out[1]) == " ok"


def test_generate_seeded_sampling_is_reproducible():
    torch.manual_seed(0)
    m = gpt.GPT(SMALL).eval()
    run = lambda seed: m.generate([[1, 2], [3]], 10, temperature=1.0, top_k=20, top_p=0.9, eos_id=-1,  # noqa: E731
                                  generator=torch.Generator().manual_seed(seed))
    assert run(1) == run(1)
    assert run(1) != run(2)


def test_num_samples_shares_the_prefill_and_equals_repeated_prompts():
    """Catches a shared-prefill (Best of N) bug: cache rows copied in the wrong order (repeat instead of
    repeat_interleave puts prompt 1's keys under prompt 0's samples), a mask or position not copied, or samples of
    one prompt that are all the same draw. Same seed: n samples of each prompt must equal the prompts repeated."""
    torch.manual_seed(0)
    m = gpt.GPT(SMALL).eval()
    prompts, n = [[1, 2, 3, 4, 5], [6, 7]], 3
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    shared = m.generate(prompts, 10, temperature=1.0, eos_id=-1, generator=g(), num_samples=n)
    repeated = m.generate([p for p in prompts for _ in range(n)], 10, temperature=1.0, eos_id=-1, generator=g())
    assert shared == repeated
    assert len({tuple(s) for s in shared[:n]}) > 1, "the samples of one prompt are all identical at T = 1"
    greedy = m.generate(prompts, 10, temperature=0, eos_id=-1, num_samples=n)
    assert greedy == [m.generate([p], 10, temperature=0, eos_id=-1)[0] for p in prompts for _ in range(n)]
    with pytest.raises(ValueError, match="num_samples"):
        m.generate(prompts, 10, num_samples=0)


def test_top_k_and_top_p_filter_the_right_tokens():
    """Catches an off-by-one in the nucleus: with probs (0.5, 0.3, 0.15, 0.05) and top_p=0.75 only the
    first two tokens may appear; with top_k=1 only the first."""
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    seen = set(gpt.sample_next(logits, 1.0, None, 0.75, g).tolist())
    assert seen == {0, 1}, seen
    assert set(gpt.sample_next(logits, 1.0, 1, None, g).tolist()) == {0}


def test_sampling_frequencies_match_the_softmax():
    """The inverse-CDF sampler must draw each token with its softmax probability (catches an off-by-one in
    searchsorted, or u drawn from the wrong range)."""
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3])
    logits = probs.log().repeat(40_000, 1)
    draws = gpt.sample_next(logits, 1.0, None, None, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    assert (freq - probs).abs().max() < 0.01, f"frequencies {freq.tolist()} vs probabilities {probs.tolist()}"


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_divides_the_logits(temperature):
    """Catches a temperature that multiplies the logits instead of dividing them: at T = 1 both agree, and T = 0
    is argmax, so only a T other than 0 and 1 tells them apart. Frequencies must follow softmax(logits / T)."""
    logits = torch.tensor([2.0, 0.0, 1.0, -1.0])
    draws = gpt.sample_next(logits.repeat(40_000, 1), temperature, None, None, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    want = (logits / temperature).softmax(-1)
    assert (freq - want).abs().max() < 0.01, f"T={temperature}: frequencies {freq.tolist()} vs {want.tolist()}"


# ----------------------------------------------------------------------------------------------------------------
# The blocks


def test_mlp_uses_gpt2s_tanh_gelu_over_a_realistic_range():
    """Catches the exact (erf) GELU in place of GPT-2's tanh approximation. The two agree to ~1e-6 for |x| < 0.7,
    where a small random model's activations stay, but differ by up to ~1e-3 near |x| = 2, where GPT-2's are.
    Oracle: transformers' GPT2MLP ("gelu_new") with the same weights, on inputs that reach [-4, 4] after c_fc."""
    from transformers import GPT2Config
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

    torch.manual_seed(0)
    ours = gpt.MLP(SMALL)
    theirs = GPT2MLP(4 * SMALL.n_embd, GPT2Config(n_embd=SMALL.n_embd, activation_function="gelu_new",
                                                  resid_pdrop=0.0))
    with torch.no_grad():
        ours.c_fc.weight.normal_(0, 0.5)  # pre-activations spread over about [-4, 4]
        for name in ("c_fc", "c_proj"):  # HF's Conv1D stores W as (in, out), nn.Linear as (out, in)
            getattr(theirs, name).weight.copy_(getattr(ours, name).weight.t())
            getattr(theirs, name).bias.copy_(getattr(ours, name).bias)
    x = torch.randn(64, SMALL.n_embd)
    pre = ours.c_fc(x)
    assert pre.abs().max() > 3, f"inputs too small to tell the GELUs apart: max |x| {pre.abs().max():.2f}"
    diff = (ours(x) - theirs(x)).abs().max().item()
    assert diff < 1e-5, f"MLP differs from GPT-2's by {diff:.2e} (the exact GELU differs by ~1e-3)"


def test_activation_checkpointing_gives_the_same_gradients():
    """Recomputing blocks in backward must not change the gradients (catches a checkpointed call that drops the
    mask argument or runs with different dropout state)."""
    torch.manual_seed(0)
    m = gpt.GPT(SMALL)
    idx = torch.randint(0, 97, (2, 16))
    grads = []
    for flag in (False, True):
        m.config.grad_checkpoint = flag
        m.zero_grad()
        m(idx).float().logsumexp(-1).mean().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    diff = max((a - b).abs().max().item() for a, b in zip(*grads))
    assert diff <= 1e-6, f"max abs gradient difference {diff}"


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints that transformers opens as they are (machinery/transformers_files.py; issue 27)

HH_TEXT = ("\n\nHuman: What kind of noises did dinosaurs make?\n\nAssistant: Humans and dinosaurs didn't live at the "
           "same time, so it's hard to say.\n\nHuman: you can't read  \u00fc\u00df \U0001F642\n\nAssistant: You can read?")


def trained_tiny(steps: int = 3) -> gpt.GPT:
    """A 2-layer GPT-2 with the real vocabulary, a few Adam steps away from its init (biases and LayerNorms moved)."""
    torch.manual_seed(0)
    m = gpt.GPT(gpt.GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=64))
    ids = torch.tensor([common.get_tokenizer().encode_ordinary(HH_TEXT)[:64]])
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(m(ids[:, :-1])[0], ids[0, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


def test_saved_directory_opens_in_transformers_as_it_is(tmp_path):
    """Catches a checkpoint transformers cannot open without a conversion step: a config.json lacking GPT2Config's
    keys (or with a wrong one: activation "gelu" instead of "gelu_new", another layer_norm_epsilon, n_positions),
    missing or swapped vocab.json / merges.txt, a tokenizer whose ids differ from tiktoken's on HH text; and our own
    loader no longer reading the directory (the config's "model" entry)."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    ours = trained_tiny()
    gpt.save_model(ours, tmp_path / "ckpt", meta={"step": 3})
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "ckpt").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    want = common.get_tokenizer().encode_ordinary(HH_TEXT)
    got = tokenizer(HH_TEXT)["input_ids"]
    assert got == want, f"AutoTokenizer ids differ from tiktoken's at {next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)}"
    assert tokenizer.decode(want) == HH_TEXT and tokenizer.eos_token_id == gpt.EOT
    idx = torch.tensor([want[:64]])
    with torch.no_grad():
        diff = (ours(idx) - hf(idx).logits).abs().max().item()
    # 1e-5, tighter than the 1e-4: both run the same fp32 ops (~1e-6 apart), and "gelu" for "gelu_new" is ~5e-5
    assert diff <= 1e-5, f"transformers' logits vs ours on the saved checkpoint: max abs diff {diff}"
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"], config
    again = gpt.load_model(str(tmp_path / "ckpt"))
    assert again.config == ours.config and config["meta"] == {"step": 3}
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in ours.state_dict().items())


def test_checkpoints_written_before_still_load(tmp_path):
    """Catches a loader that needs the new files: a directory as model.save_model wrote it before issue 27
    (config.json = {"model", "meta"} only, no tokenizer files) must load as it did."""
    ours = trained_tiny(steps=1)
    gpt.save_model(ours, tmp_path / "old")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / "old" / name).unlink()
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    (tmp_path / "old" / "config.json").write_text(json.dumps({"model": config["model"], "meta": config["meta"]}))
    again = gpt.load_model(str(tmp_path / "old"))
    assert again.config == ours.config
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in ours.state_dict().items())


def test_reward_model_opens_as_a_transformers_sequence_classifier(tmp_path):
    """Catches a reward directory whose transformers reading is not our reward: the head saved without HEAD_SCALE,
    a config that is not one-label GPT2ForSequenceClassification, or a pad_token_id set to <|endoftext|> (then
    transformers reads the token before the final EOT). Our loader must still ignore score.weight."""
    from transformers import GPT2ForSequenceClassification

    import reward

    rm = reward.RewardModel(trained_tiny(steps=1)).eval()
    torch.nn.init.normal_(rm.head.weight, std=0.1)
    rm.save(tmp_path / "rm")
    hf = GPT2ForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    tokens = torch.tensor([common.get_tokenizer().encode_ordinary(HH_TEXT)[:40] + [gpt.EOT]])
    last = torch.zeros_like(tokens, dtype=torch.bool)
    last[0, -1] = True
    with torch.no_grad():
        ours, theirs = rm(tokens, last)[0].item(), hf(tokens).logits[0, 0].item()
    assert abs(ours - theirs) <= 1e-4 * max(1.0, abs(ours)), f"reward: ours {ours}, transformers {theirs}"
    loaded = reward.load_reward_model(tmp_path / "rm")
    assert torch.equal(loaded.head.weight, rm.head.weight)
