"""How the torch backend finds each sequence's keys: index tensors into flat or paged K/V, and gathers.

Ragged keys become padded tensors through an index of rows: position ``j`` of sequence ``b``
reads row ``idx[b, j]`` of the flat keys or of the flattened paged cache. Positions past a
sequence's end read that sequence's own first key (finite, and masked later). Every index is
built on the device from the length tensors, never read back to the host.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch

# ---------------------------------------------------------------------------------------------
# One key index per forward pass: every layer of a step passes the same metadata tensors.
# ---------------------------------------------------------------------------------------------

_local = threading.local()  # .indices: the memo of the innermost ``reuse_key_indices`` block of this thread


@contextlib.contextmanager
def reuse_key_indices() -> Iterator[None]:
    """Inside this block, calls given the same ``block_table`` / length tensors share one key index.

    The model runner wraps each forward pass in it: all layers of a step read the same metadata
    tensors, unchanged, so only the first layer builds the index (a dozen small kernels). Outside
    the block every call builds its own, so a caller that edits a block table in place between
    two calls is always safe. The memo belongs to the thread that opened the block.
    """
    outer = getattr(_local, "indices", None)
    _local.indices = {}
    try:
        yield
    finally:
        _local.indices = outer


def shared(build: Callable, *args: object):
    """``build(*args)``, or its result from an earlier call with the same arguments in this block."""
    memo = getattr(_local, "indices", None)
    if memo is None:
        return build(*args)
    key = (build, *(id(a) if isinstance(a, torch.Tensor) else a for a in args))
    hit = memo.get(key)
    if hit is None:
        # The arguments are kept with the result so their ids cannot be reused by new tensors.
        hit = memo[key] = (args, build(*args))
    return hit[1]


# ---------------------------------------------------------------------------------------------
# Gathers: flat or paged keys -> padded, kv-head-major (Hk, batch, seqlen, headdim) tensors.
# ---------------------------------------------------------------------------------------------


def gather_rows(x: torch.Tensor, starts: torch.Tensor, length: int) -> torch.Tensor:
    """Padded ``(batch, length, ...)`` view of flat ``x``: row ``i`` of sequence ``b`` is ``x[starts[b] + i]``.

    Rows past a sequence's end read some other (clamped) row of ``x``; callers mask them.
    """
    batch = starts.shape[0]
    if x.shape[0] == 0 or length == 0:
        return x.new_zeros(batch, length, *x.shape[1:])
    idx = starts[:, None] + torch.arange(length, device=x.device)  # (batch, length)
    return x[idx.clamp(0, x.shape[0] - 1)]


def key_positions(lens: torch.Tensor, length: int) -> torch.Tensor:
    """``(batch, length)`` key positions ``0 .. length-1``, where positions at or past a sequence's
    length are replaced by 0.

    Padding slots thus re-read the sequence's own first key instead of whatever sits past its end
    (stale keys of another sequence, or NaN in a cache from ``torch.empty``). That keeps every
    gathered value finite without a separate zeroing pass, so a masked probability of exactly 0
    contributes exactly 0 to ``probs @ v``. On a GPU the repeated reads also hit in cache.
    """
    pos = torch.arange(length, device=lens.device)[None, :]
    return torch.where(pos < lens[:, None], pos, 0)


def gather_heads(rows: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``rows[idx]`` for ``rows`` ``(n, Hk, D)`` and in-range ``idx`` ``(batch, length)``, laid out ``(Hk, batch, length, D)``.

    That is the layout ``torch.bmm`` wants for grouped-query attention (one matrix per kv head and
    sequence, batch dims foldable without a copy), produced by the gather itself.
    """
    if rows.shape[0] == 0:
        return rows.new_zeros(rows.shape[1], *idx.shape, rows.shape[2])
    # The index kernel pays per element, so move 8-byte words instead of 2-byte bf16 values
    # where the layout allows: the same bytes, a quarter of the work (a 4x faster decode gather).
    words = _as_words(rows)
    out = words.transpose(0, 1)[:, idx]
    return out if words is rows else out.view(rows.dtype)


def _as_words(x: torch.Tensor) -> torch.Tensor:
    """``x`` reinterpreted with its last dim as int64 words, or ``x`` itself when the layout does not allow it."""
    if x.element_size() >= 8 or (x.shape[-1] * x.element_size()) % 8:
        return x
    try:
        return x.view(torch.int64)
    except RuntimeError:  # strides or offset not in whole words
        return x


def gather_slots(rows: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``rows[idx]`` for ``rows`` ``(n, Hk, D)`` and in-range ``idx`` ``(batch, length)``: ``(batch, length, Hk, D)``.

    Whole rows (all heads of one slot) are copied, which on CPU is several times faster than the
    element-wise gather of ``gather_heads``; SDPA takes the head-major view without a copy.
    """
    if rows.shape[0] == 0:
        return rows.new_zeros(*idx.shape, *rows.shape[1:])
    return rows.index_select(0, idx.reshape(-1)).view(*idx.shape, *rows.shape[1:])


def flat_key_index(starts: torch.Tensor, lens: torch.Tensor, length: int) -> torch.Tensor:
    """Row of each (sequence, key position) in flat ``(total_k, Hk, D)`` keys."""
    return starts[:, None] + key_positions(lens, length)


def paged_key_index(block_table: torch.Tensor, block_size: int, lens: torch.Tensor, length: int) -> torch.Tensor:
    """Slot (``block * block_size + offset``) of each (sequence, key position) in a paged cache.

    Table entries past a sequence's last used block may be garbage (-1, stale ids); they are never
    read, because positions past the sequence's keys were mapped to its first key.
    """
    pos = key_positions(lens, length)
    col = (pos // block_size).clamp(max=max(block_table.shape[1] - 1, 0))
    blocks = block_table.long().gather(1, col) if block_table.shape[1] else torch.zeros_like(pos)
    return blocks.clamp(min=0) * block_size + pos % block_size


def varlen_key_index(cu_seqlens_k: torch.Tensor, block_table: torch.Tensor | None, block_size: int,
                     max_seqlen_k: int, num_rows: int) -> torch.Tensor:
    """``(batch, max_seqlen_k)`` row of each key of ``flash_attn_varlen_func``, in ``[0, num_rows)``."""
    cu_k = cu_seqlens_k.long()
    k_lens = cu_k[1:] - cu_k[:-1]
    if block_table is not None:
        idx = paged_key_index(block_table, block_size, k_lens, max_seqlen_k)
    else:
        idx = flat_key_index(cu_k[:-1], k_lens, max_seqlen_k)
    return idx.clamp(0, max(num_rows - 1, 0))


def cached_lens(cache_seqlens: int | torch.Tensor | None, batch: int, max_keys: int,
                device: torch.device) -> torch.Tensor:
    """``cache_seqlens`` of ``flash_attn_with_kvcache`` as a long ``(batch,)`` tensor (None: the whole cache)."""
    if isinstance(cache_seqlens, torch.Tensor):
        return cache_seqlens.long()
    return torch.full((batch,), max_keys if cache_seqlens is None else cache_seqlens, dtype=torch.long, device=device)


class CacheKeys(NamedTuple):
    """Which cached keys each sequence of a ``flash_attn_with_kvcache`` call sees, and where they are."""

    seen: torch.Tensor  # (batch,) keys per sequence
    idx: torch.Tensor  # (batch, max_keys) row of each key in the flattened cache, in range
    valid: torch.Tensor  # (batch, max_keys) bool, key slot is real


def kvcache_key_index(cache_seqlens: int | torch.Tensor | None, seqlen_new: int, batch: int,
                      block_table: torch.Tensor | None, block_size: int, max_keys: int, num_rows: int,
                      device: torch.device) -> CacheKeys:
    seen = cached_lens(cache_seqlens, batch, max_keys, device) + seqlen_new
    if block_table is not None:
        idx = paged_key_index(block_table, block_size, seen, max_keys)
    else:  # one cache row of max_keys slots per sequence
        idx = torch.arange(batch, device=device)[:, None] * max_keys + key_positions(seen, max_keys)
    valid = torch.arange(max_keys, device=device)[None, :] < seen[:, None]
    return CacheKeys(seen, idx.clamp(0, max(num_rows - 1, 0)), valid)
