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
    number of splits.

Here: a request's query rows go in blocks of ``Q_BLOCK`` consecutive rows (a decode row alone in
its block, the rest padding), and keys are walked in tiles of ``KEY_TILE`` positions aligned to
position 0, in increasing order, with an online softmax. Per tile, a block's G query heads per kv
head meet the tile's keys in matmuls of one fixed shape (``fixed_bmm``: every row of every call has
the same kernel, and a matmul's rows do not depend on each other or on their place); the sum of
weights is fixed-order (``tree_sum``); keys past a row's position score -inf and weigh exactly 0,
and a tile with none of a row's keys leaves its running values untouched (so extra tiles for
longer neighbours or graph padding change nothing). One caveat: a key masked for a row but real
for a block-mate multiplies its weight 0 by a real value, so an output that is exactly zero can
come out +0 or -0; nothing downstream of the attention output sees the difference.
"""

from __future__ import annotations

import torch

from minillama.context import Context
from minillama.layers.batch_invariant import fixed_bmm, tree_sum

#: Keys per tile, per device (a fixed schedule: changing it changes results, never their invariance).
KEY_TILE = {"cpu": 64, "cuda": 256}
#: Query rows of one request per block (they share each key tile's gather).
Q_BLOCK = {"cpu": 16, "cuda": 16}
#: Blocks per pass (bounds the gathered keys' memory; blocks are independent, so results do not change).
BLOCK_CHUNK = {"cpu": 1024, "cuda": 256}


def _get(table: dict[str, int], device: torch.device) -> int:
    return table.get(device.type, table["cpu"])


def _blocks(q: torch.Tensor, ctx: Context, tq: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query blocks: ``rows`` (NB, tq) row of each slot (-1: padding), ``seq`` (NB,) their request,
    ``pos`` (NB, tq) token positions (-1: padding), ``inv`` (N,) each row's flat slot."""
    n, dev = q.shape[0], q.device
    if not ctx.is_prefill:  # one query per request, the last of its context_lens keys: no host values
        rows = torch.full((n, tq), -1, dtype=torch.long, device=dev)
        rows[:, 0] = torch.arange(n, device=dev)
        pos = torch.full((n, tq), -1, dtype=torch.long, device=dev)
        pos[:, 0] = ctx.context_lens.long() - 1
        return rows, torch.arange(n, device=dev), pos, torch.arange(n, device=dev) * tq
    lens = list(ctx.query_lens) or (ctx.cu_seqlens_q[1:] - ctx.cu_seqlens_q[:-1]).tolist()
    idx, seq, at = [], [], 0
    for b, m in enumerate(lens):
        for start in range(0, m, tq):
            idx += [at + start + i if start + i < m else -1 for i in range(tq)]
            seq.append(b)
        at += m
    rows = torch.tensor(idx, dtype=torch.long).view(-1, tq).to(dev)
    seq_t = torch.tensor(seq, dtype=torch.long).to(dev)
    cu_q, cu_k = ctx.cu_seqlens_q.long(), ctx.cu_seqlens_k.long()
    before = (cu_k[1:] - cu_k[:-1]) - (cu_q[1:] - cu_q[:-1])  # keys before each request's new tokens
    pos = torch.where(rows >= 0, before[seq_t][:, None] + rows - cu_q[seq_t][:, None], -1)
    inv = torch.empty(n, dtype=torch.long, device=dev)
    flat = rows.view(-1)
    real = flat >= 0
    inv[flat[real]] = torch.arange(flat.shape[0], device=dev)[real]
    return rows, seq_t, pos, inv


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              ctx: Context, scale: float) -> torch.Tensor:
    """q (tokens, heads, D); k/v the step's new (tokens, kv_heads, D), already in the paged cache when
    there is one. Returns (tokens, heads, D) in q's dtype (see the module docstring)."""
    n, h, d = q.shape
    hk = k.shape[1]
    tq = _get(Q_BLOCK, q.device)
    rows, seq, pos, inv = _blocks(q, ctx, tq)
    if ctx.block_tables is not None:
        bs = k_cache.shape[1]
        src = (k_cache.reshape(-1, hk, d), v_cache.reshape(-1, hk, d), ctx.block_tables.long()[seq], bs)
        max_keys = ctx.max_seqlen_k if ctx.max_seqlen_k > 0 else ctx.block_tables.shape[1] * bs  # graphs: all
    else:  # a prefill from position 0 with no cache reads: the keys are the step's own
        src = (k, v, ctx.cu_seqlens_k.long()[seq], 0)
        max_keys = ctx.max_seqlen_k
    qb = torch.where(rows[..., None, None] >= 0, q[rows.clamp(min=0)], 0)  # (NB, tq, H, D)
    chunk = _get(BLOCK_CHUNK, q.device)
    parts = [_attend(qb[i:i + chunk], pos[i:i + chunk], slice(i, i + chunk), src, max_keys, scale)
             for i in range(0, qb.shape[0], chunk)]
    out = torch.cat(parts) if len(parts) > 1 else parts[0]  # (NB, tq, H, D)
    return out.reshape(-1, h, d)[inv].to(q.dtype)


def _attend(qb: torch.Tensor, pos: torch.Tensor, blocks: slice, src: tuple, max_keys: int,
            scale: float) -> torch.Tensor:
    """One pass over key tiles for query blocks ``qb`` (NB, tq, H, D); returns (NB, tq, H, D) float32."""
    nb, tq, h, d = qb.shape
    rows_k, rows_v, where_k, bs = src
    where_k = where_k[blocks]
    hk = rows_k.shape[1]
    g = h // hk
    half = qb.is_cuda and qb.dtype in (torch.float16, torch.bfloat16)  # matrix units, float32 sums
    items = nb * hk
    qi = (qb if half else qb.float()).view(nb, tq, hk, g, d).permute(0, 2, 1, 3, 4).reshape(items, tq * g, d)
    m = torch.full((items, tq * g), float("-inf"), device=qb.device)
    l_sum = torch.zeros_like(m)
    acc = torch.zeros(items, tq * g, d, device=qb.device)
    tile = _get(KEY_TILE, qb.device)
    offsets = torch.arange(tile, device=qb.device)
    last = pos.max(1).values  # (NB,) the block's last position: keys past it are read by no row
    for start in range(0, max(max_keys, 1), tile):
        j = start + offsets  # absolute key positions of this tile
        if bs:  # through the block table
            block = where_k.gather(1, (j // bs).clamp(max=where_k.shape[1] - 1).expand(nb, -1))
            slots = block * bs + j % bs
        else:
            slots = where_k[:, None] + j[None, :]
        needed = j[None, :] <= last[:, None]  # (NB, T)
        slots = torch.where(needed, slots, 0)
        kt = rows_k[slots].permute(0, 2, 3, 1).reshape(items, d, tile)  # (items, D, T)
        vt = torch.where(needed[..., None, None], rows_v[slots], 0).transpose(1, 2).reshape(items, tile, d)
        if not half:
            kt, vt = kt.float(), vt.float()
        valid = j[None, None, :] <= pos[..., None]  # (NB, tq, T)
        mask = valid[:, None, :, None, :].expand(nb, hk, tq, g, tile).reshape(items, tq * g, tile)
        s = torch.where(mask, fixed_bmm(qi, kt, torch.float32) * scale, float("-inf"))
        m_new = torch.maximum(m, s.amax(-1))
        m_use = torch.where(m_new == float("-inf"), 0.0, m_new)
        alpha = torch.exp(m - m_use)
        p = torch.exp(s - m_use[..., None])
        seen = mask.any(-1)  # (items, rows): a tile without any of this row's keys changes nothing
        l_sum = torch.where(seen, l_sum * alpha + tree_sum(p, -1), l_sum)
        pv = fixed_bmm(p.to(vt.dtype), vt, torch.float32)  # (items, rows, D); half: p rounded as flash-attn does
        acc = torch.where(seen[..., None], acc * alpha[..., None] + pv, acc)
        m = torch.where(seen, m_new, m)
    out = torch.where(l_sum[..., None] > 0, acc / l_sum[..., None], 0.0)  # (items, tq*g, D)
    return out.view(nb, hk, tq, g, d).permute(0, 2, 1, 3, 4).reshape(nb, tq, h, d)
