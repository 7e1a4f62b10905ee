"""machinery/safetensors_file.py: our reader and writer against the reference `safetensors` package, byte for byte.
Each docstring names the bug the test would catch."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from machinery import safetensors_file


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_safetensors_interop(tmp_path, dtype):
    """Our reader and writer against the reference package, byte-exact, for each float width."""
    tensors = {"a.weight": torch.randn(3, 5).to(dtype), "b": torch.randn(7).to(dtype), "c": torch.randn(2, 2, 2).to(dtype)}
    safetensors_file.write_safetensors(tmp_path / "ours.safetensors", tensors, {"format": "pt"})
    theirs = load_file(tmp_path / "ours.safetensors")
    save_file(tensors, tmp_path / "theirs.safetensors", metadata={"format": "pt"})
    ours, meta = safetensors_file.read_safetensors(tmp_path / "theirs.safetensors")
    assert meta == {"format": "pt"}
    for name, t in tensors.items():
        for got in (theirs[name], ours[name]):
            assert got.dtype == dtype and got.shape == t.shape
            assert got.view(torch.uint8).numpy().tobytes() == t.view(torch.uint8).numpy().tobytes(), name
