"""Minimal streaming safetensors reader/writer on numpy.

Hand-written because the `safetensors` package's numpy reader rejects bfloat16 (the dtype GLM-4.5
ships in) and its writer needs a whole file as one in-memory dict. The format is a little-endian
u64 header length, a JSON header {name: {dtype, shape, data_offsets}}, then raw bytes. Reading is
zero-copy through np.memmap, so a tensor (or a slice of one) is read only when asked for.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterable

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class SafetensorsFile:
    """Lazily reads tensors of one .safetensors file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        self._header = header
        self._data_start = 8 + size
        self._mmap = None

    def keys(self) -> list[str]:
        return list(self._header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._header[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        code = self._header[name]["dtype"]
        if code not in _DTYPES:
            raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {code}")
        return _DTYPES[code]

    def get(self, name: str) -> np.ndarray:
        """A read-only memory-mapped view of the tensor (no copy until used)."""
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        start, end = self._header[name]["data_offsets"]
        raw = self._mmap[self._data_start + start:self._data_start + end]
        return raw.view(self.dtype(name)).reshape(self.shape(name))


def write_safetensors(path: str | Path, tensors: Iterable[tuple[str, tuple[int, ...], np.dtype]],
                      produce, metadata: dict[str, str] | None = None) -> None:
    """Writes a file tensor by tensor: `tensors` lists (name, shape, dtype) up front (the header
    comes first), then `produce(name)` is called for each in order and its bytes streamed out."""
    tensors = list(tensors)
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, shape, dtype in tensors:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype in tensors:
            array = np.ascontiguousarray(produce(name), dtype=dtype)
            if array.shape != tuple(shape):
                raise ValueError(f"tensor {name!r}: produced shape {array.shape}, declared {shape}")
            f.write(array.tobytes())
