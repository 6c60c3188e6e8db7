"""``TraceReader``'s tensor access: a step's saved tensors, read on demand and never unpickled.

Format 2 keeps each step's tensors as one safetensors blob inside ``data.bin`` (read through a
memory map); format 1 as ``tensors/step_NNNNNN.safetensors``. A mixin: ``TraceReader`` holds the
state and provides ``step``.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Collection, Sequence
from typing import Any

import numpy as np
import torch

from minillama.trace.format import DATA, EVENTS, TraceError
from minillama.trace.reader_open import clip, inside, step_heads
from minillama.trace.safetensors_blob import Blob


class StepTensors:
    """The tensor methods of ``TraceReader``."""

    # set by TraceReader.__init__ (which also provides step())
    path: str
    version: int
    _data: mmap.mmap | None
    _offsets: list[int]

    def _blob(self, i: int, names: Collection[str] | None = None, span: object = ...) -> Blob | None:
        """Step ``i``'s blob (only ``names`` checked, if given); ``span``: its ``data`` if already known."""
        if span is ...:
            span = self.step(i).get("data")
        if span is None:
            return None
        if not (isinstance(span, list) and len(span) == 2):
            raise TraceError(f"step {i} names its data as {clip(repr(span), 40)}: the trace is damaged; record "
                             "it again")
        if self._data is None:
            path = inside(self.path, DATA)
            if not os.path.isfile(path) or os.path.getsize(path) == 0:
                raise TraceError(f"{self.path} has no {DATA} but its steps name data in it: the trace is incomplete; "
                                 "copy it again or record it again")
            with open(path, "rb") as f:
                self._data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return Blob(self._data, span[0], span[1], f"step {i} of {self.path}", names)

    def step_heads(self, indices: list[int]) -> list[dict[str, Any]]:
        """``{"step", "data"}`` of steps ``indices``, without parsing their whole events (format 2)."""
        return step_heads(inside(self.path, EVENTS), [self._offsets[i] for i in indices])

    def step_arrays(self, i: int, names: Sequence[str], span: object = ...) -> list[np.ndarray | None]:
        """Tensors ``names`` of step ``i`` as read-only numpy views of data.bin (None: not saved), only
        those checked; ``span``: the step's ``data`` (``step_heads``), if known. Format 2."""
        blob = self._blob(i, names, span)
        return [None] * len(names) if blob is None else [blob.array(name) for name in names]

    def tensor_file(self, i: int) -> str | None:
        """Format 1: absolute path of step ``i``'s safetensors file, or None if that step saved no tensors."""
        rel = self.step(i).get("tensor_file")
        if not rel:
            return None
        if os.path.isabs(rel) or ".." in rel.replace("\\", "/").split("/"):
            raise TraceError(f"step {i} names the tensor file {clip(rel, 60)} outside the trace folder: "
                             "the trace is damaged or foreign; record it again")
        return inside(self.path, rel)

    def tensor_keys(self, i: int) -> list[str]:
        """Names of the tensors saved at step ``i`` (sites, ``site@shadow``, ``batch.*``, tables)."""
        if self.version >= 2:
            blob = self._blob(i)
            return blob.keys() if blob is not None else []
        path = self.tensor_file(i)
        if path is None:
            return []
        with self._open_tensors(i, path) as f:
            return list(f.keys())

    def tensor(self, i: int, site: str) -> torch.Tensor | None:
        """The full tensor saved for ``site`` at step ``i`` (CPU), or None if only stats were recorded."""
        if self.version >= 2:
            blob = self._blob(i)
            return blob.get(site) if blob is not None else None
        path = self.tensor_file(i)
        if path is None:
            return None
        with self._open_tensors(i, path) as f:
            if site not in f.keys():
                return None
            try:
                return f.get_tensor(site)
            except Exception as e:  # safetensors raises its own error types
                raise TraceError(f"tensor {site!r} of step {i} in {path} cannot be read ({clip(e)}): the file is "
                                 "damaged; record the trace again") from None

    def _open_tensors(self, i: int, path: str):
        from safetensors import safe_open

        if not os.path.isfile(path):
            raise TraceError(f"step {i}'s tensor file {path} is missing: the trace is incomplete; copy it again or "
                             "record it again")
        try:
            return safe_open(path, framework="pt", device="cpu")
        except Exception as e:  # SafetensorError, OSError, ...
            raise TraceError(f"step {i}'s tensor file {path} is not a valid safetensors file ({clip(e, 80)}): "
                             "it is damaged or foreign; record the trace again") from None
