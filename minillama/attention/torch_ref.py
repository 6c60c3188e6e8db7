"""Pure-PyTorch re-implementation of flash-attn 2.8's two inference entry points.

``flash_attn_varlen_func`` and ``flash_attn_with_kvcache`` take the same arguments and return the
same shapes as the real ones, so the engine can switch backends by name. The semantics kept:

* ``softmax_scale`` defaults to ``1/sqrt(headdim)``;
* the causal mask is aligned to the bottom-right corner: in a sequence with ``sq`` queries and
  ``sk`` keys, query ``i`` sees keys ``j <= i + sk - sq`` (the queries are the last ``sq``
  tokens of the sequence);
* a query row that sees no key at all outputs exactly 0, and its log-sum-exp is ``+inf``
  (flash-attn's convention for such rows);
* grouped-query attention: query head ``h`` reads kv head ``h // (nheads // nheads_k)``;
* scores, softmax and the weighted sum run in float32 (float64 inputs stay float64), and the
  output comes back in q's dtype. On CUDA, bf16/fp16 operands feed the matrix units directly with
  float32 results, and the probabilities are rounded to the value dtype before ``probs @ v``, as
  flash-attn does.

How it works, in one picture: ragged inputs are first gathered into padded tensors (queries
``(batch, seqlen, heads, headdim)``, keys and values ``(kv_heads, batch, seqlen, headdim)`` so
that batched matrix products need no further copies), one masked dense attention runs over the
padded batch, and the valid rows are gathered back. Every index is computed on the device from the
sequence-length tensors and every shape from argument shapes or the given Python ints, so a call
never waits for the GPU (no ``.item()``, no data-dependent shapes) and a decode call can be
captured in a CUDA graph.

Options that only matter for training or that we do not implement (dropout, sliding windows,
softcapping, ALiBi, rotary embedding inside the kernel, ...) raise ``BackendError`` instead of
being silently ignored.
"""

from __future__ import annotations

import math

import torch

from minillama.attention import triton_decode
from minillama.attention.backend import AttentionBackend, BackendError
from minillama.attention.dense import attend, attend_sdpa, decode_sdpa, prompt_sdpa
from minillama.attention.paged_gather import (
    cached_lens,
    gather_heads,
    gather_rows,
    gather_slots,
    kvcache_key_index,
    reuse_key_indices,
    shared,
    varlen_key_index,
)

# ---------------------------------------------------------------------------------------------
# Argument checking: only Python-side metadata (shapes, dtypes, devices), never tensor values.
# ---------------------------------------------------------------------------------------------


def _fail(fn: str, problem: str, fix: str) -> BackendError:
    return BackendError(f"{fn}: {problem}: {fix}")


def _reject_unsupported(fn: str, **options: tuple[object, object]) -> None:
    """Raise for each option given a value other than its default: ``name=(value, default)``."""
    for name, (value, default) in options.items():
        if default is None:
            given = value is not None
        elif isinstance(default, tuple):
            given = tuple(value) != default  # window_size may come as a list
        else:
            given = value != default
        if given:
            # Tensors are described by shape: their repr would span many lines.
            shown = f"<tensor of shape {tuple(value.shape)}>" if isinstance(value, torch.Tensor) else repr(value)
            raise _fail(
                fn,
                f"{name}={shown} is not supported by the torch attention backend",
                f"leave {name} at its default ({default!r}) or use --backend flash-attn",
            )


def _check_int32(fn: str, name: str, t: torch.Tensor, ndim: int) -> None:
    if t.dtype != torch.int32:
        raise _fail(fn, f"{name} must have dtype torch.int32 (flash-attn requires it), got {t.dtype}",
                    f"pass {name}.to(torch.int32)")
    if t.dim() != ndim:
        raise _fail(fn, f"{name} must be {ndim}-D, got shape {tuple(t.shape)}", f"reshape {name}")


def _check_qkv(fn: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_dim: int, kv_dim: int) -> None:
    if q.dim() != q_dim or k.dim() != kv_dim or v.dim() != kv_dim:
        raise _fail(fn, f"expected q of {q_dim} dims and k/v of {kv_dim} dims, got shapes "
                    f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}", "see the docstring for the layouts")
    if k.shape != v.shape:
        raise _fail(fn, f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}",
                    "pass matching key and value tensors")
    if not (q.dtype == k.dtype == v.dtype):
        raise _fail(fn, f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}",
                    "cast them to the model dtype")
    if not (q.device == k.device == v.device):
        raise _fail(fn, f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}",
                    "move them to the same device")
    if not q.dtype.is_floating_point:
        raise _fail(fn, f"q must be floating point, got {q.dtype}", "cast q, k, v to float")
    if q.shape[-1] != k.shape[-1]:
        raise _fail(fn, f"q has headdim {q.shape[-1]} but k has {k.shape[-1]}", "use the same head size")
    nheads, nheads_k = q.shape[-2], k.shape[-2]
    if nheads_k == 0 or nheads % nheads_k != 0:
        raise _fail(fn, f"nheads ({nheads}) must be a multiple of nheads_k ({nheads_k}) for grouped-query "
                    "attention", "check the model's num_attention_heads / num_key_value_heads")


# ---------------------------------------------------------------------------------------------
# The two flash-attn entry points.
# ---------------------------------------------------------------------------------------------


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
    _reject_unsupported(fn, dropout_p=(dropout_p, 0.0), window_size=(window_size, (-1, -1)),
                        softcap=(softcap, 0.0), alibi_slopes=(alibi_slopes, None))
    paged = block_table is not None
    _check_qkv(fn, q, k, v, q_dim=3, kv_dim=4 if paged else 3)
    _check_int32(fn, "cu_seqlens_q", cu_seqlens_q, 1)
    _check_int32(fn, "cu_seqlens_k", cu_seqlens_k, 1)
    batch = cu_seqlens_q.shape[0] - 1
    if batch < 0 or cu_seqlens_k.shape[0] != batch + 1:
        raise _fail(fn, f"cu_seqlens_q and cu_seqlens_k must both have batch+1 entries, got "
                    f"{cu_seqlens_q.shape[0]} and {cu_seqlens_k.shape[0]}", "build them from the same batch")
    if paged:
        _check_int32(fn, "block_table", block_table, 2)
        if block_table.shape[0] != batch:
            raise _fail(fn, f"block_table has {block_table.shape[0]} rows for a batch of {batch}",
                        "pass one block-table row per sequence")

    total_q, nheads, headdim = q.shape
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(headdim)
    cu_q = cu_seqlens_q.long()
    cu_k = cu_seqlens_k.long()
    q_lens = cu_q[1:] - cu_q[:-1]
    k_lens = cu_k[1:] - cu_k[:-1]

    # 1. Flat queries -> padded (B, max_seqlen_q, H, D).
    q_pad = gather_rows(q, cu_q[:-1], max_seqlen_q)
    # 2. Keys/values -> padded, from the flat tensors or through the block table.
    rows_k, rows_v = (k.flatten(0, 1), v.flatten(0, 1)) if paged else (k, v)  # (rows, Hk, D)
    idx = shared(varlen_key_index, cu_seqlens_k, block_table, k.shape[1] if paged else 0, max_seqlen_k,
                  rows_k.shape[0])

    # 3. Dense masked attention over the padded batch.
    if CPU_FUSED_DECODE and not return_attn_probs and q.device.type == "cpu" and batch and max_seqlen_q:
        k_pad, v_pad = gather_slots(rows_k, idx), gather_slots(rows_v, idx)  # (B, Sk, Hk, D)
        if causal and torch.equal(cu_seqlens_q, cu_seqlens_k):  # on CPU, reading the lengths is free
            out_pad = prompt_sdpa(q_pad, k_pad, v_pad, scale)
        else:
            out_pad = attend_sdpa(q_pad, k_pad, v_pad, q_lens, k_lens, scale, causal)
        lse_pad = None
    else:
        k_pad, v_pad = gather_heads(rows_k, idx), gather_heads(rows_v, idx)  # (Hk, B, Sk, D)
        out_pad, lse_pad = attend(q_pad, k_pad, v_pad, q_lens, k_lens, scale, causal)

    # 4. Padded -> flat: token t belongs to the last sequence b with cu_q[b] <= t (empty
    # sequences share their start with the next one, so "last" skips them) at offset t - cu_q[b].
    # The clamps only keep indices in range if cu_seqlens / max_seqlen_q are inconsistent.
    t = torch.arange(total_q, device=q.device)
    seq = (torch.searchsorted(cu_q, t, right=True) - 1).clamp(0, max(batch - 1, 0))
    offset = (t - cu_q[seq]).clamp(0, max(max_seqlen_q - 1, 0))
    if batch == 0 or max_seqlen_q == 0:
        out = q.new_zeros(q.shape)
        lse = torch.full((nheads, total_q), float("inf"), dtype=torch.float32, device=q.device)
    else:
        out = out_pad[seq, offset]  # (total_q, H, D)
        lse = lse_pad[seq, :, offset].T.contiguous() if lse_pad is not None else None  # (H, total_q)
    if return_attn_probs:
        return out, lse, q.new_empty(0)
    return out


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
    _reject_unsupported(fn, rotary_cos=(rotary_cos, None), rotary_sin=(rotary_sin, None),
                        cache_batch_idx=(cache_batch_idx, None), cache_leftpad=(cache_leftpad, None),
                        window_size=(window_size, (-1, -1)), softcap=(softcap, 0.0),
                        alibi_slopes=(alibi_slopes, None))
    del rotary_interleaved, num_splits  # meaningless without rotary / a split-KV kernel
    _check_qkv(fn, q, k_cache, v_cache, q_dim=4, kv_dim=4)
    batch, seqlen_q, nheads, headdim = q.shape
    paged = block_table is not None
    if paged:
        _check_int32(fn, "block_table", block_table, 2)
        if block_table.shape[0] != batch:
            raise _fail(fn, f"block_table has {block_table.shape[0]} rows for a batch of {batch}",
                        "pass one block-table row per sequence")
        max_keys = block_table.shape[1] * k_cache.shape[1]
    else:
        if k_cache.shape[0] < batch:
            raise _fail(fn, f"the KV cache holds {k_cache.shape[0]} sequences for a batch of {batch}",
                        "allocate one cache row per sequence or pass a block_table")
        max_keys = k_cache.shape[1]

    if cache_seqlens is None:
        if k is not None:
            raise _fail(fn, "appending k/v needs cache_seqlens (where to write them)", "pass cache_seqlens")
    elif not isinstance(cache_seqlens, int):
        _check_int32(fn, "cache_seqlens", cache_seqlens, 1)
        if cache_seqlens.shape[0] != batch:
            raise _fail(fn, f"cache_seqlens has {cache_seqlens.shape[0]} entries for a batch of {batch}",
                        "pass one length per sequence")

    # 1. Append the new keys/values in place at positions cached .. cached + seqlen_new - 1.
    seqlen_new = 0
    if k is not None or v is not None:
        if k is None or v is None:
            raise _fail(fn, "k and v must be given together", "pass both new keys and new values")
        expected = (batch, k.shape[1], k_cache.shape[2], headdim)
        if tuple(k.shape) != expected or tuple(v.shape) != expected:
            raise _fail(fn, f"new k/v must have shape (batch, seqlen_new, nheads_k, headdim) = {expected}, got "
                        f"{tuple(k.shape)} and {tuple(v.shape)}", "reshape the new keys/values")
        if k.dtype != k_cache.dtype or v.dtype != v_cache.dtype:
            raise _fail(fn, f"new k/v dtype {k.dtype} differs from the cache's {k_cache.dtype}",
                        "cast them to the cache dtype")
        seqlen_new = k.shape[1]
        cached = cached_lens(cache_seqlens, batch, max_keys, q.device)
        pos = cached[:, None] + torch.arange(seqlen_new, device=q.device)  # (B, seqlen_new)
        if paged:
            block_size = k_cache.shape[1]
            # Unlike the read path, no clamp: writing through a garbage entry must fail loudly.
            blocks = block_table.long().gather(1, pos // block_size)
            where = (blocks, pos % block_size)
        else:
            where = (torch.arange(batch, device=q.device)[:, None].expand_as(pos), pos)
        k_cache.index_put_(where, k)
        v_cache.index_put_(where, v)

    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(headdim)
    if seqlen_q == 1 and paged and triton_decode.usable(q, k_cache, v_cache):
        # On CUDA: read the keys through the block table in one kernel, no padded copy (see triton_decode).
        if isinstance(cache_seqlens, torch.Tensor) and not seqlen_new:
            seen = cache_seqlens
        else:
            seen = cached_lens(cache_seqlens, batch, max_keys, q.device) + seqlen_new
        out, lse = triton_decode.paged_decode(q, k_cache, v_cache, block_table, seen, scale)
        return (out, lse) if return_softmax_lse else out

    # 2. The keys each sequence sees, padded to max_keys per sequence.
    rows_k, rows_v = k_cache.flatten(0, 1), v_cache.flatten(0, 1)
    keys = shared(kvcache_key_index, cache_seqlens, seqlen_new, batch, block_table, k_cache.shape[1],
                   max_keys, rows_k.shape[0], q.device)

    # 3. Attention; every sequence has exactly seqlen_q queries.
    if CPU_FUSED_DECODE and seqlen_q == 1 and not return_softmax_lse and q.device.type == "cpu":
        return decode_sdpa(q, gather_slots(rows_k, keys.idx), gather_slots(rows_v, keys.idx), keys.valid, scale)
    k_pad, v_pad = gather_heads(rows_k, keys.idx), gather_heads(rows_v, keys.idx)
    q_lens = torch.full((batch,), seqlen_q, dtype=torch.long, device=q.device)
    out, lse = attend(q, k_pad, v_pad, q_lens, keys.seen, scale, causal)
    if return_softmax_lse:
        return out, lse
    return out


#: On CPU, use PyTorch's fused SDPA instead of the op-by-op ``attend`` when no log-sum-exp is
#: asked for (same math; tests compare both paths against the float64 reference).
CPU_FUSED_DECODE = True


BACKEND = AttentionBackend(
    name="torch",
    varlen=flash_attn_varlen_func,
    with_kvcache=flash_attn_with_kvcache,
    block_size_multiple=1,
    forward_scope=reuse_key_indices,
)
