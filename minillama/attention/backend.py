"""The attention-backend interface (the registry that finds backends by name is ``registry.py``).

A backend is two functions with exactly the signatures of flash-attn 2.8's
``flash_attn_varlen_func`` (prefill: ragged batches of queries, keys flat or in a paged cache)
and ``flash_attn_with_kvcache`` (decode: fixed ``seqlen_q`` per sequence, optional in-place
append of the new keys/values), plus what the engine must know to use them: the paged-KV block
size granularity, a ``check`` of head size / dtype / device, whether its prefill pads queries,
and how large a decode batch it replays CUDA graphs for. The engine reads these attributes and
never a backend's name.

"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch


class BackendError(ValueError):
    """A backend cannot be used as asked. The message names the problem and the fix on one line."""


@dataclass(frozen=True)
class AttentionBackend:
    """One attention implementation with flash-attn's calling convention."""

    name: str
    varlen: Callable  # same signature as flash_attn.flash_attn_varlen_func
    with_kvcache: Callable  # same signature as flash_attn.flash_attn_with_kvcache
    block_size_multiple: int  # paged-KV block size must be a multiple of this
    # Entered by the model runner around each forward pass (all layers see the same step metadata).
    forward_scope: Callable[[], AbstractContextManager[None]] = contextlib.nullcontext
    # The prefill pads every sequence's queries to the batch's longest: an engine on a GPU then
    # runs the decodes of a batch that mixes them with prompt chunks as a pass of their own.
    pads_queries: bool = False
    # Decode graphs read block tables at full width. A backend whose decode work grows with that
    # width (not with the keys each sequence has) caps batch size x width keys here; None: no cap.
    graph_keys: int | None = None
    # True if, while the step context's ``batch_invariant`` is set, both functions meet the contract in
    # ``minillama/layers/invariant_attention.py`` (a row's output depends on its request's keys only, by
    # one fixed sequence of operations); otherwise batch-invariant mode uses that module's attention.
    batch_invariant: bool = False

    def graph_decode_max_batch(self, max_keys: int) -> int:
        """The largest decode batch to replay CUDA graphs for, when the graphs' block tables hold
        ``max_keys`` keys per sequence (at least 1)."""
        if self.graph_keys is None:
            return 1 << 30
        return max(1, self.graph_keys // max(1, max_keys))

    def check(self, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        """Raise ``BackendError`` if this backend cannot run heads of ``head_dim`` in ``dtype`` on ``device``.

        The base check only rejects what no attention can do; backends with narrower
        support (flash-attn) override it.
        """
        if head_dim <= 0:
            raise BackendError(f"attention backend '{self.name}': head_dim must be positive, got {head_dim}")
        if not dtype.is_floating_point:
            raise BackendError(
                f"attention backend '{self.name}' needs a floating-point dtype, got {dtype}: "
                "use --dtype float32 or bfloat16"
            )
