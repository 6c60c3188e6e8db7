"""Attention whose every query row is computed by one fixed sequence of operations: batch-invariant.

Used in batch-invariant mode for attention backends that do not promise the guarantee themselves
(``AttentionBackend.batch_invariant``). The contract (what a backend must do to set that flag):

    The output row of a query at token position p of a request is a function of that query row,
    the request's keys and values at positions 0..p, and the scale only, computed by the same
    floating-point operations in the same order whatever else is in the call: the number and
    lengths of the other requests, the row's index, the chunk it belongs to (prefill, chunked
    prefill, a recompute after preemption, or a decode step: ``varlen`` and ``with_kvcache``
    must agree bit for bit), where the keys are read from (new flat k/v or the paged cache),
    the block size and block table, ``max_seqlen_*``, padding rows of a CUDA graph, and the
    number of splits. Here: keys are walked in tiles of ``KEY_TILE`` positions aligned to
    position 0, in increasing order, with an online softmax; within a tile the dot products and
    the weighted sum of values are matmuls of one fixed shape (``fixed_bmm``) and the sum of
    weights is fixed-order (``tree_sum``); keys past p count as exact zeros, and a tile with none
    of the row's keys leaves its running values untouched (so extra tiles for longer neighbours or
    graph padding change nothing).

Costs more than the backends' kernels: each query row gathers its own copy of every key tile.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minillama.context import Context
from minillama.layers.batch_invariant import fixed_bmm, tree_sum

#: Keys per tile, per device (a fixed schedule: changing it changes results, never their invariance).
KEY_TILE = {"cpu": 64, "cuda": 256}
#: Query rows per pass (bounds the gathered keys' memory; rows are independent, so results do not change).
ROW_CHUNK = {"cpu": 4096, "cuda": 1024}


def _rows(q: torch.Tensor, ctx: Context) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query row's request index in the batch and token position (both (N,) int64)."""
    n = q.shape[0]
    if not ctx.is_prefill:  # one query per request, the last of its context_lens keys
        return torch.arange(n, device=q.device), ctx.context_lens.long() - 1
    cu_q, cu_k = ctx.cu_seqlens_q.long(), ctx.cu_seqlens_k.long()
    t = torch.arange(n, device=q.device)
    seq = torch.searchsorted(cu_q[1:], t, right=True)
    start = (cu_k[1:] - cu_k[:-1]) - (cu_q[1:] - cu_q[:-1])  # keys before each request's new tokens
    return seq, start[seq] + (t - cu_q[seq])


@dataclass
class _Keys:
    """Where each query row's keys are: through its request's block table, or in the step's flat k/v."""

    rows_k: torch.Tensor  # (slots, Hk, D)
    rows_v: torch.Tensor
    tables: torch.Tensor | None  # (N, width) each row's request's block table (paged)
    first: torch.Tensor | None  # (N,) each row's request's key 0 in the flat k/v
    block_size: int
    max_keys: int

    def slots(self, rows: slice, j: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(R, T) slot of key position ``j`` for each row of ``rows`` (0 where not ``valid``)."""
        if self.tables is not None:
            t = self.tables[rows]
            block = t.gather(1, (j // self.block_size).clamp(max=t.shape[1] - 1).expand(t.shape[0], -1))
            slots = block * self.block_size + j % self.block_size
        else:
            slots = self.first[rows, None] + j[None, :]
        return torch.where(valid, slots, 0)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              ctx: Context, scale: float) -> torch.Tensor:
    """q (tokens, heads, D); k/v the step's new (tokens, kv_heads, D), already in the paged cache when
    there is one. Returns (tokens, heads, D) in q's dtype (see the module docstring). Rows go in
    chunks of ``ROW_CHUNK`` (rows are independent: this only bounds the memory of the gathered keys)."""
    n, _h, d = q.shape
    hk = k.shape[1]
    seq, pos = _rows(q, ctx)
    if ctx.block_tables is not None:
        bs, width = k_cache.shape[1], ctx.block_tables.shape[1]
        keys = _Keys(k_cache.reshape(-1, hk, d), v_cache.reshape(-1, hk, d), ctx.block_tables.long()[seq], None, bs,
                     ctx.max_seqlen_k if ctx.max_seqlen_k > 0 else width * bs)  # graphs: the whole table
    else:  # a prefill from position 0 with no cache reads: the keys are the step's own
        keys = _Keys(k, v, None, ctx.cu_seqlens_k.long()[seq], 1, ctx.max_seqlen_k)
    chunk = ROW_CHUNK.get(q.device.type, ROW_CHUNK["cpu"])
    if n <= chunk:
        return _attend(q, pos, slice(0, n), keys, scale)
    return torch.cat([_attend(q[i:i + chunk], pos[i:i + chunk], slice(i, i + chunk), keys, scale)
                      for i in range(0, n, chunk)])


def _attend(q: torch.Tensor, pos: torch.Tensor, rows: slice, keys: _Keys, scale: float) -> torch.Tensor:
    """Per key tile, the products go through ``fixed_bmm``: one batched-matmul item per (query row,
    kv head), so every row meets the same kernel shape."""
    n, h, d = q.shape
    hk = keys.rows_k.shape[1]
    g = h // hk
    half = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)  # matrix units, float32 sums
    qi = (q if half else q.float()).reshape(n * hk, g, d)  # item (row, kv head): its g query heads
    m = torch.full((n * hk, g), float("-inf"), device=q.device)
    l_sum = torch.zeros_like(m)
    acc = torch.zeros(n * hk, g, d, device=q.device)
    tile = KEY_TILE.get(q.device.type, KEY_TILE["cpu"])
    offsets = torch.arange(tile, device=q.device)
    for start in range(0, max(keys.max_keys, 1), tile):
        j = start + offsets  # absolute key positions of this tile
        valid = j[None, :] <= pos[:, None]  # (N, T)
        slots = keys.slots(rows, j, valid)
        mask = valid[:, None, None, :].expand(n, hk, 1, tile).reshape(n * hk, 1, tile)
        kt = keys.rows_k[slots].permute(0, 2, 3, 1).reshape(n * hk, d, tile)  # (items, D, T)
        vt = torch.where(valid[..., None, None], keys.rows_v[slots], 0).transpose(1, 2).reshape(n * hk, tile, d)
        if not half:
            kt, vt = kt.float(), vt.float()
        s = fixed_bmm(qi, kt, torch.float32) * scale  # (items, G, T)
        s = torch.where(mask, s, float("-inf"))
        m_new = torch.maximum(m, s.amax(-1))
        m_use = torch.where(m_new == float("-inf"), 0.0, m_new)
        alpha = torch.exp(m - m_use)
        p = torch.exp(s - m_use[..., None])
        seen = mask.any(-1)  # (items, 1): a tile without this row's keys changes nothing
        l_sum = torch.where(seen, l_sum * alpha + tree_sum(p, -1), l_sum)
        pv = fixed_bmm(p.to(vt.dtype), vt, torch.float32)  # (items, G, D); half: p rounded as flash-attn does
        acc = torch.where(seen[..., None], acc * alpha[..., None] + pv, acc)
        m = torch.where(seen, m_new, m)
    out = torch.where(l_sum[..., None] > 0, acc / l_sum[..., None], 0.0)
    return out.reshape(n, h, d).to(q.dtype)
