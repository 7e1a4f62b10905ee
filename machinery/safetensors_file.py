"""safetensors, read and written by hand: the file format of the hub's GPT-2 weights and of every checkpoint here.

    python -c "from machinery import safetensors_file as st; print(st.read_safetensors('runs/demo/sft/final/model.safetensors')[1])"

What it guards: no pickle anywhere (a .bin or .pt checkpoint can run code when loaded; this format is a JSON header and
raw bytes), and no dependency on the `safetensors` package, which tests/machinery/test_safetensors_file.py uses as the
oracle both ways. model.py reads the hub's weights through it and writes our checkpoints with it; checkpoints.py
writes the optimizer state with it.
"""

import json
import struct
import sys
from pathlib import Path

import torch

# The layout:
#
#   [ 8 bytes: N, little-endian uint64 ][ N bytes: JSON header, space-padded ][ raw tensor bytes ... ]
#   header = {"wte.weight": {"dtype": "F32", "shape": [50257, 768], "data_offsets": [begin, end]}, ...,
#             "__metadata__": {"format": "pt"}}      offsets count from the first byte after the header.
# Tensors are stored row-major and little-endian, so a tensor is one contiguous byte range.

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
          "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
assert sys.byteorder == "little", "safetensors is little-endian; this reader does not byte-swap"


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Returns (tensors, metadata). Reads one tensor at a time, so peak memory is about the file's size."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        metadata = header.pop("__metadata__", {}) or {}
        tensors = {}
        for name, info in header.items():
            begin, end = info["data_offsets"]
            f.seek(8 + n + begin)
            buf = bytearray(f.read(end - begin))  # writable buffer: torch.frombuffer warns on read-only ones
            if len(buf) != end - begin:
                raise ValueError(f"{path}: truncated file ({name} needs bytes {begin}-{end}); download it again")
            dtype = DTYPES[info["dtype"]]
            t = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
            tensors[name] = t.reshape(info["shape"])
    return tensors, metadata


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    header, offset = {}, 0
    for name in sorted(tensors):
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # pad so the tensor data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name in sorted(tensors):
            t = tensors[name].detach().cpu().contiguous()
            f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
