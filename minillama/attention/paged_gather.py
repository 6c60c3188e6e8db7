"""Where the torch backend finds each tile's queries and keys: row indices, masks and gathers.

Queries and keys are numbered back from each sequence's end: query ``r`` is a sequence's r-th
last query and key ``u`` its u-th last key. Every sequence's queries are the last of its keys
(flash-attn's bottom-right causal alignment), so in these numbers query ``r`` sees key ``u``
exactly when ``u >= r``, for every sequence whatever its lengths. That lets the key loop skip the
tiles that no query of a tile can see without reading a single length (which on a GPU would
wait for it), and makes the causal mask of a tile the same for the whole batch.

A key tile is, for every sequence, the keys ``u`` in ``[start, stop)``: an index of rows in the
flat keys (or the flattened paged cache) and a bias of 0 for real keys, -inf past the sequence's
first key. Those padding slots re-read the sequence's first key, so every gathered value is
finite (a probability of exactly 0 then adds exactly 0) and the repeated reads hit in cache.
Indices are built on the device from the length tensors, and each is built once per forward
pass (``reuse_key_indices``): all layers of a step pass the same metadata tensors.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch

# ---------------------------------------------------------------------------------------------
# One index per forward pass: every layer of a step passes the same metadata tensors.
# ---------------------------------------------------------------------------------------------

_local = threading.local()  # .indices: the memo of the innermost ``reuse_key_indices`` block of this thread
_PLAIN = frozenset((int, float, bool, str, type(None), torch.dtype, torch.device))


@contextlib.contextmanager
def reuse_key_indices() -> Iterator[None]:
    """Inside this block, calls given the same metadata tensors share their indices.

    The model runner wraps each forward pass in it, so only the first layer builds the indices (a
    dozen small kernels per tile). Outside the block every call builds its own, so a caller that
    edits a block table in place between two calls is always safe. The memo belongs to the
    thread that opened the block.
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
    key = (build, *[a if type(a) in _PLAIN else id(a) for a in args])
    hit = memo.get(key)
    if hit is None:
        # The arguments are kept with the result so their ids cannot be reused by new objects.
        hit = memo[key] = (args, build(*args))
    return hit[1]


# ---------------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------------


class KeyIndex(NamedTuple):
    """Where every sequence's keys are: ``lens`` keys, at ``starts`` (flat) or through ``table`` (paged)."""

    lens: torch.Tensor  # (batch,) long
    starts: torch.Tensor | None  # (batch,) long row of each sequence's first key; None when paged
    table: torch.Tensor | None  # (batch, max_blocks) long block table; None when flat
    page: int  # keys per cache block (1 when flat)
    num_rows: int  # rows of the flat keys / flattened cache


def varlen_keys(cu_seqlens_k: torch.Tensor, block_table: torch.Tensor | None, page: int, num_rows: int) -> KeyIndex:
    """The keys of a ``flash_attn_varlen_func`` call."""
    cu = cu_seqlens_k.long()
    lens = cu[1:] - cu[:-1]
    if block_table is not None:
        return KeyIndex(lens, None, block_table.long(), page, num_rows)
    return KeyIndex(lens, cu[:-1], None, 1, num_rows)


def kvcache_keys(cache_seqlens: int | torch.Tensor | None, seqlen_new: int, batch: int,
                 block_table: torch.Tensor | None, page: int, max_keys: int, num_rows: int,
                 device: torch.device) -> KeyIndex:
    """The keys of a ``flash_attn_with_kvcache`` call: cached plus appended, paged or one cache row each.

    ``cache_seqlens`` None means every sequence fills its ``max_keys`` slots.
    """
    if isinstance(cache_seqlens, torch.Tensor):
        lens = cache_seqlens.long() + seqlen_new
    else:
        full = max_keys if cache_seqlens is None else cache_seqlens + seqlen_new
        lens = torch.full((batch,), full, dtype=torch.long, device=device)
    if block_table is not None:
        return KeyIndex(lens, None, block_table.long(), page, num_rows)
    starts = torch.arange(batch, device=device) * max_keys  # sequence b owns cache row b
    return KeyIndex(lens, starts, None, 1, num_rows)


def key_tile(keys: KeyIndex, start: int, stop: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``(batch, stop - start)`` of keys ``u = start .. stop-1`` (counted back from each end), and their bias.

    The bias (``dtype``) is 0 for a real key and -inf where the sequence has fewer keys.
    """
    u = torch.arange(start, stop, device=keys.lens.device)
    pos = (keys.lens[:, None] - 1) - u  # position of the u-th last key from the sequence's start
    real = pos >= 0
    pos = pos.clamp_(min=0)  # past the first key: read the first key again (finite, masked)
    if keys.table is not None:
        # Table entries past a sequence's last block may be garbage (-1, stale ids): only
        # positions below its length look into them, and those entries are real.
        col = (pos // keys.page).clamp_(max=max(keys.table.shape[1] - 1, 0))
        rows = keys.table.gather(1, col).clamp_(min=0) * keys.page + pos % keys.page
    else:
        rows = keys.starts[:, None] + pos
    bias = torch.zeros(real.shape, dtype=dtype, device=real.device).masked_fill_(~real, float("-inf"))
    return rows.clamp_(0, max(keys.num_rows - 1, 0)), bias


# ---------------------------------------------------------------------------------------------
# Queries of flash_attn_varlen_func
# ---------------------------------------------------------------------------------------------


def query_tile(cu_seqlens_q: torch.Tensor, start: int, size: int, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of queries ``r = start .. start+size-1`` counted back from each end, in forward order.

    Returns ``(gather, scatter)``, both ``(batch, size)`` long: ``gather`` is in range for
    reading, ``scatter`` sends rows a sequence does not have to the spare row ``num_rows``.
    """
    cu = cu_seqlens_q.long()
    rows = (cu[1:] - (start + size))[:, None] + torch.arange(size, device=cu.device)
    real = rows >= cu[:-1, None]
    return rows.clamp(0, max(num_rows - 1, 0)), torch.where(real, rows, num_rows)


# ---------------------------------------------------------------------------------------------
# Gathers
# ---------------------------------------------------------------------------------------------


def head_rows(idx: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Rows ``idx`` ``(batch, length)`` of keys ``(n, Hk, D)`` as rows of the keys viewed ``(n * Hk, D)``,
    head-major ``(Hk, batch, length)``: gathered in that order they are already bmm's layout (CPU)."""
    return idx[None] * kv_heads + torch.arange(kv_heads, device=idx.device)[:, None, None]


def heads_flat(rows: torch.Tensor) -> bool:
    """Whether ``rows`` ``(n, Hk, D)`` can be viewed as ``(n * Hk, D)`` (one row per head) without a copy."""
    n, kv_heads, head_dim = rows.shape
    return rows.stride(-1) == 1 and rows.stride(-2) == head_dim and (n <= 1 or rows.stride(0) == kv_heads * head_dim)


def gather_heads(rows: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``rows[idx]`` for ``rows`` ``(n, Hk, D)``, as ``(Hk * batch, length, D)``.

    That is the layout ``torch.bmm`` wants for grouped-query attention (one matrix per kv head and
    sequence). ``idx`` is ``(batch, length)`` rows, or on CPU ``head_rows`` of them ``(Hk, batch,
    length)``: there one ``index_select`` of whole head rows (several times faster than the
    element-wise gather) lands them in that layout; on CUDA the gather itself produces it.
    """
    (n, kv_heads, head_dim), length = rows.shape, idx.shape[-1]
    batch = idx.shape[-2]
    if n == 0:
        return rows.new_zeros(kv_heads * batch, length, head_dim)
    if idx.dim() == 3:
        return rows.view(n * kv_heads, head_dim).index_select(0, idx.view(-1)).view(kv_heads * batch, length, head_dim)
    if rows.is_cuda:
        # The index kernel pays per element, so move 8-byte words instead of 2-byte bf16 values
        # where the layout allows: the same bytes, a quarter of the work.
        words = _as_words(rows)
        out = words.transpose(0, 1)[:, idx]
        return (out if words is rows else out.view(rows.dtype)).reshape(kv_heads * batch, length, head_dim)
    slots = rows.index_select(0, idx.view(-1)).view(batch, length, kv_heads, head_dim)
    return slots.permute(2, 0, 1, 3).reshape(kv_heads * batch, length, head_dim)


def _as_words(x: torch.Tensor) -> torch.Tensor:
    """``x`` reinterpreted with its last dim as int64 words, or ``x`` itself when the layout does not allow it."""
    if x.element_size() >= 8 or (x.shape[-1] * x.element_size()) % 8:
        return x
    try:
        return x.view(torch.int64)
    except RuntimeError:  # strides or offset not in whole words
        return x
