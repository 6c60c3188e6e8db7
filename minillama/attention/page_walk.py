"""Decode over a paged cache, one whole page per step of the online softmax (the torch backend on CUDA).

A decode query (one per sequence) sees all of its sequence's keys, and a paged cache already
holds them in tiles: its pages. So the loop of ``flash_loop.online_softmax`` visits page column
``j`` of the block table for every sequence at once, and gathers its keys with one
``index_select`` of whole pages (a memory copy at full bandwidth; per-token gathers run at a
fraction of it, ``benchmarks/attn_gpu_variants.py``).

A gathered page is ``(batch, page, Hk, D)``; viewed ``(batch, page, Hk*D)`` it is one matrix per
sequence, with every kv head's keys side by side. To score all query heads against it in one
``bmm`` without reordering the page, the queries are laid out block-diagonally: query head ``h``
is a row of ``Hk*D`` numbers that are zero except in its kv head's ``D`` columns, so that row
times a key row is exactly ``q_h · k_{kv(h)}``. ``P @ V`` is computed the same way and keeps,
for each head, its own kv head's ``D`` columns at the end. That is Hk times the multiply-adds of
grouped attention, which a decode (one query row per head) can afford: it waits on memory, and
this reads each key once, in place order.
"""

from __future__ import annotations

import torch

from minillama.attention.flash_loop import KeyTile, half_on_cuda, online_softmax
from minillama.attention.paged_gather import KeyIndex, shared

#: Whether a single-query paged call walks whole pages, by device. CPU keeps the key tiles of
#: ``flash_loop`` (its matmuls are not free, and Hk times their work is measurable there).
PAGE_WALK = {"cuda": True, "cpu": False}


def page_tiles(keys: KeyIndex, width: int) -> list[KeyTile]:
    """For each page column ``j < width``: every sequence's block id there, and which of its slots are unseen.

    Unseen: slots at or past a sequence's length, and whole columns past its last block, whose
    table entries may be padding or stale (clamped into the cache, read, never used). Such a slot
    may hold anything, NaN included, so it is masked, not weighted by 0: its score is set to
    -inf and its value to 0 (``_values``).
    """
    page, num_blocks = keys.page, max(1, keys.num_rows // keys.page)
    slots = torch.arange(page, device=keys.lens.device)
    out = []
    for j in range(width):
        blocks = keys.table[:, j].clamp(0, num_blocks - 1)
        unseen = (j * page + slots)[None, :] >= keys.lens[:, None]  # (B, page)
        out.append(KeyTile(blocks, unseen[:, None, :], None))
    return out


def block_diagonal(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Queries ``(B, H, D)`` as ``(B, H, Hk*D)``: head h's numbers in its kv head's columns, zeros elsewhere."""
    B, H, D = q.shape
    G = H // kv_heads
    out = q.new_zeros(B, kv_heads, G, kv_heads, D)
    out.diagonal(dim1=1, dim2=3).copy_(q.view(B, kv_heads, G, D).permute(0, 2, 3, 1))
    return out.view(B, H, kv_heads * D)


def decode_pages(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, keys: KeyIndex, scale: float,
                 need_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of one query per sequence, ``q`` ``(B, H, D)``, over its keys in the paged cache.

    ``k_cache``/``v_cache`` are ``(num_blocks, page, Hk, D)`` and ``keys`` comes from the block
    table. Returns out ``(B, H, D)`` float32 (0 for a sequence with no key) and, if asked, lse
    ``(B, H)`` (+inf there).
    """
    B, H, D = q.shape
    num_blocks, page, Hk, _ = k_cache.shape
    acc = torch.promote_types(q.dtype, torch.float32)
    qb = block_diagonal(q, Hk)
    tiles = shared(page_tiles, keys, keys.table.shape[1])
    k_pages, v_pages = k_cache.view(num_blocks, page, Hk * D), v_cache.view(num_blocks, page, Hk * D)
    p_dtype = v_cache.dtype if half_on_cuda(v_cache) else acc
    o, m, ell = online_softmax(qb, tiles, lambda t: k_pages.index_select(0, t.idx), lambda t: _values(v_pages, t),
                               (B, H), scale, p_dtype, pick=lambda pv: _own_columns(pv, Hk))
    out = o.div_(ell.clamp(min=1.0))  # O / l
    if not need_lse:
        return out, None
    return out, torch.where(ell > 0, m + torch.log(ell), float("inf")).view(B, H).float()


def _own_columns(pv: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Of ``P V`` ``(B, H, Hk*D)``, each head's own kv head's ``D`` columns (the block diagonal), ``(B, H, D)``."""
    B, H, width = pv.shape
    D = width // kv_heads
    return pv.view(B, kv_heads, H // kv_heads, kv_heads, D).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2).reshape(B, H, D)


def _values(v_pages: torch.Tensor, tile: KeyTile) -> torch.Tensor:
    """A tile's whole value pages ``(B, page, Hk*D)``, unseen slots zeroed (their P is 0, and 0 * NaN is not)."""
    return v_pages.index_select(0, tile.idx).masked_fill_(tile.bias.mT, 0)


def tile_bytes(batch: int, width: int, page: int, heads: int, kv_heads: int, head_dim: int, itemsize: int) -> int:
    """Memory a decode over ``width`` page columns may hold beside its inputs and output: the
    block-diagonal queries, one gathered page, one column's scores and probabilities and its full
    ``P V``, the accumulators, and every column's block ids and bias."""
    wide = kv_heads * head_dim
    queries = batch * heads * wide * itemsize
    page_tile = batch * page * wide * itemsize
    scores = batch * heads * page * (4 + itemsize)
    pv = batch * heads * wide * 4
    rows = batch * heads * (3 * head_dim * 4 + 16)
    return queries + page_tile + scores + pv + rows + width * batch * (page * 5 + 16)
