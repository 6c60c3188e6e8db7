"""One safetensors blob inside a larger file (format 2's ``data.bin``): made by ``encode``, read by ``Blob``.

The safetensors layout is an 8-byte little-endian header length, a JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}}`` and the raw bytes. Nothing is
unpickled; a header that lies about sizes, offsets or dtypes is refused with one ``TraceError``.
``encode`` hands back the header and each array's own memory, for the writer to write in turn: no
copy into one bytes object, and the GIL is free while the file takes them.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from collections.abc import Collection
from typing import Any

import numpy as np
import torch

from minillama.trace.format import TraceError

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_NUMPY = {t: torch.empty(0, dtype=t).numpy().dtype for t in _DTYPES.values() if t != torch.bfloat16}
_NAME_OF_NUMPY = {np.dtype(d): name for name, t in _DTYPES.items() if (d := _NUMPY.get(t)) is not None}
_NAME_OF_TORCH = {t: name for name, t in _DTYPES.items()}
_ITEMSIZE = {name: torch.empty(0, dtype=t).element_size() for name, t in _DTYPES.items()}
#: A header longer than this is not one the writer makes.
MAX_HEADER = 64 << 20


class Blob:
    """The tensors of one blob at ``[offset, offset + length)`` of a memory-mapped file."""

    def __init__(self, mm: mmap.mmap, offset: int, length: int, where: str,
                 names: Collection[str] | None = None) -> None:
        """``names``: check (and hold) only these tensors' entries, for a reader that needs a few of many."""
        self.where = where
        if not (isinstance(offset, int) and isinstance(length, int)) or offset < 0 or length < 8 \
                or offset + length > len(mm):
            raise TraceError(f"{where}: its data lies outside data.bin (offset {offset}, length {length}, "
                             f"file {len(mm)} bytes): the trace is damaged; record it again")
        (n,) = struct.unpack_from("<Q", mm, offset)
        if n > min(MAX_HEADER, length - 8):
            raise TraceError(f"{where}: its tensor header claims {n} bytes of {length}: the trace is damaged; "
                             "record it again")
        try:
            header = json.loads(bytes(mm[offset + 8: offset + 8 + n]))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise TraceError(f"{where}: its tensor header is not JSON: the trace is damaged; record it again") from None
        if not isinstance(header, dict):
            raise TraceError(f"{where}: its tensor header is not an object: the trace is damaged; record it again")
        self._mm, self._base, self._end = mm, offset + 8 + n, offset + length
        self._entries: dict[str, tuple[torch.dtype, list[int], int, int]] = {}
        for name, e in header.items():
            if name == "__metadata__" or (names is not None and name not in names):
                continue
            self._entries[str(name)] = self._check(str(name), e)

    def _check(self, name: str, e: Any) -> tuple[torch.dtype, list[int], int, int]:
        bad = f"{self.where}: tensor {name[:60]!r} has a damaged header"
        if not isinstance(e, dict) or e.get("dtype") not in _DTYPES:
            raise TraceError(f"{bad} (unknown dtype): record the trace again")
        shape, offs = e.get("shape"), e.get("data_offsets")
        if not (isinstance(shape, list) and all(isinstance(d, int) and 0 <= d < 2**40 for d in shape)
                and isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs)):
            raise TraceError(f"{bad} (shape or offsets): record the trace again")
        dtype = _DTYPES[e["dtype"]]
        begin, end = offs
        size = math.prod(shape) * _ITEMSIZE[e["dtype"]]
        if begin < 0 or end - begin != size or self._base + end > self._end:
            raise TraceError(f"{bad} (its bytes do not fit): record the trace again")
        return dtype, shape, begin, end

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def array(self, name: str) -> np.ndarray | None:
        """Tensor ``name`` as a read-only numpy view of the map, no copy (None if the blob does not hold
        it); a dtype numpy lacks (bfloat16) comes as a copy."""
        e = self._entries.get(name)
        if e is None:
            return None
        dtype, shape, begin, end = e
        if dtype not in _NUMPY:
            return self.get(name).float().numpy()
        if end == begin:
            return np.empty(shape, _NUMPY[dtype])
        return np.frombuffer(self._mm, _NUMPY[dtype], math.prod(shape), self._base + begin).reshape(shape)

    def get(self, name: str) -> torch.Tensor | None:
        """A copy of tensor ``name`` (None if the blob does not hold it)."""
        e = self._entries.get(name)
        if e is None:
            return None
        dtype, shape, begin, end = e
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        with memoryview(self._mm) as mv:  # one copy, straight from the map (a slice of mm would be two)
            raw = bytearray(mv[self._base + begin: self._base + end])
        return torch.frombuffer(raw, dtype=dtype).reshape(shape)


def _raw(value: np.ndarray | torch.Tensor) -> tuple[str, list[int], memoryview]:
    """The safetensors dtype name, shape and C-ordered bytes of a host array or tensor."""
    if isinstance(value, torch.Tensor):
        t = value.detach().to("cpu").contiguous()
        name, shape = _NAME_OF_TORCH.get(t.dtype), list(t.shape)
        if name is None:
            raise TypeError(f"a trace cannot store {t.dtype} tensors")
        arr = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else np.empty(0, np.uint8)
    else:
        arr = np.asarray(value)
        name, shape = _NAME_OF_NUMPY.get(arr.dtype), list(arr.shape)  # 0-d stays 0-d
        if name is None:
            raise TypeError(f"a trace cannot store {arr.dtype} arrays")
        if not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr)
    return name, shape, memoryview(arr.reshape(-1)).cast("B")


def encode(tensors: dict[str, np.ndarray | torch.Tensor]) -> list[bytes | memoryview]:
    """One safetensors blob of host arrays or tensors, as the pieces to write in order (the header,
    then each one's bytes, not copied); [] for none."""
    if not tensors:
        return []
    header, parts, at = {}, [], 0
    raw = {str(name): _raw(value) for name, value in tensors.items()}
    # widest elements first: with the data 8-byte aligned, every tensor then starts at a multiple of its
    # element size (the writer aligns each blob's start too), so readers get aligned views
    for name in sorted(raw, key=lambda n: -_ITEMSIZE[raw[n][0]]):
        dtype, shape, data = raw[name]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + data.nbytes]}
        parts.append(data)
        at += data.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return [struct.pack("<Q", len(text)) + text, *parts]
