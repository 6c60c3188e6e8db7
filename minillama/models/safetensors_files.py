"""The safetensors shards of a Hugging Face folder, checked before a byte of weights is read.

Every header is parsed and checked the way the safetensors library would (a JSON object of
``{dtype, shape, data_offsets}`` entries tiling the data exactly), so a corrupt or cut file ends in
one ``ModelLoadError`` line instead of ``KeyError: 'data_offsets'`` or ``SafetensorError`` later.
Shards are only read from inside the model folder: an index entry or a symlink that leads
elsewhere is refused (the Hugging Face cache's ``snapshots/REV -> ../../blobs`` links stay allowed).
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

from minillama.models.errors import ModelLoadError

INDEX = "model.safetensors.index.json"
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
             "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_MAX_HEADER = 100 << 20  # the safetensors library's own limit


@dataclass
class Shards:
    """The checked shard files of a folder and what they hold."""

    files: list[str]
    num_tensors: int
    num_elements: int


def model_root(folder: str) -> str:
    """The real folder shards must resolve into: the folder itself, or for a Hugging Face cache
    snapshot (``models--org--name/snapshots/REV``) the model's cache entry, which holds ``blobs/``."""
    real = os.path.realpath(folder)
    parent = os.path.dirname(real)
    if os.path.basename(parent) == "snapshots" and os.path.isdir(os.path.join(os.path.dirname(parent), "blobs")):
        return os.path.dirname(parent)
    return real


def _inside(path: str, root: str) -> bool:
    real = os.path.realpath(path)
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def _bad_copy(path: str, detail: str) -> ModelLoadError:
    return ModelLoadError(f"safetensors file {path} is truncated or corrupt ({detail}): copy it again")


def _index_names(folder: str, index: str) -> list[str]:
    from minillama.models.errors import read_json

    data = read_json(index, "safetensors index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelLoadError(f"safetensors index {index} has no weight_map object: copy the model folder again")
    names = set()
    for tensor, name in weight_map.items():
        if not isinstance(name, str) or not name:
            raise ModelLoadError(f"safetensors index {index} maps {tensor!r} to {name!r}, not a file name: "
                                 "copy the model folder again")
        names.add(name)
    return sorted(names)


def find_shards(folder: str) -> Shards:
    """The checkpoint's shard files, each checked to be present, inside ``folder`` and complete."""
    index = os.path.join(folder, INDEX)
    if os.path.exists(index):
        names = _index_names(folder, index)
    else:
        names = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    if not names:
        raise ModelLoadError(f"no *.safetensors weights in {folder}: the model folder is incomplete, copy it again")
    root = model_root(folder)
    shards = Shards([], 0, 0)
    for name in names:
        path = os.path.join(folder, name)
        if not _inside(path, root):
            raise ModelLoadError(f"weight shard {name} resolves to {os.path.realpath(path)}, outside the model "
                                 f"folder {folder}: refusing to read it; keep every shard inside the folder")
        if not os.path.isfile(path):
            raise ModelLoadError(f"weight shard {path} listed in the index is missing: the model folder was only "
                                 "partly copied, copy it again")
        tensors, elements = check_safetensors_file(path)
        shards.files.append(path)
        shards.num_tensors += tensors
        shards.num_elements += elements
    return shards


def check_safetensors_file(path: str) -> tuple[int, int]:
    """Check the header and that the file is exactly as long as its tensors need.

    Returns (number of tensors, number of elements).
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _bad_copy(path, f"{size} bytes, no header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > _MAX_HEADER:
            raise _bad_copy(path, f"header of {n} bytes in a {size}-byte file")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _bad_copy(path, "header is not JSON") from None
    if not isinstance(header, dict):
        raise _bad_copy(path, f"header is a JSON {type(header).__name__}, not an object")
    spans, elements = [], 0
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict):
                raise _bad_copy(path, "__metadata__ is not an object")
            continue
        numel, span = _check_entry(path, name, entry)
        elements += numel
        spans.append(span)
    end = 0
    for begin, stop in sorted(spans):  # the tensors must tile the data exactly, as safetensors requires
        if begin != end:
            raise _bad_copy(path, f"tensor data {'overlaps' if begin < end else 'has a gap'} at byte {begin}")
        end = stop
    if 8 + n + end != size:
        raise _bad_copy(path, f"needs {8 + n + end} bytes, has {size}")
    return len(spans), elements


def _check_entry(path: str, name: str, entry: object) -> tuple[int, tuple[int, int]]:
    if not isinstance(entry, dict):
        raise _bad_copy(path, f"entry {name!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in _ITEMSIZE:
        raise _bad_copy(path, f"tensor {name!r} has dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise _bad_copy(path, f"tensor {name!r} has shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise _bad_copy(path, f"tensor {name!r} has data_offsets {offsets!r}")
    numel = math.prod(shape)
    if numel * _ITEMSIZE[dtype] != offsets[1] - offsets[0]:
        raise _bad_copy(path, f"tensor {name!r} of shape {shape} {dtype} spans {offsets[1] - offsets[0]} bytes")
    return numel, (offsets[0], offsets[1])
