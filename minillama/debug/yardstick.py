"""The debugger's own attention, for judging kernels: plain, op by op, independent of ``attention/``.

Two results per attention call, from the same gathered inputs:

* the **reference**: one precision above the active dtype (float32 for bf16/fp16, as flash-attention's
  own tests judge their kernels; float64 for float32): scores, softmax and the weighted sum all in
  that precision;
* the **plain** result that sets the error budget: attention as a textbook would write it in the
  active dtype, products accumulated in float32 but scores, probabilities and output rounded to the
  active dtype (flash-attention's ``upcast=False`` reference).

``budget = |plain - reference|``: what low precision alone costs; a kernel within about 2x of it is
as good as attention can be at that precision (flash-attention issue 410).

Every query row sees the keys ``0..pos`` of its own sequence (``pos``: the row's token position,
so the causal mask is the absolute one), read from the paged cache through the block table, or
from the flat ``k``/``v`` when the call has no cache. Scores are materialised for a tile of query
rows at a time, so a long prompt needs bounded memory. Nothing here reads a tensor value on the host
(no ``.item()``, no data-dependent shape), so it runs inside a captured CUDA graph.
"""

from __future__ import annotations

import torch

#: Score-matrix elements one tile may hold (query rows are tiled to stay under it).
TILE_ELEMENTS = 1 << 25


def reference_dtype(dtype: torch.dtype) -> torch.dtype:
    """One precision above ``dtype``."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def _key_index(call, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat key-store index ``(batch, width)`` of each sequence's key positions, and the key store."""
    ctx = call.context
    j = torch.arange(width, device=call.q.device)
    if ctx.block_tables is not None:
        bs = call.k_cache.shape[1]
        bt = ctx.block_tables.long()
        blk = bt.gather(1, (j // bs).clamp(max=bt.shape[1] - 1).expand(bt.shape[0], -1))
        return blk * bs + j % bs, None
    # no cache involved: sequence s's keys are the flat rows cu_seqlens_k[s] .. cu_seqlens_k[s + 1]
    start = ctx.cu_seqlens_k[:-1].long()
    total = call.k.shape[0]
    return (start[:, None] + j[None, :]).clamp(max=max(total - 1, 0)), (call.k, call.v)


def _keys(call, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``(batch, width, kv_heads, head_dim)`` of every sequence, padded to ``width``."""
    idx, flat = _key_index(call, width)
    if flat is None:
        k_store = call.k_cache.reshape(-1, *call.k_cache.shape[2:])
        v_store = call.v_cache.reshape(-1, *call.v_cache.shape[2:])
    else:
        k_store, v_store = flat
    return k_store[idx], v_store[idx]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float,
            compute: torch.dtype, round_to: torch.dtype | None) -> torch.Tensor:
    """Textbook attention per sequence. q (B, Q, H, D); k/v (B, W, Hk, D); visible (B, Q, W).

    ``round_to``: round scores, probabilities and output to this dtype (the plain budget); None keeps
    everything in ``compute`` (the reference).
    """
    b, nq, heads, _ = q.shape
    hk = k.shape[2]
    qc = q.to(compute).view(b, nq, hk, heads // hk, -1)  # query head h reads kv head h // group
    s = torch.einsum("bqkgd,bwkd->bkgqw", qc, k.to(compute)) * scale
    if round_to is not None:
        s = s.to(round_to).to(compute)
    s = s.masked_fill(~visible[:, None, None], float("-inf"))
    m = s.amax(-1, keepdim=True).clamp(min=torch.finfo(compute).min)  # a row with no key stays finite
    p = torch.exp(s - m)
    p = p / p.sum(-1, keepdim=True).clamp(min=torch.finfo(compute).tiny)  # ... and comes out as 0
    if round_to is not None:
        p = p.to(round_to).to(compute)
    out = torch.einsum("bkgqw,bwkd->bqkgd", p, v.to(compute)).reshape(b, nq, heads, -1)
    return out.to(round_to) if round_to is not None else out


def _query_layout(call) -> tuple[torch.Tensor, torch.Tensor, int]:
    """For the padded (batch, Q) query grid: the flat row of each cell (clamped) and each row's cell."""
    ctx = call.context
    rows = call.q.shape[0]
    if not ctx.is_prefill:  # decode: one query per sequence
        cell = torch.arange(rows, device=call.q.device)
        return cell[:, None], cell, 1
    nq = max(int(ctx.max_seqlen_q), 1)
    start = ctx.cu_seqlens_q[:-1].long()
    grid = (start[:, None] + torch.arange(nq, device=call.q.device)[None, :]).clamp(max=rows - 1)
    seq = ctx.seq_index.long()
    cell = seq * nq + (torch.arange(rows, device=call.q.device) - start[seq])
    return grid, cell, nq


@torch.inference_mode()
def judge(call, active_dtype: torch.dtype, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference and the plain output ``(rows, heads, head_dim)`` of one attention call.

    ``width``: keys per sequence to read (a static bound: the call's longest sequence, or the block
    table's full width inside a CUDA graph). Needs ``call.context.seq_index`` and ``.positions``.
    """
    k, v = _keys(call, width)  # (batch, W, Hk, D), in the cache's dtype
    grid, cell, nq = _query_layout(call)
    q = call.q[grid]  # (batch, Q, H, D)
    pos = call.context.positions.long()[grid]
    valid = torch.zeros(grid.numel(), dtype=torch.bool, device=q.device).index_fill_(0, cell, True)
    visible = (torch.arange(width, device=q.device)[None, None, :] <= pos[..., None]) & valid.view(grid.shape)[..., None]
    ref_dtype = reference_dtype(active_dtype)
    tile = max(1, TILE_ELEMENTS // max(1, q.shape[0] * q.shape[2] * width))
    refs, plains = [], []
    for lo in range(0, nq, tile):
        sl = slice(lo, min(nq, lo + tile))
        refs.append(_attend(q[:, sl], k, v, visible[:, sl], call.scale, ref_dtype, None))
        plains.append(_attend(q[:, sl], k, v, visible[:, sl], call.scale, torch.float32, active_dtype))
    flat = lambda parts: torch.cat(parts, 1).flatten(0, 1)[cell]
    return flat(refs), flat(plains)
