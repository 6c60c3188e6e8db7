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
    position 0, in increasing order, with an online softmax; within a tile the reductions are
    fixed-order (``tree_sum``); keys past p count as exact zeros and a tile with none of the
    row's keys leaves its running values untouched (so extra tiles for longer neighbours or
    graph padding change nothing).

Costs more than the backends' kernels: every (row, key) product is materialised per tile.
"""

from __future__ import annotations

import torch

from minillama.context import Context
from minillama.layers.batch_invariant import tree_sum

#: Keys per tile (a fixed schedule: changing it changes results, never their invariance).
KEY_TILE = 16


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
    there is one. Returns (tokens, heads, D) in q's dtype (see the module docstring)."""
    n, h, d = q.shape
    hk = k.shape[1]
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
    qf = q.float().view(n, 1, hk, h // hk, d)
    m = torch.full((n, hk, h // hk), float("-inf"), device=q.device)
    l_sum = torch.zeros_like(m)
    acc = torch.zeros(n, hk, h // hk, d, device=q.device)
    offsets = torch.arange(KEY_TILE, device=q.device)
    for start in range(0, max(max_keys, 1), KEY_TILE):
        j = start + offsets  # absolute key positions of this tile
        valid = j[None, :] <= pos[:, None]  # (N, T)
        if paged:
            block = tables.gather(1, (j // bs).clamp(max=width - 1).expand(n, -1))
            slots = block * bs + j % bs
        else:
            slots = first[:, None] + j[None, :]
        slots = torch.where(valid, slots, 0)
        kt = rows_k[slots].float()  # (N, T, Hk, D)
        vt = torch.where(valid[..., None, None], rows_v[slots].float(), 0.0)
        s = tree_sum(qf * kt[:, :, :, None, :], -1) * scale  # (N, T, Hk, G)
        s = torch.where(valid[..., None, None], s, float("-inf"))
        m_new = torch.maximum(m, s.amax(1))
        m_use = torch.where(m_new == float("-inf"), 0.0, m_new)
        alpha = torch.exp(m - m_use)
        p = torch.exp(s - m_use[:, None])
        seen = valid.any(1)[:, None, None]  # a tile without this row's keys changes nothing
        l_sum = torch.where(seen, l_sum * alpha + tree_sum(p, 1), l_sum)
        pv = tree_sum(p[..., None] * vt[:, :, :, None, :], 1)  # (N, Hk, G, D)
        acc = torch.where(seen[..., None], acc * alpha[..., None] + pv, acc)
        m = torch.where(seen, m_new, m)
    out = torch.where(l_sum[..., None] > 0, acc / l_sum[..., None], 0.0)
    return out.reshape(n, h, d).to(q.dtype)
