"""Minimal streaming safetensors reader/writer on numpy.

Hand-written because the `safetensors` package's numpy reader rejects bfloat16 (the dtype GLM-4.5
ships in) and its writer needs a whole file as one in-memory dict. The format is a little-endian
u64 header length, a JSON header {name: {dtype, shape, data_offsets}}, then raw bytes. Reading is
zero-copy through np.memmap, so a tensor (or a slice of one) is read only when asked for.

The header is untrusted: it is validated on open as the reference implementation does (a sane
header size, known dtypes, byte ranges that match each shape and tile the data exactly: in
bounds, contiguous, no overlaps, no gaps, no truncation), and every error names the file and the
tensor.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Iterable

import ml_dtypes
import numpy as np

from glm_jax.errors import CheckpointError

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000  # the reference implementation's limit


class SafetensorsFile:
    """Lazily reads tensors of one .safetensors file; the header is validated on open."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._header = _read_header(self.path)
        self._data_start = 8 + self._header.pop("__header_bytes__")
        self._mmap = None

    def keys(self) -> list[str]:
        return list(self._header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._header[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return _DTYPES[self._header[name]["dtype"]]

    def dtype_name(self, name: str) -> str:
        """The safetensors dtype code, e.g. "BF16"."""
        return self._header[name]["dtype"]

    def get(self, name: str) -> np.ndarray:
        """A read-only memory-mapped view of the tensor (no copy until used)."""
        start, end = self._header[name]["data_offsets"]
        if start == end:
            return np.zeros(self.shape(name), self.dtype(name))
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self._mmap[self._data_start + start:self._data_start + end]
        return raw.view(self.dtype(name)).reshape(self.shape(name))


def _read_header(path: Path) -> dict:
    def fail(what: str):
        raise CheckpointError(f"{path}: {what}")

    size = os.path.getsize(path)
    if size < 8:
        fail(f"not a safetensors file ({size} bytes; the 8-byte header length is missing)")
    with open(path, "rb") as f:
        (header_bytes,) = struct.unpack("<Q", f.read(8))
        if header_bytes > MAX_HEADER_BYTES:
            fail(f"header length {header_bytes} exceeds the {MAX_HEADER_BYTES}-byte limit "
                 "(not a safetensors file, or a corrupt one)")
        if 8 + header_bytes > size:
            fail(f"truncated: the header needs {header_bytes} bytes, the file has {size - 8}")
        try:
            header = json.loads(f.read(header_bytes))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            fail(f"header is not valid JSON ({e})")
    if not isinstance(header, dict):
        fail("header is not a JSON object")
    header.pop("__metadata__", None)
    spans = []
    for name, entry in header.items():
        spans.append((*_check_entry(path, name, entry), name))
    data_bytes = size - 8 - header_bytes
    position = 0
    for start, end, name in sorted(spans):
        if start != position:
            where = "overlaps the tensor before it" if start < position else "leaves a gap before it"
            fail(f"tensor {name!r}: data_offsets start at {start}, which {where} "
                 f"(expected {position})")
        position = end
    if position != data_bytes:
        if position > data_bytes:
            fail(f"truncated: the header's tensors need {position} data bytes, the file has "
                 f"{data_bytes}")
        fail(f"{data_bytes - position} bytes after the last tensor belong to no tensor")
    header["__header_bytes__"] = header_bytes
    return header


def _check_entry(path: Path, name: str, entry) -> tuple[int, int]:
    """-> (start, end) of a header entry whose dtype, shape and byte range agree."""
    def fail(what: str):
        raise CheckpointError(f"{path}: tensor {name!r}: {what}")

    if not isinstance(entry, dict):
        fail("header entry is not an object")
    code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if code not in _DTYPES:
        fail(f"unknown dtype {code!r}")
    if (not isinstance(shape, list)
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        fail(f"shape {shape!r} is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        fail(f"data_offsets {offsets!r} are not [start, end] with 0 <= start <= end")
    nbytes = math.prod(shape) * _DTYPES[code].itemsize
    if offsets[1] - offsets[0] != nbytes:
        fail(f"data_offsets {offsets} hold {offsets[1] - offsets[0]} bytes, but shape "
             f"{tuple(shape)} of {code} needs {nbytes}")
    return offsets[0], offsets[1]


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
