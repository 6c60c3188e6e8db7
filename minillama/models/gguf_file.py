"""Parse the header of a GGUF file (llama.cpp's format) and check it holds the data it declares.

The header is parsed here rather than with ``gguf.GGUFReader`` because the reader fails on a short
file with whatever numpy error comes first (or memmaps short data without complaint), and a user
with a half-copied download deserves "truncated: copy it again". Only the dequantization kernels
come from the ``gguf`` package (see ``gguf_tensors``).

GGUF layout (version 2 and 3, little-endian): magic ``GGUF``, u32 version, u64 tensor count, u64
metadata count, the metadata key/values, the tensor infos (name, dims innermost first, type,
offset), padding to ``general.alignment``, then the tensor data.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from minillama.models.errors import ModelLoadError

_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32

# Metadata value type ids -> struct format of one scalar.
_SCALAR_FORMATS = {
    0: "B",  # uint8
    1: "b",  # int8
    2: "H",  # uint16
    3: "h",  # int16
    4: "I",  # uint32
    5: "i",  # int32
    6: "f",  # float32
    7: "?",  # bool
    10: "Q",  # uint64
    11: "q",  # int64
    12: "d",  # float64
}
_STRING, _ARRAY = 8, 9


@dataclass
class _TensorInfo:
    name: str
    dims: tuple[int, ...]  # ggml order: innermost (columns) first
    qtype: GGMLQuantizationType
    start: int  # absolute file offset
    n_bytes: int


@dataclass
class _GGUFFile:
    path: str
    size: int
    version: int
    metadata: dict[str, Any]
    tensors: list[_TensorInfo] = field(default_factory=list)
    data_start: int = 0


class _Truncated(Exception):
    """Raised inside the header parser when a read runs past the end of the file."""

    def __init__(self, offset: int) -> None:
        super().__init__(offset)
        self.offset = offset


class _HeaderReader:
    """Bounds-checked little-endian reads over the mapped file."""

    def __init__(self, buf: mmap.mmap, size: int) -> None:
        self.buf = buf
        self.size = size
        self.pos = 0

    def need(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise _Truncated(self.pos + max(n, 0))

    def scalar(self, fmt: str) -> Any:
        n = struct.calcsize("<" + fmt)
        self.need(n)
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self) -> str:
        n = self.scalar("Q")
        self.need(n)
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        return raw.decode("utf-8")

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype = self.scalar("I")
            count = self.scalar("Q")
            if etype in _SCALAR_FORMATS:
                # Numeric arrays (token types, scores) in one go instead of 50k struct calls.
                fmt = "<" + _SCALAR_FORMATS[etype]
                itemsize = struct.calcsize(fmt)
                self.need(count * itemsize)
                arr = np.frombuffer(self.buf, dtype=np.dtype(fmt), count=count, offset=self.pos)
                self.pos += count * itemsize
                return arr.tolist()
            if count > self.size - self.pos:  # every element takes at least one byte
                raise _Truncated(self.size + 1)
            return [self.value(etype) for _ in range(count)]
        fmt = _SCALAR_FORMATS.get(vtype)
        if fmt is None:
            raise ValueError(f"unknown metadata value type {vtype} at byte {self.pos}")
        return self.scalar(fmt)


def _truncated_message(path: str, detail: str) -> str:
    return f"GGUF file {path} is truncated or corrupt ({detail}): copy or download it again"


def _open_gguf(path: str | os.PathLike) -> tuple[_GGUFFile, mmap.mmap]:
    """Parse the header of ``path`` and check the file holds all tensor data it declares."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelLoadError(f"GGUF file {path} does not exist: check the path")
    if os.path.isdir(path):
        raise ModelLoadError(f"{path} is a directory, not a GGUF file: pass the path of the .gguf file itself")
    size = os.path.getsize(path)
    if size == 0:
        raise ModelLoadError(_truncated_message(path, "the file is empty"))
    try:
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise ModelLoadError(f"GGUF file {path} cannot be read ({e.strerror}): check its permissions") from e

    head = bytes(buf[:4])
    if head != _MAGIC:
        if len(head) < 4 and _MAGIC.startswith(head):
            raise ModelLoadError(_truncated_message(path, f"only {size} bytes long"))
        raise ModelLoadError(
            f"{path} is not a GGUF file (it starts with {head!r}, not {_MAGIC!r}): "
            "pass a .gguf model file or a Hugging Face model folder"
        )

    reader = _HeaderReader(buf, size)
    reader.pos = 4
    try:
        version = reader.scalar("I")
        if version & 0xFFFF == 0 and version != 0:
            raise ModelLoadError(
                f"GGUF file {path} is big-endian, which minillama does not read: use a little-endian GGUF"
            )
        if version not in (2, 3):
            raise ModelLoadError(
                f"GGUF file {path} has format version {version}, which minillama does not read "
                "(it reads 2 and 3): convert the model again with a recent llama.cpp"
            )
        n_tensors = reader.scalar("Q")
        n_kv = reader.scalar("Q")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = reader.string()
            metadata[key] = reader.value(reader.scalar("I"))
        infos = []
        for _ in range(n_tensors):
            name = reader.string()
            n_dims = reader.scalar("I")
            if n_dims > 8:
                raise ValueError(f"tensor {name!r} claims {n_dims} dimensions")
            dims = tuple(reader.scalar("Q") for _ in range(n_dims))
            infos.append((name, dims, reader.scalar("I"), reader.scalar("Q")))
    except ModelLoadError:
        raise
    except _Truncated as t:
        raise ModelLoadError(
            _truncated_message(path, f"the header needs at least {t.offset} bytes, the file has {size}")
        ) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelLoadError(_truncated_message(path, f"bad header: {e}")) from None

    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ModelLoadError(_truncated_message(path, f"bad general.alignment {alignment!r}"))
    data_start = -(-reader.pos // alignment) * alignment

    gf = _GGUFFile(path=path, size=size, version=version, metadata=metadata, data_start=data_start)
    data_end = data_start
    for name, dims, type_id, offset in infos:
        try:
            qtype = GGMLQuantizationType(type_id)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise ModelLoadError(
                f"GGUF file {path} stores tensor {name} as ggml type {type_id}, which this gguf package "
                "does not know: upgrade gguf (pip install -U gguf) or use another quantization"
            ) from None
        n_elems = math.prod(dims)
        if dims and dims[0] % block:
            raise ModelLoadError(_truncated_message(path, f"tensor {name} row of {dims[0]} is not whole blocks"))
        n_bytes = n_elems // block * type_size
        gf.tensors.append(_TensorInfo(name, dims, qtype, data_start + offset, n_bytes))
        data_end = max(data_end, data_start + offset + n_bytes)
    if data_end > size:
        found = max(size - data_start, 0)
        raise ModelLoadError(
            _truncated_message(
                path, f"expected {data_end - data_start} bytes of tensor data, found {found}"
            )
        )
    return gf, buf
