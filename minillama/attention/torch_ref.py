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

import contextlib
import math
import threading
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F

from minillama.attention import triton_decode
from minillama.attention.backend import AttentionBackend, BackendError

# Upper bound on the elements of one (batch, heads, query-chunk, keys) score tensor. Above it the
# queries are processed in chunks (a loop over chunk index, not over sequences), so a long
# prefill does not materialise a huge score matrix: 2**26 float32 scores are 256 MiB.
MAX_SCORE_ELEMENTS = 1 << 26


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
# One key index per forward pass: every layer of a step passes the same metadata tensors.
# ---------------------------------------------------------------------------------------------

_local = threading.local()  # .indices: the memo of the innermost ``reuse_key_indices`` block of this thread


@contextlib.contextmanager
def reuse_key_indices() -> Iterator[None]:
    """Inside this block, calls given the same ``block_table`` / length tensors share one key index.

    The model runner wraps each forward pass in it: all layers of a step read the same metadata
    tensors, unchanged, so only the first layer builds the index (a dozen small kernels). Outside
    the block every call builds its own, so a caller that edits a block table in place between
    two calls is always safe. The memo belongs to the thread that opened the block.
    """
    outer = getattr(_local, "indices", None)
    _local.indices = {}
    try:
        yield
    finally:
        _local.indices = outer


def _shared(build: Callable, *args: object):
    """``build(*args)``, or its result from an earlier call with the same arguments in this block."""
    memo = getattr(_local, "indices", None)
    if memo is None:
        return build(*args)
    key = (build, *(id(a) if isinstance(a, torch.Tensor) else a for a in args))
    hit = memo.get(key)
    if hit is None:
        # The arguments are kept with the result so their ids cannot be reused by new tensors.
        hit = memo[key] = (args, build(*args))
    return hit[1]


# ---------------------------------------------------------------------------------------------
# Gathers: flat or paged keys -> padded, kv-head-major (Hk, batch, seqlen, headdim) tensors.
# ---------------------------------------------------------------------------------------------


def _gather_rows(x: torch.Tensor, starts: torch.Tensor, length: int) -> torch.Tensor:
    """Padded ``(batch, length, ...)`` view of flat ``x``: row ``i`` of sequence ``b`` is ``x[starts[b] + i]``.

    Rows past a sequence's end read some other (clamped) row of ``x``; callers mask them.
    """
    batch = starts.shape[0]
    if x.shape[0] == 0 or length == 0:
        return x.new_zeros(batch, length, *x.shape[1:])
    idx = starts[:, None] + torch.arange(length, device=x.device)  # (batch, length)
    return x[idx.clamp(0, x.shape[0] - 1)]


def _key_positions(lens: torch.Tensor, length: int) -> torch.Tensor:
    """``(batch, length)`` key positions ``0 .. length-1``, where positions at or past a sequence's
    length are replaced by 0.

    Padding slots thus re-read the sequence's own first key instead of whatever sits past its end
    (stale keys of another sequence, or NaN in a cache from ``torch.empty``). That keeps every
    gathered value finite without a separate zeroing pass, so a masked probability of exactly 0
    contributes exactly 0 to ``probs @ v``. On a GPU the repeated reads also hit in cache.
    """
    pos = torch.arange(length, device=lens.device)[None, :]
    return torch.where(pos < lens[:, None], pos, 0)


def _gather_heads(rows: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``rows[idx]`` for ``rows`` ``(n, Hk, D)`` and in-range ``idx`` ``(batch, length)``, laid out ``(Hk, batch, length, D)``.

    That is the layout ``torch.bmm`` wants for grouped-query attention (one matrix per kv head and
    sequence, batch dims foldable without a copy), produced by the gather itself.
    """
    if rows.shape[0] == 0:
        return rows.new_zeros(rows.shape[1], *idx.shape, rows.shape[2])
    # The index kernel pays per element, so move 8-byte words instead of 2-byte bf16 values
    # where the layout allows: the same bytes, a quarter of the work (a 4x faster decode gather).
    words = _as_words(rows)
    out = words.transpose(0, 1)[:, idx]
    return out if words is rows else out.view(rows.dtype)


def _as_words(x: torch.Tensor) -> torch.Tensor:
    """``x`` reinterpreted with its last dim as int64 words, or ``x`` itself when the layout does not allow it."""
    if x.element_size() >= 8 or (x.shape[-1] * x.element_size()) % 8:
        return x
    try:
        return x.view(torch.int64)
    except RuntimeError:  # strides or offset not in whole words
        return x


def _gather_slots(rows: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``rows[idx]`` for ``rows`` ``(n, Hk, D)`` and in-range ``idx`` ``(batch, length)``: ``(batch, length, Hk, D)``.

    Whole rows (all heads of one slot) are copied, which on CPU is several times faster than the
    element-wise gather of ``_gather_heads``; SDPA takes the head-major view without a copy.
    """
    if rows.shape[0] == 0:
        return rows.new_zeros(*idx.shape, *rows.shape[1:])
    return rows.index_select(0, idx.reshape(-1)).view(*idx.shape, *rows.shape[1:])


def _flat_key_index(starts: torch.Tensor, lens: torch.Tensor, length: int) -> torch.Tensor:
    """Row of each (sequence, key position) in flat ``(total_k, Hk, D)`` keys."""
    return starts[:, None] + _key_positions(lens, length)


def _paged_key_index(block_table: torch.Tensor, block_size: int, lens: torch.Tensor, length: int) -> torch.Tensor:
    """Slot (``block * block_size + offset``) of each (sequence, key position) in a paged cache.

    Table entries past a sequence's last used block may be garbage (-1, stale ids); they are never
    read, because positions past the sequence's keys were mapped to its first key.
    """
    pos = _key_positions(lens, length)
    col = (pos // block_size).clamp(max=max(block_table.shape[1] - 1, 0))
    blocks = block_table.long().gather(1, col) if block_table.shape[1] else torch.zeros_like(pos)
    return blocks.clamp(min=0) * block_size + pos % block_size


def _varlen_key_index(cu_seqlens_k: torch.Tensor, block_table: torch.Tensor | None, block_size: int,
                      max_seqlen_k: int, num_rows: int) -> torch.Tensor:
    """``(batch, max_seqlen_k)`` row of each key of ``flash_attn_varlen_func``, in ``[0, num_rows)``."""
    cu_k = cu_seqlens_k.long()
    k_lens = cu_k[1:] - cu_k[:-1]
    if block_table is not None:
        idx = _paged_key_index(block_table, block_size, k_lens, max_seqlen_k)
    else:
        idx = _flat_key_index(cu_k[:-1], k_lens, max_seqlen_k)
    return idx.clamp(0, max(num_rows - 1, 0))


def _cached_lens(cache_seqlens: int | torch.Tensor | None, batch: int, max_keys: int,
                 device: torch.device) -> torch.Tensor:
    """``cache_seqlens`` of ``flash_attn_with_kvcache`` as a long ``(batch,)`` tensor (None: the whole cache)."""
    if isinstance(cache_seqlens, torch.Tensor):
        return cache_seqlens.long()
    return torch.full((batch,), max_keys if cache_seqlens is None else cache_seqlens, dtype=torch.long, device=device)


class _CacheKeys(NamedTuple):
    """Which cached keys each sequence of a ``flash_attn_with_kvcache`` call sees, and where they are."""

    seen: torch.Tensor  # (batch,) keys per sequence
    idx: torch.Tensor  # (batch, max_keys) row of each key in the flattened cache, in range
    valid: torch.Tensor  # (batch, max_keys) bool, key slot is real


def _kvcache_key_index(cache_seqlens: int | torch.Tensor | None, seqlen_new: int, batch: int,
                       block_table: torch.Tensor | None, block_size: int, max_keys: int, num_rows: int,
                       device: torch.device) -> _CacheKeys:
    seen = _cached_lens(cache_seqlens, batch, max_keys, device) + seqlen_new
    if block_table is not None:
        idx = _paged_key_index(block_table, block_size, seen, max_keys)
    else:  # one cache row of max_keys slots per sequence
        idx = torch.arange(batch, device=device)[:, None] * max_keys + _key_positions(seen, max_keys)
    valid = torch.arange(max_keys, device=device)[None, :] < seen[:, None]
    return _CacheKeys(seen, idx.clamp(0, max(num_rows - 1, 0)), valid)


# ---------------------------------------------------------------------------------------------
# The core: masked dense attention over a padded batch.
# ---------------------------------------------------------------------------------------------


def _half_on_cuda(t: torch.Tensor) -> bool:
    return t.is_cuda and t.dtype in (torch.float16, torch.bfloat16)


def _bmm(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``a @ b`` (batched) with products summed in ``acc``.

    On CUDA, half-precision operands go straight to the matrix units with a float32 result: the
    products of bf16/fp16 numbers are exact in float32, so this gives the numbers of upcasting
    first without writing float32 copies of the keys. Elsewhere the operands are upcast.
    """
    if _half_on_cuda(a) and a.dtype == b.dtype and acc == torch.float32:
        return torch.bmm(a, b, out_dtype=acc)
    return torch.bmm(a.to(acc), b.to(acc))


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_lens: torch.Tensor,
    k_lens: torch.Tensor,
    scale: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of padded queries over padded keys.

    q ``(B, Sq, H, D)``; k, v kv-head-major ``(Hk, B, Sk, D)`` (see ``_gather_heads``), with finite
    values in padding slots; ``q_lens``/``k_lens`` ``(B,)`` give how many rows of each sequence
    are real. Returns out ``(B, Sq, H, D)`` in q's dtype and lse ``(B, H, Sq)`` in float32. Padded
    query rows hold meaningless values.
    """
    B, Sq, H, D = q.shape
    Hk, Sk = k.shape[0], k.shape[2]
    G = H // Hk  # query heads per kv head
    acc = torch.promote_types(q.dtype, torch.float32)  # fp16/bf16/fp32 -> fp32, fp64 stays fp64
    device = q.device
    q_lens = q_lens.long()
    k_lens = k_lens.long()

    out = q.new_empty(B, Sq, H, D)
    lse = torch.empty(B, H, Sq, dtype=torch.float32, device=device)
    if Sq == 0 or Sk == 0:
        # No keys at all: every row is fully masked (and reductions over an empty dim would fail).
        return out.zero_(), lse.fill_(float("inf"))

    # (Hk, B, Sk, D) -> (Hk*B, Sk, D): one matrix per (kv head, sequence), no copy.
    kf, vf = k.reshape(Hk * B, Sk, D), v.reshape(Hk * B, Sk, D)
    # Which key slots are real, and the bottom-right causal shift: query i may see key j iff
    # j <= i + (k_len - q_len). Shapes broadcast over scores (Hk, B, G, c, Sk).
    key_pos = torch.arange(Sk, device=device)
    valid = (key_pos[None, :] < k_lens[:, None])[None, :, None, None, :]
    shift = (k_lens - q_lens)[None, :, None, None, None]

    # Queries are processed in chunks only when the whole score tensor would be too large.
    chunk = max(1, min(Sq, MAX_SCORE_ELEMENTS // max(1, B * H * Sk)))
    for start in range(0, Sq, chunk):
        c = min(chunk, Sq - start)
        # (B, c, H, D) -> (Hk, B, G, c, D) -> (Hk*B, G*c, D): head h = kv_head * G + g.
        qc = q[:, start:start + c].reshape(B, c, Hk, G, D).permute(2, 0, 3, 1, 4).reshape(Hk * B, G * c, D)
        scores = _bmm(qc, kf.transpose(1, 2), acc).view(Hk, B, G, c, Sk)
        scores.mul_(scale)

        mask = valid
        if causal:
            q_pos = torch.arange(start, start + c, device=device)[:, None]  # (c, 1)
            mask = mask & (key_pos[None, :] <= q_pos + shift)
        scores.masked_fill_(~mask, float("-inf"))

        # Numerically stable softmax that tolerates rows with no visible key: subtract the row
        # max (0 for an all -inf row, so exp gives 0 instead of NaN), exponentiate, normalise
        # only rows whose sum is positive.
        row_max = scores.amax(dim=-1, keepdim=True)
        row_max = row_max.masked_fill(row_max == float("-inf"), 0.0)
        probs = scores.sub_(row_max).exp_()  # reuses the score buffer
        row_sum = probs.sum(dim=-1, keepdim=True)
        has_key = row_sum > 0

        # On CUDA the probabilities meet half-precision values as flash-attn does: rounded to the
        # value dtype, products summed in float32.
        p = probs.to(v.dtype) if _half_on_cuda(v) else probs
        o = _bmm(p.view(Hk * B, G * c, Sk), vf, acc).view(Hk, B, G, c, D)
        o = torch.where(has_key, o / row_sum, 0.0)  # rows without keys: exactly 0
        out[:, start:start + c] = o.permute(1, 3, 0, 2, 4).reshape(B, c, H, D).to(q.dtype)

        row_lse = torch.where(has_key, row_max + torch.log(row_sum), float("inf"))  # (Hk, B, G, c, 1)
        lse[:, :, start:start + c] = row_lse.permute(1, 0, 2, 3, 4).reshape(B, H, c).float()
    return out, lse


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
    q_pad = _gather_rows(q, cu_q[:-1], max_seqlen_q)
    # 2. Keys/values -> padded, from the flat tensors or through the block table.
    rows_k, rows_v = (k.flatten(0, 1), v.flatten(0, 1)) if paged else (k, v)  # (rows, Hk, D)
    idx = _shared(_varlen_key_index, cu_seqlens_k, block_table, k.shape[1] if paged else 0, max_seqlen_k,
                  rows_k.shape[0])

    # 3. Dense masked attention over the padded batch.
    if CPU_FUSED_DECODE and not return_attn_probs and q.device.type == "cpu" and batch and max_seqlen_q:
        k_pad, v_pad = _gather_slots(rows_k, idx), _gather_slots(rows_v, idx)  # (B, Sk, Hk, D)
        if causal and torch.equal(cu_seqlens_q, cu_seqlens_k):  # on CPU, reading the lengths is free
            out_pad = _prompt_sdpa(q_pad, k_pad, v_pad, scale)
        else:
            out_pad = _attend_sdpa(q_pad, k_pad, v_pad, q_lens, k_lens, scale, causal)
        lse_pad = None
    else:
        k_pad, v_pad = _gather_heads(rows_k, idx), _gather_heads(rows_v, idx)  # (Hk, B, Sk, D)
        out_pad, lse_pad = _attend(q_pad, k_pad, v_pad, q_lens, k_lens, scale, causal)

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
        cached = _cached_lens(cache_seqlens, batch, max_keys, q.device)
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
            seen = _cached_lens(cache_seqlens, batch, max_keys, q.device) + seqlen_new
        out, lse = triton_decode.paged_decode(q, k_cache, v_cache, block_table, seen, scale)
        return (out, lse) if return_softmax_lse else out

    # 2. The keys each sequence sees, padded to max_keys per sequence.
    rows_k, rows_v = k_cache.flatten(0, 1), v_cache.flatten(0, 1)
    keys = _shared(_kvcache_key_index, cache_seqlens, seqlen_new, batch, block_table, k_cache.shape[1],
                   max_keys, rows_k.shape[0], q.device)

    # 3. Attention; every sequence has exactly seqlen_q queries.
    if CPU_FUSED_DECODE and seqlen_q == 1 and not return_softmax_lse and q.device.type == "cpu":
        return _decode_sdpa(q, _gather_slots(rows_k, keys.idx), _gather_slots(rows_v, keys.idx), keys.valid, scale)
    k_pad, v_pad = _gather_heads(rows_k, keys.idx), _gather_heads(rows_v, keys.idx)
    q_lens = torch.full((batch,), seqlen_q, dtype=torch.long, device=q.device)
    out, lse = _attend(q, k_pad, v_pad, q_lens, keys.seen, scale, causal)
    if return_softmax_lse:
        return out, lse
    return out


#: On CPU, use PyTorch's fused SDPA instead of the op-by-op ``_attend`` when no log-sum-exp is
#: asked for (same math; tests compare both paths against the float64 reference).
CPU_FUSED_DECODE = True


def _attend_sdpa(q: torch.Tensor, k_pad: torch.Tensor, v_pad: torch.Tensor, q_lens: torch.Tensor,
                 k_lens: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    """``_attend`` through ``F.scaled_dot_product_attention``: q (B, Sq, H, D), k/v (B, Sk, Hk, D).

    The G query heads of a kv head become G blocks of query rows of that head (GQA without
    copying K/V); the mask says which key each row may see (real key, bottom-right causal).
    Rows that see no key come out of SDPA as NaN and are set to 0, as flash-attn returns.
    """
    B, Sq, H, D = q.shape
    Sk, Hk = k_pad.shape[1], k_pad.shape[2]
    G = H // Hk
    qh = q.reshape(B, Sq, Hk, G, D).permute(0, 2, 3, 1, 4).reshape(B, Hk, G * Sq, D)
    key = torch.arange(Sk, device=q.device)
    mask = (key[None, :] < k_lens[:, None])[:, None, :]  # (B, 1, Sk)
    if causal:
        qpos = torch.arange(Sq, device=q.device)
        shift = (k_lens - q_lens).long()
        mask = mask & (key[None, None, :] <= qpos[None, :, None] + shift[:, None, None])  # (B, Sq, Sk)
    mask = mask.expand(B, Sq, Sk)[:, None, None].expand(B, 1, G, Sq, Sk).reshape(B, 1, G * Sq, Sk)
    k, v = k_pad.transpose(1, 2).to(q.dtype), v_pad.transpose(1, 2).to(q.dtype)  # (B, Hk, Sk, D) views
    out = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask, scale=scale)
    out = torch.where(mask.any(-1, keepdim=True), out, 0.0)
    return out.view(B, Hk, G, Sq, D).permute(0, 3, 1, 2, 4).reshape(B, Sq, H, D)


def _prompt_sdpa(q: torch.Tensor, k_pad: torch.Tensor, v_pad: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of whole prompts (every sequence's queries are all its keys) on CPU.

    Queries and keys then share positions, so the plain causal mask of SDPA is exactly the right
    one for every real row, and no mask tensor is needed: the fused kernel skips the blocks above
    the diagonal. Real rows never see padding keys (they sit after the sequence's last query);
    padded query rows are computed and dropped. K/V heads are repeated for the query heads,
    because a causal kernel cannot use the stacked-rows GQA layout of ``_attend_sdpa``.
    """
    B, Sq, H, D = q.shape
    Sk, Hk = k_pad.shape[1], k_pad.shape[2]
    G = H // Hk

    def per_head(x: torch.Tensor) -> torch.Tensor:  # (B, Sk, Hk, D) -> (B, H, Sk, D)
        return x.transpose(1, 2)[:, :, None].expand(B, Hk, G, Sk, D).reshape(B, H, Sk, D).to(q.dtype)

    out = F.scaled_dot_product_attention(q.transpose(1, 2), per_head(k_pad), per_head(v_pad), is_causal=True,
                                         scale=scale)
    return out.transpose(1, 2)  # (B, Sq, H, D)


def _decode_sdpa(q: torch.Tensor, k_pad: torch.Tensor, v_pad: torch.Tensor, valid: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """One query per sequence on CPU: PyTorch's fused SDPA instead of the op-by-op ``_attend``.

    q (B, 1, H, D), k/v (B, S, Hk, D), ``valid`` (B, S) marks real key slots. A single query sees
    every key its sequence has (bottom-right causal with sq = 1), so the only mask is ``valid``.
    The G query heads sharing a kv head are laid out as G query rows of that head, which is GQA
    without copying K/V and works on torch 2.4. Same math as ``_attend``.
    """
    B, _, H, D = q.shape
    Hk = k_pad.shape[2]
    if k_pad.shape[1] == 0:  # no keys at all
        return q.new_zeros(q.shape)
    qh = q.view(B, Hk, H // Hk, D)  # head h = kv_head * G + g
    k, v = k_pad.transpose(1, 2).to(q.dtype), v_pad.transpose(1, 2).to(q.dtype)  # (B, Hk, S, D) views
    out = F.scaled_dot_product_attention(qh, k, v, attn_mask=valid[:, None, None, :], scale=scale)
    # A sequence with no key at all gets 0, like flash-attn (SDPA would give NaN).
    out = torch.where(valid[:, :1, None, None], out, 0.0)
    return out.reshape(B, 1, H, D)


BACKEND = AttentionBackend(
    name="torch",
    varlen=flash_attn_varlen_func,
    with_kvcache=flash_attn_with_kvcache,
    block_size_multiple=1,
    forward_scope=reuse_key_indices,
)
