"""The torch backend's arithmetic: FlashAttention-2's forward pass, in plain PyTorch, over key tiles.

For one tile of queries (every sequence's, at once) the keys are visited one tile at a time;
each step computes the scores against that tile, masks them, and folds them into a running max
``m``, a running sum ``l`` and an unnormalised output ``O`` per query row, rescaling what was
accumulated when the max grows (``online_softmax``, the core loop). Memory is one tile's scores
and keys, never the whole score matrix or a padded copy of all keys. Every shape comes from
argument shapes and Python ints, so no call waits for the GPU and a decode call can be captured
in a CUDA graph.

Layout: the G query heads that share a kv head are stacked as the rows of one matrix per (kv
head, sequence): a query tile is ``(Hk*B, G*tq, D)`` and a key tile ``(Hk*B, T, D)``, so one
``torch.bmm`` computes grouped-query attention without repeating K/V. Scores, softmax and the
output run in float32 (float64 inputs stay float64); on CUDA half-precision operands feed the
matrix units directly with float32 results, and the probabilities are rounded to the value
dtype before ``P @ V``, as flash-attn does.

Tile sizes (``plan``): keys in whole cache pages, as many as ``KV_TILE_BYTES`` of keys for the
batch allow, one page at least; for a long prompt the queries too, so that a tile's float32
scores stay within ``SCORE_TILE_BYTES``. On a GPU a 256-token page is one tile at large batch; a
small batch takes many pages, often the whole table, in one step (fewer, larger kernels). On CPU
16-token pages are grouped the same way (a decode is then one tile: per-op overhead dominates
there), and the smaller score budget cuts a long prompt into tiles whose causal half is skipped.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch

from minillama.attention.paged_gather import KeyIndex, gather_heads, head_rows, heads_flat, key_tile, shared

# Bytes of one key tile (the value tile is as large) and of one tile's float32 scores, by device.
KV_TILE_BYTES = {"cuda": 64 << 20, "cpu": 64 << 20}
SCORE_TILE_BYTES = {"cuda": 64 << 20, "cpu": 4 << 20}
# Whether keys are gathered as head rows (``head_rows``) on this device; CUDA's gather makes bmm's
# layout itself (benchmarks/attn_gpu_variants.py times both there).
HEAD_ROWS = {"cuda": False, "cpu": True}
# A finite stand-in for "-inf" as the running max of a row that has seen no key yet: exp(S - m)
# is then exp(-inf) = 0 for its masked scores instead of exp(-inf + inf) = NaN.
NO_KEY = -1e30


class Plan(NamedTuple):
    """Tile sizes of one call: ``q_tile`` query rows per sequence against ``k_tile`` keys per sequence."""

    q_tile: int
    k_tile: int


@functools.lru_cache(maxsize=4096)
def plan(batch: int, n_q: int, n_keys: int, heads: int, kv_heads: int, head_dim: int, itemsize: int, page: int,
         device: str) -> Plan:
    """Tile sizes for ``batch`` sequences of up to ``n_q`` queries over up to ``n_keys`` keys on ``device`` (a type)."""
    kv_budget = KV_TILE_BYTES.get(device, KV_TILE_BYTES["cpu"])
    score_budget = SCORE_TILE_BYTES.get(device, SCORE_TILE_BYTES["cpu"])
    pages = max(1, -(-max(n_keys, 1) // page))
    fit = max(1, kv_budget // max(1, batch * page * kv_heads * head_dim * itemsize))
    if n_q > 1:
        # Roughly square tiles, so that the causal tiles no query sees are many and skipped.
        side = math.isqrt(max(1, score_budget // (4 * batch * heads)))
        fit = min(fit, max(1, side // page))
    k_tile = min(pages, fit) * page
    q_tile = max(1, min(n_q, score_budget // (4 * batch * heads * k_tile)))
    return Plan(q_tile, k_tile)


def tile_bytes(p: Plan, batch: int, heads: int, kv_heads: int, head_dim: int, itemsize: int) -> int:
    """Memory one step of the loop may hold: a key (or value) tile with its index and mask, the
    scores, probabilities and causal mask of a query tile against it, the query tile (gathered and
    laid out), its accumulators and its output rows."""
    keys = batch * p.k_tile * (kv_heads * head_dim * itemsize + 12)
    scores = batch * p.q_tile * p.k_tile * (heads * (4 + itemsize) + 4)
    rows = batch * heads * p.q_tile * (head_dim * (3 * itemsize + 2 * 4) + 16)
    return keys + scores + rows


def half_on_cuda(t: torch.Tensor) -> bool:
    return t.is_cuda and t.dtype in (torch.float16, torch.bfloat16)


def bmm(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``a @ b`` (batched) with products summed in ``acc``.

    On CUDA, half-precision operands go straight to the matrix units with a float32 result (the
    numbers of upcasting first, without float32 copies of the keys); elsewhere they are upcast.
    """
    if a.dtype == b.dtype == acc:
        return torch.bmm(a, b)
    if half_on_cuda(a) and a.dtype == b.dtype and acc == torch.float32:
        return torch.bmm(a, b, out_dtype=acc)
    return torch.bmm(a.to(acc), b.to(acc))


def scale_and_mask(s: torch.Tensor, bias: torch.Tensor, scale: float) -> None:
    """``s = s * scale + bias`` in place (one pass; bias is 0 or -inf, so -inf stays -inf)."""
    if scale == 1.0:
        s.add_(bias)
    else:
        torch.add(bias, s, alpha=scale, out=s)


def exp_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``exp(x)`` in ``dtype``: in place when the dtypes match, else written straight into a new tensor."""
    return x.exp_() if x.dtype == dtype else torch.exp(x, out=torch.empty_like(x, dtype=dtype))


# ---------------------------------------------------------------------------------------------
# The core loop
# ---------------------------------------------------------------------------------------------


class KeyTile(NamedTuple):
    """One tile of keys for every sequence: where to gather them, and what to add to their scores."""

    idx: torch.Tensor  # (B, T) rows of the flat keys, or their head_rows (Hk, B, T) for gather_heads on CPU
    bias: torch.Tensor  # 0 or -inf, broadcasting over the scores viewed as (Hk, B, G, tq, T)
    # The same bias laid out as (Hk*B, 1, T) when it does not depend on the query row (no causal
    # part) and the scores are computed in the operands' dtype: then one ``baddbmm`` makes S.
    row_bias: torch.Tensor | None


def scores(q: torch.Tensor, k: torch.Tensor, tile: KeyTile, shape: tuple[int, ...], scale: float,
           acc: torch.dtype) -> torch.Tensor:
    """S = Q Kᵀ · scale + bias, float32 (or float64): -inf where a key must not be seen."""
    if tile.row_bias is not None:  # one product does it all: bias + scale · (Q Kᵀ)
        return torch.baddbmm(tile.row_bias, q, k.mT, alpha=scale)
    s = bmm(q, k.mT, acc)
    scale_and_mask(s.view(*shape, -1), tile.bias, scale)
    return s


def online_softmax(q: torch.Tensor, tiles: Iterable[KeyTile], k: torch.Tensor, v: torch.Tensor,
                   gather: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                   shape: tuple[int, ...], scale: float, p_dtype: torch.dtype
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashAttention-2's forward pass of one query tile ``q`` ``(N, R, D)`` over key tiles.

    For each tile, ``gather(k, tile.idx)`` / ``gather(v, tile.idx)`` give its keys and values
    ``(N, T, D)``, and its bias (0, or -inf for a key the row must not see) is added to the
    scores viewed as ``shape + (T,)``; ``scale`` multiplies the scores (1 when ``q`` comes scaled).
    Returns the unnormalised output ``O`` ``(N, R, D)``, the running max ``m`` (of scaled scores)
    and sum ``l`` ``(N, R, 1)``; ``l == 0`` for a row that saw no key.
    """
    acc = torch.promote_types(q.dtype, torch.float32)
    m = ell = o = None  # ell: the ℓ of the paper, the running sum
    for tile in tiles:
        s = scores(q, gather(k, tile.idx), tile, shape, scale, acc)  # S = Q K_jᵀ·scale; unseen keys -inf
        m_j = s.amax(-1, keepdim=True)                          # rowmax(S)
        m_new = m_j.clamp_(min=NO_KEY) if m is None else torch.maximum(m, m_j)  # m' = max(m, rowmax(S))
        p = exp_to(s.sub_(m_new), p_dtype)                      # P = exp(S - m')
        del s  # each tile's S and P are freed once used: the loop holds one tile
        l_j = p.sum(-1, keepdim=True, dtype=acc)                # rowsum(P)
        pv = bmm(p, gather(v, tile.idx), acc)                   # P V_j
        del p
        if m is None:                                           # first tile: nothing to rescale yet
            ell, o = l_j, pv
        else:
            alpha = torch.exp(m - m_new)                        # e^(m - m')
            ell = l_j.addcmul_(alpha, ell)                      # l' = e^(m - m') l + rowsum(P)
            o = pv.addcmul_(alpha, o)                           # O' = e^(m - m') O + P V_j
        m = m_new
    return o, m, ell


def key_tiles(keys: KeyIndex, first: int, n_keys: int, k_tile: int, r0: int, tq: int, causal: bool,
              kv_heads: int, acc: torch.dtype, one_product: bool, by_head: bool) -> list[KeyTile]:
    """The key tiles a query tile (queries ``r0 .. r0+tq-1``) visits, from key ``first`` on.

    Built once per forward pass (through ``shared``): every layer visits the same tiles.
    ``by_head``: index the keys by head rows (``head_rows``, CPU).
    """
    out = []
    for start in range(first, n_keys, k_tile):
        stop = min(start + k_tile, n_keys)
        idx, bias = shared(key_tile, keys, start, stop, acc)  # one per key range, whatever the query tile
        if by_head:
            idx = shared(head_rows, idx, kv_heads)
        bias = bias[:, None, None, :]  # (B, 1, 1, T): the same for every kv head, group and query row
        if causal and start < r0 + tq - 1:  # some key of this tile is older than some query: u < r
            r = torch.arange(r0 + tq - 1, r0 - 1, -1, device=idx.device)
            u = torch.arange(start, stop, device=idx.device)
            out.append(KeyTile(idx, bias.masked_fill(u[None, :] < r[:, None], float("-inf")), None))  # (B, 1, tq, T)
        else:
            B, T = idx.shape[-2:]
            row = bias.view(1, B, 1, T).expand(kv_heads, B, 1, T).reshape(kv_heads * B, 1, T) if one_product else None
            out.append(KeyTile(idx, bias, row))
    return out


# ---------------------------------------------------------------------------------------------
# One query tile: layouts in, key tiles, layouts out
# ---------------------------------------------------------------------------------------------


def attend_tile(q: torch.Tensor, r0: int, keys: KeyIndex, k_rows: torch.Tensor, v_rows: torch.Tensor,
                n_keys: int, k_tile: int, scale: float, causal: bool,
                need_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of a query tile over every sequence's keys.

    q ``(B, tq, H, D)`` holds the queries ``r = r0 .. r0+tq-1`` counted back from each
    sequence's end, in forward order (row ``i`` is ``r = r0 + tq - 1 - i``); k/v rows ``(n, Hk,
    D)``, with ``keys`` saying where each sequence's are, at most ``n_keys`` per sequence.
    Returns out as a float32 view ``(B, tq, Hk, G, D)`` (head ``h = kv_head * G + g``; 0 for a
    row that sees no key) and, if asked, lse ``(B, tq, Hk, G)`` (+inf for such a row).
    """
    B, tq, H, D = q.shape
    Hk = k_rows.shape[1]
    G = H // Hk
    acc = torch.promote_types(q.dtype, torch.float32)
    # Causal: key u is seen by query r iff u >= r, so tiles ending before r0 are seen by no query here.
    first = (r0 // k_tile) * k_tile if causal else 0
    if first >= n_keys or B == 0 or tq == 0:  # no key for any query of the tile
        out = q.new_zeros(B, tq, Hk, G, D, dtype=acc)
        return out, (torch.full((B, tq, Hk, G), float("inf"), device=q.device) if need_lse else None)
    qh = q.reshape(B, tq, Hk, G, D).permute(2, 0, 3, 1, 4).reshape(Hk * B, G * tq, D)
    # In the operands' dtype (float32/64; not half on CUDA) a tile's S is one baddbmm.
    one_product = qh.dtype == k_rows.dtype == acc
    by_head = HEAD_ROWS.get(k_rows.device.type, True) and heads_flat(k_rows) and heads_flat(v_rows)
    tiles = shared(key_tiles, keys, first, n_keys, k_tile, r0, tq, causal, Hk, acc, one_product, by_head)
    p_dtype = v_rows.dtype if half_on_cuda(v_rows) else acc
    if qh.dtype == acc and any(t.row_bias is None for t in tiles):
        qh, scale = qh * scale, 1.0  # scaling Q is one small multiply, not a pass over each S
    o, m, ell = online_softmax(qh, tiles, k_rows, v_rows, gather_heads, (Hk, B, G, tq), scale, p_dtype)
    # O / l. A row that saw a key has l >= 1 (its largest score adds exp(0) = 1); one that saw
    # none has O = 0 and l = 0, and keeps O = 0.
    o = o.div_(ell.clamp(min=1.0))
    out = o.view(Hk, B, G, tq, D).permute(1, 3, 0, 2, 4)
    if not need_lse:
        return out, None
    lse = torch.where(ell > 0, m + torch.log(ell), float("inf"))  # log-sum-exp = m + log l
    return out, lse.view(Hk, B, G, tq).permute(1, 3, 0, 2).float()
