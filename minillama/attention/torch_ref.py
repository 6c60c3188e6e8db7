"""The torch backend: flash-attn 2.8's two inference entry points, in plain PyTorch.

``flash_attn_varlen_func`` and ``flash_attn_with_kvcache`` take the same arguments and return the
same shapes as the real ones, so the engine can switch backends by name. Both compute attention
with the flash algorithm (FlashAttention-2's forward pass: ``flash_loop.py``) over the keys one
tile of cache pages at a time, for all sequences at once. The semantics kept:

* ``softmax_scale`` defaults to ``1/sqrt(headdim)``;
* the causal mask is aligned to the bottom-right corner: in a sequence with ``sq`` queries and
  ``sk`` keys, query ``i`` sees keys ``j <= i + sk - sq`` (the queries are the last ``sq``
  tokens of the sequence);
* a query row that sees no key at all outputs exactly 0, and its log-sum-exp is ``+inf``;
* grouped-query attention: query head ``h`` reads kv head ``h // (nheads // nheads_k)``;
* scores, softmax and the weighted sum run in float32 (float64 inputs stay float64), and the
  output comes back in q's dtype.

No call reads a tensor value on the host or makes a shape depend on one, so nothing waits for the
GPU and a decode call can be captured in a CUDA graph. Options that only matter for training or
that we do not implement (dropout, sliding windows, softcapping, ALiBi, rotary embedding inside
the kernel, ...) raise ``BackendError`` instead of being silently ignored. No Triton and no fused
SDPA here: the ``triton`` backend (``triton_backend.py``) is the fast one.
"""

from __future__ import annotations

import math

import torch

from minillama.attention.backend import AttentionBackend
from minillama.attention.checks import check_kvcache, check_varlen, reject_unsupported
from minillama.attention.flash_loop import attend_tile, plan
from minillama.attention.paged_gather import (
    kvcache_keys,
    query_tile,
    reuse_key_indices,
    shared,
    varlen_keys,
)


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention over a ragged batch, like ``flash_attn.flash_attn_varlen_func``.

    q ``(total_q, nheads, headdim)``; k, v ``(total_k, nheads_k, headdim)`` or, with
    ``block_table`` ``(batch, max_blocks)`` int32, the paged cache
    ``(num_blocks, page_block_size, nheads_k, headdim)``, where sequence ``b``'s keys are the
    first ``cu_seqlens_k[b+1] - cu_seqlens_k[b]`` slots along its block table.
    ``cu_seqlens_q``/``cu_seqlens_k`` are int32 ``(batch + 1,)`` cumulative lengths and
    ``max_seqlen_q``/``max_seqlen_k`` must bound every sequence's length.

    Returns out ``(total_q, nheads, headdim)`` in q's dtype; with ``return_attn_probs=True``,
    ``(out, softmax_lse, S_dmask)`` where softmax_lse is float32 ``(nheads, total_q)`` and
    S_dmask is empty (flash-attn returns it only with dropout). ``deterministic`` only concerns
    flash-attn's backward pass and is ignored.
    """
    fn = "flash_attn_varlen_func"
    reject_unsupported(fn, "torch", dropout_p=(dropout_p, 0.0), window_size=(window_size, (-1, -1)),
                       softcap=(softcap, 0.0), alibi_slopes=(alibi_slopes, None))
    batch = check_varlen(fn, q, k, v, cu_seqlens_q, cu_seqlens_k, block_table)
    total_q, nheads, headdim = q.shape
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(headdim)
    if CPU_BY_SEQUENCE and q.device.type == "cpu" and batch > 1 and max_seqlen_q > 1:
        return _by_sequence(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal, return_attn_probs, block_table)
    paged = block_table is not None
    k_rows, v_rows = (k.flatten(0, 1), v.flatten(0, 1)) if paged else (k, v)  # (rows, Hk, D)
    keys = shared(varlen_keys, cu_seqlens_k, block_table, k.shape[1] if paged else 1, k_rows.shape[0])

    # One spare row past the end takes the query-tile rows that a sequence does not have.
    out = q.new_zeros(total_q + 1, nheads, headdim)
    lse = torch.full((total_q + 1, nheads), float("inf"), device=q.device) if return_attn_probs else None
    tiles = plan(batch, max_seqlen_q, max_seqlen_k, nheads, k.shape[-2], headdim, q.element_size(),
                 k.shape[1] if paged else 1, q.device.type)
    for r0 in range(0, max_seqlen_q if batch and total_q else 0, tiles.q_tile):
        tq = min(tiles.q_tile, max_seqlen_q - r0)
        rows, dest = shared(query_tile, cu_seqlens_q, r0, tq, total_q)
        o, o_lse = attend_tile(q[rows], r0, keys, k_rows, v_rows, max_seqlen_k, tiles.k_tile, scale, causal,
                               lse is not None)
        dest = dest.flatten()
        rows_out = torch.empty(o.shape, dtype=q.dtype, device=q.device).copy_(o)  # one copy: layout and dtype
        out.index_copy_(0, dest, rows_out.view(-1, nheads, headdim))
        if lse is not None:
            lse.index_copy_(0, dest, o_lse.reshape(-1, nheads))
    if return_attn_probs:
        # S_dmask: flash-attn returns the probabilities only with dropout, which is rejected above.
        return out[:total_q], lse[:total_q].T.contiguous(), q.new_empty(0)
    return out[:total_q]


#: On CPU, where reading lengths costs nothing, a batch of prompts is attended one sequence at a
#: time: padding the queries and keys to the longest prompt would cost compute, and the causal
#: tiles a short prompt skips are then its own. Tests switch it off to check the batched loop.
CPU_BY_SEQUENCE = True


def _sequences(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, block_table: torch.Tensor | None) -> list:
    """Per sequence: its query and key row ranges, one-sequence ``cu_seqlens`` and block table (host-side)."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    parts = []
    for b in range(len(cq) - 1):
        nq, nk = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        if nq:
            pair = torch.tensor([0, nq], dtype=torch.int32), torch.tensor([0, nk], dtype=torch.int32)
            table = block_table[b:b + 1] if block_table is not None else None
            parts.append((slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1]), *pair, nq, nk, table))
    return parts


def _by_sequence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                 cu_seqlens_k: torch.Tensor, scale: float, causal: bool, return_attn_probs: bool,
                 block_table: torch.Tensor | None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``flash_attn_varlen_func`` one sequence at a time (see ``CPU_BY_SEQUENCE``)."""
    out = q.new_zeros(q.shape)
    lse = torch.full((q.shape[1], q.shape[0]), float("inf")) if return_attn_probs else None
    for rows_q, rows_k, cu_q, cu_k, nq, nk, table in shared(_sequences, cu_seqlens_q, cu_seqlens_k, block_table):
        kb, vb = (k, v) if table is not None else (k[rows_k], v[rows_k])
        res = flash_attn_varlen_func(q[rows_q], kb, vb, cu_q, cu_k, nq, nk, softmax_scale=scale, causal=causal,
                                     return_attn_probs=return_attn_probs, block_table=table)
        if lse is None:
            out[rows_q] = res
        else:
            out[rows_q], lse[:, rows_q] = res[0], res[1]
    return (out, lse, q.new_empty(0)) if lse is not None else out


def flash_attn_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    rotary_cos: torch.Tensor | None = None,
    rotary_sin: torch.Tensor | None = None,
    cache_seqlens: int | torch.Tensor | None = None,
    cache_batch_idx: torch.Tensor | None = None,
    cache_leftpad: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    alibi_slopes: torch.Tensor | None = None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of new queries over a KV cache, like ``flash_attn.flash_attn_with_kvcache``.

    q ``(batch, seqlen_q, nheads, headdim)``; the cache is ``(batch_cache, seqlen_cache,
    nheads_k, headdim)`` (``batch_cache >= batch``, sequence b uses row b) or, with
    ``block_table`` ``(batch, max_blocks)`` int32, paged ``(num_blocks, page_block_size,
    nheads_k, headdim)``. ``cache_seqlens`` (int or int32 ``(batch,)``) counts the tokens already
    cached; ``None`` means the whole cache (``seqlen_cache``, or ``max_blocks * page_block_size``).

    If ``k``/``v`` ``(batch, seqlen_new, nheads_k, headdim)`` are given they are first written IN
    PLACE into the cache at positions ``cache_seqlens .. cache_seqlens + seqlen_new - 1``
    (through the block table when paged), and attention sees ``cache_seqlens + seqlen_new``
    keys. ``cache_seqlens`` itself is not updated. ``num_splits`` is a flash-attn performance
    hint and is ignored.

    Returns out ``(batch, seqlen_q, nheads, headdim)`` in q's dtype, and with
    ``return_softmax_lse=True`` also float32 lse ``(batch, nheads, seqlen_q)``.
    """
    fn = "flash_attn_with_kvcache"
    reject_unsupported(fn, "torch", rotary_cos=(rotary_cos, None), rotary_sin=(rotary_sin, None),
                       cache_batch_idx=(cache_batch_idx, None), cache_leftpad=(cache_leftpad, None),
                       window_size=(window_size, (-1, -1)), softcap=(softcap, 0.0),
                       alibi_slopes=(alibi_slopes, None))
    del rotary_interleaved, num_splits  # meaningless without rotary / a split-KV kernel
    max_keys = check_kvcache(fn, q, k_cache, v_cache, k, v, cache_seqlens, block_table)
    seqlen_new = append_kv(q, k_cache, v_cache, k, v, cache_seqlens, block_table, max_keys)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return attend_kvcache(q, k_cache, v_cache, cache_seqlens, seqlen_new, block_table, max_keys, scale, causal,
                          return_softmax_lse)


def append_kv(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor | None,
              v: torch.Tensor | None, cache_seqlens: int | torch.Tensor | None, block_table: torch.Tensor | None,
              max_keys: int) -> int:
    """Write new keys/values in place at positions cached .. cached + seqlen_new - 1; returns seqlen_new."""
    if k is None:
        return 0
    batch, seqlen_new = k.shape[0], k.shape[1]
    if isinstance(cache_seqlens, torch.Tensor):
        cached = cache_seqlens.long()
    else:
        cached = torch.full((batch,), cache_seqlens, dtype=torch.long, device=q.device)
    pos = cached[:, None] + torch.arange(seqlen_new, device=q.device)  # (B, seqlen_new)
    if block_table is not None:
        page = k_cache.shape[1]
        # No clamp: writing through a garbage table entry must fail loudly.
        where = (block_table.long().gather(1, pos // page), pos % page)
    else:
        where = (torch.arange(batch, device=q.device)[:, None].expand_as(pos), pos)
    k_cache.index_put_(where, k)
    v_cache.index_put_(where, v)
    return seqlen_new


def attend_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   cache_seqlens: int | torch.Tensor | None, seqlen_new: int, block_table: torch.Tensor | None,
                   max_keys: int, scale: float, causal: bool,
                   return_softmax_lse: bool) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The attention of ``flash_attn_with_kvcache`` once the new keys are in the cache."""
    batch, seqlen_q, nheads, headdim = q.shape
    Hk = k_cache.shape[2]
    paged = block_table is not None
    k_rows, v_rows = k_cache.flatten(0, 1), v_cache.flatten(0, 1)
    keys = shared(kvcache_keys, cache_seqlens, seqlen_new, batch, block_table, k_cache.shape[1], max_keys,
                  k_rows.shape[0], q.device)
    tiles = plan(batch, seqlen_q, max_keys, nheads, Hk, headdim, q.element_size(), k_cache.shape[1] if paged else 1,
                 q.device.type)
    if tiles.q_tile >= seqlen_q:  # one query tile (every decode): its layout is the output's
        o, o_lse = attend_tile(q, 0, keys, k_rows, v_rows, max_keys, tiles.k_tile, scale, causal, return_softmax_lse)
        # One copy at most: none when o is already laid out and typed as the output.
        out = o.reshape(q.shape) if o.dtype == q.dtype else q.new_empty(o.shape).copy_(o).view(q.shape)
        lse = o_lse.permute(0, 2, 3, 1).reshape(batch, nheads, seqlen_q) if return_softmax_lse else None
        return (out, lse) if return_softmax_lse else out
    out = q.new_empty(batch, seqlen_q, nheads, headdim)
    lse = torch.empty(batch, nheads, seqlen_q, device=q.device) if return_softmax_lse else None
    for r0 in range(0, seqlen_q, tiles.q_tile):
        # Every sequence has seqlen_q queries: the tile of r = r0 .. r0+tq-1 is a slice of q.
        tq = min(tiles.q_tile, seqlen_q - r0)
        rows = slice(seqlen_q - r0 - tq, seqlen_q - r0)
        o, o_lse = attend_tile(q[:, rows], r0, keys, k_rows, v_rows, max_keys, tiles.k_tile, scale, causal,
                               lse is not None)
        out[:, rows].view(batch, tq, Hk, nheads // Hk, headdim).copy_(o)
        if lse is not None:
            lse[:, :, rows].view(batch, Hk, nheads // Hk, tq).copy_(o_lse.permute(0, 2, 3, 1))
    return (out, lse) if return_softmax_lse else out


#: A decode step gathers (and masks) every key slot of the block table for every sequence, so a
#: CUDA graph, which reads tables at full width, costs batch x width whatever the real lengths:
#: graphs are replayed while that product stays under this many keys (e.g. 256 sequences at 4096).
GRAPH_KEYS = 1 << 20

BACKEND = AttentionBackend(
    name="torch",
    varlen=flash_attn_varlen_func,
    with_kvcache=flash_attn_with_kvcache,
    block_size_multiple=1,
    forward_scope=reuse_key_indices,
    pads_queries=True,  # query tiles are per sequence
    graph_keys=GRAPH_KEYS,
)
