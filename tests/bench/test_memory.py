"""bench/memory.py: the per-GPU memory table, computed from shapes. state_per_rank against closed forms; the
table's state columns against 12 bytes per parameter."""

import math

import pytest
import torch

import model as gpt
from bench import memory


def gpt2_on_meta() -> gpt.GPT:
    with torch.device("meta"):
        return gpt.GPT(gpt.PRESETS["gpt2"])


@pytest.mark.parametrize("optimizer, moments", [("rmsprop", 1), ("adamw", 2)])
def test_state_per_rank_is_4_bytes_per_element_each(optimizer, moments):
    """Catches a tied weight counted twice, a wrong number of optimizer moments, or FSDP's shard computed as
    numel / world instead of whole rows (ceil(rows / world) of each parameter: rank 0 holds the most)."""
    model = gpt2_on_meta()
    params = list(model.parameters())
    N = sum(p.numel() for p in params)
    ddp = memory.state_per_rank(model, 8, fsdp=False, optimizer=optimizer)
    assert ddp == {"params": 4 * N, "grads": 4 * N, "optimizer": moments * 4 * N + 4 * len(params)}, ddp
    shard = sum(math.ceil(p.shape[0] / 8) * (p.numel() // p.shape[0]) for p in params)
    assert memory.state_per_rank(model, 8, fsdp=True, optimizer=optimizer)["params"] == 4 * shard
    assert memory.state_per_rank(model, 1, fsdp=True, optimizer=optimizer) == ddp  # one rank: the whole model


def test_the_table_prints_every_size_and_setup(capsys):
    """Catches a renamed flag, a broken import, and a table whose state column is not 12 bytes per parameter."""
    memory.main(["--world=8"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("  gpt2")]
    assert len(rows) == 4 * len(gpt.HUB_MODELS), rows
    ddp = next(row for row in rows if row[:3] == ["gpt2", "DDP", "x8"])
    assert float(ddp[3]) == round(12 * gpt2_on_meta().num_params() / 1e9, 1), ddp
