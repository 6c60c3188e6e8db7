"""Argument checks shared by the backends that re-implement flash-attn's two entry points.

Only Python-side metadata is looked at (shapes, dtypes, devices), never tensor values, so a check
never waits for the GPU. Every failure is a ``BackendError`` whose message is one line naming the
function, the problem and the fix.
"""

from __future__ import annotations

import torch

from minillama.attention.backend import BackendError


def fail(fn: str, problem: str, fix: str) -> BackendError:
    """The error for ``fn``: one line, problem then fix."""
    return BackendError(f"{fn}: {problem}: {fix}")


def reject_unsupported(fn: str, backend: str, **options: tuple[object, object]) -> None:
    """Raise for each option given a value other than its default: ``name=(value, default)``."""
    for name, (value, default) in options.items():
        if value is default:  # the common case, checked first: this runs on every call
            continue
        if default is None:
            given = value is not None
        elif isinstance(default, tuple):
            given = tuple(value) != default  # window_size may come as a list
        else:
            given = value != default
        if given:
            # Tensors are described by shape: their repr would span many lines.
            shown = f"<tensor of shape {tuple(value.shape)}>" if isinstance(value, torch.Tensor) else repr(value)
            raise fail(fn, f"{name}={shown} is not supported by the {backend} attention backend",
                       f"leave {name} at its default ({default!r}) or use --backend flash-attn")


def check_int32(fn: str, name: str, t: torch.Tensor, ndim: int) -> None:
    """``t`` must be an int32 tensor of ``ndim`` dims (flash-attn's rule for its metadata tensors)."""
    if t.dtype != torch.int32:
        raise fail(fn, f"{name} must have dtype torch.int32 (flash-attn requires it), got {t.dtype}",
                   f"pass {name}.to(torch.int32)")
    if t.dim() != ndim:
        raise fail(fn, f"{name} must be {ndim}-D, got shape {tuple(t.shape)}", f"reshape {name}")


def check_qkv(fn: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_dim: int, kv_dim: int) -> None:
    """Layouts, one dtype and device, one head size, and nheads a multiple of nheads_k."""
    if q.dim() != q_dim or k.dim() != kv_dim or v.dim() != kv_dim:
        raise fail(fn, f"expected q of {q_dim} dims and k/v of {kv_dim} dims, got shapes "
                   f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}", "see the docstring for the layouts")
    if k.shape != v.shape:
        raise fail(fn, f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}",
                   "pass matching key and value tensors")
    if not (q.dtype == k.dtype == v.dtype):
        raise fail(fn, f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}",
                   "cast them to the model dtype")
    if not (q.device == k.device == v.device):
        raise fail(fn, f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}",
                   "move them to the same device")
    if not q.dtype.is_floating_point:
        raise fail(fn, f"q must be floating point, got {q.dtype}", "cast q, k, v to float")
    if q.shape[-1] != k.shape[-1]:
        raise fail(fn, f"q has headdim {q.shape[-1]} but k has {k.shape[-1]}", "use the same head size")
    nheads, nheads_k = q.shape[-2], k.shape[-2]
    if nheads_k == 0 or nheads % nheads_k != 0:
        raise fail(fn, f"nheads ({nheads}) must be a multiple of nheads_k ({nheads_k}) for grouped-query "
                   "attention", "check the model's num_attention_heads / num_key_value_heads")


def check_block_table(fn: str, block_table: torch.Tensor, batch: int) -> None:
    """An int32 ``(batch, max_blocks)`` block table."""
    check_int32(fn, "block_table", block_table, 2)
    if block_table.shape[0] != batch:
        raise fail(fn, f"block_table has {block_table.shape[0]} rows for a batch of {batch}",
                   "pass one block-table row per sequence")


def check_varlen(fn: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                 cu_seqlens_k: torch.Tensor, block_table: torch.Tensor | None) -> int:
    """Everything ``flash_attn_varlen_func`` checks; returns the batch size."""
    check_qkv(fn, q, k, v, q_dim=3, kv_dim=4 if block_table is not None else 3)
    check_int32(fn, "cu_seqlens_q", cu_seqlens_q, 1)
    check_int32(fn, "cu_seqlens_k", cu_seqlens_k, 1)
    batch = cu_seqlens_q.shape[0] - 1
    if batch < 0 or cu_seqlens_k.shape[0] != batch + 1:
        raise fail(fn, f"cu_seqlens_q and cu_seqlens_k must both have batch+1 entries, got "
                   f"{cu_seqlens_q.shape[0]} and {cu_seqlens_k.shape[0]}", "build them from the same batch")
    if block_table is not None:
        check_block_table(fn, block_table, batch)
    return batch


def check_kvcache(fn: str, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor | None,
                  v: torch.Tensor | None, cache_seqlens: int | torch.Tensor | None,
                  block_table: torch.Tensor | None) -> int:
    """Everything ``flash_attn_with_kvcache`` checks; returns how many keys a sequence can hold."""
    check_qkv(fn, q, k_cache, v_cache, q_dim=4, kv_dim=4)
    batch, headdim = q.shape[0], q.shape[-1]
    if block_table is not None:
        check_block_table(fn, block_table, batch)
        max_keys = block_table.shape[1] * k_cache.shape[1]
    else:
        if k_cache.shape[0] < batch:
            raise fail(fn, f"the KV cache holds {k_cache.shape[0]} sequences for a batch of {batch}",
                       "allocate one cache row per sequence or pass a block_table")
        max_keys = k_cache.shape[1]
    if cache_seqlens is None:
        if k is not None:
            raise fail(fn, "appending k/v needs cache_seqlens (where to write them)", "pass cache_seqlens")
    elif not isinstance(cache_seqlens, int):
        check_int32(fn, "cache_seqlens", cache_seqlens, 1)
        if cache_seqlens.shape[0] != batch:
            raise fail(fn, f"cache_seqlens has {cache_seqlens.shape[0]} entries for a batch of {batch}",
                       "pass one length per sequence")
    if k is not None or v is not None:
        if k is None or v is None:
            raise fail(fn, "k and v must be given together", "pass both new keys and new values")
        expected = (batch, k.shape[1], k_cache.shape[2], headdim)
        if tuple(k.shape) != expected or tuple(v.shape) != expected:
            raise fail(fn, f"new k/v must have shape (batch, seqlen_new, nheads_k, headdim) = {expected}, got "
                       f"{tuple(k.shape)} and {tuple(v.shape)}", "reshape the new keys/values")
        if k.dtype != k_cache.dtype or v.dtype != v_cache.dtype:
            raise fail(fn, f"new k/v dtype {k.dtype} differs from the cache's {k_cache.dtype}",
                       "cast them to the cache dtype")
    return max_keys
