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

import torch

from minillama.context import Context
from minillama.layers.batch_invariant import fixed_bmm, tree_sum

#: Keys per tile, per device (a fixed schedule: changing it changes results, never their invariance).
KEY_TILE = {"cpu": 64, "cuda": 256}


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


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              ctx: Context, scale: float) -> torch.Tensor:
    """q (tokens, heads, D); k/v the step's new (tokens, kv_heads, D), already in the paged cache when
    there is one. Returns (tokens, heads, D) in q's dtype (see the module docstring).

    Per key tile, the products go through ``fixed_bmm``: one batched matmul item per (query row,
    kv head), in calls of a fixed number of items, so every row meets the same kernel shape.
    """
    n, h, d = q.shape
    hk = k.shape[1]
    g = h // hk
    seq, pos = _rows(q, ctx)
    paged = ctx.block_tables is not None
    if paged:
        bs = k_cache.shape[1]
        rows_k, rows_v = k_cache.reshape(-1, hk, d), v_cache.reshape(-1, hk, d)
        width = ctx.block_tables.shape[1]
        tables = ctx.block_tables.long()[seq]  # (N, width)
        max_keys = ctx.max_seqlen_k if ctx.max_seqlen_k > 0 else width * bs  # graphs: the whole table
    else:  # a prefill from position 0 with no cache reads: the keys are the step's own
        rows_k, rows_v = k, v
        first = ctx.cu_seqlens_k.long()[seq]  # (N,) row of each request's key 0
        max_keys = ctx.max_seqlen_k
    half = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)  # matrix units, float32 sums
    qi = (q if half else q.float()).reshape(n * hk, g, d)  # item (row, kv head): its g query heads
    m = torch.full((n * hk, g), float("-inf"), device=q.device)
    l_sum = torch.zeros_like(m)
    acc = torch.zeros(n * hk, g, d, device=q.device)
    tile = KEY_TILE.get(q.device.type, KEY_TILE["cpu"])
    offsets = torch.arange(tile, device=q.device)
    for start in range(0, max(max_keys, 1), tile):
        j = start + offsets  # absolute key positions of this tile
        valid = j[None, :] <= pos[:, None]  # (N, T)
        if paged:
            block = tables.gather(1, (j // bs).clamp(max=width - 1).expand(n, -1))
            slots = block * bs + j % bs
        else:
            slots = first[:, None] + j[None, :]
        slots = torch.where(valid, slots, 0)
        mask = valid[:, None, None, :].expand(n, hk, 1, tile).reshape(n * hk, 1, tile)
        kt = rows_k[slots].permute(0, 2, 3, 1).reshape(n * hk, d, tile)  # (items, D, T)
        vt = torch.where(valid[..., None, None], rows_v[slots], 0).transpose(1, 2).reshape(n * hk, tile, d)
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
