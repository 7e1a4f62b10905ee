"""machinery/transformers_files.py: the config keys and tokenizer files that make a checkpoint open in transformers.
The round trip through transformers itself (logits, AutoTokenizer ids, the reward model's score) is in
tests/test_model.py. Each docstring names the bug the test would catch."""

import json

from machinery import common, transformers_files

TINY = {"n_layer": 2, "n_head": 4, "n_embd": 64, "vocab_size": 50257, "block_size": 64, "dropout": 0.1, "bias": True}


def test_gpt2_config_carries_gpt2configs_keys():
    """Catches a config transformers reads with its own defaults instead of ours: a missing or renamed shape key
    (n_positions from block_size), the exact GELU instead of the tanh one, dropout not carried over, the wrong EOT."""
    config = transformers_files.gpt2_config(TINY)
    want = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 2, "n_head": 4, "n_embd": 64,
            "n_positions": 64, "vocab_size": 50257, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
            "resid_pdrop": 0.1, "bos_token_id": 50256, "eos_token_id": 50256, "tie_word_embeddings": True}
    assert {k: config.get(k) for k in want} == want, config
    reward = transformers_files.gpt2_config(TINY, reward_head=True)
    assert reward["architectures"] == ["GPT2ForSequenceClassification"] and reward["num_labels"] == 1, reward
    assert reward["pad_token_id"] is None, "with pad_token_id = EOT, transformers reads the token before the reward's"
    assert transformers_files.gpt2_config({**TINY, "bias": False}) == {}, "transformers' GPT-2 always has biases"
    json.dumps(config)  # it goes into config.json as it is


def test_tokenizer_files_are_tiktokens(tmp_path):
    """Catches vocab.json and merges.txt swapped, truncated or taken from elsewhere: they must be byte for byte the
    encoder.json and vocab.bpe tiktoken reads; and the special token named wrongly."""
    transformers_files.write_tokenizer_files(tmp_path)
    files = common.tiktoken_cache_files()
    assert (tmp_path / "vocab.json").read_bytes() == files["encoder.json"].read_bytes()
    assert (tmp_path / "merges.txt").read_bytes() == files["vocab.bpe"].read_bytes()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|endoftext|>" and config["tokenizer_class"] == "GPT2Tokenizer", config
