"""The ``triton`` backend: flash-attn's two entry points on Triton kernels.

Prefill (``flash_attn_varlen_func``, flat or paged keys) runs ``triton_prefill.py``; a paged
decode call (``flash_attn_with_kvcache`` with one query per sequence) runs ``triton_decode.py``.
Both read K/V straight from the cache, never copying it. The other ``flash_attn_with_kvcache``
calls, which the engine never makes (several queries per sequence, a contiguous cache), go to
the torch backend's code after the same checks and append. Needs an importable Triton and a
CUDA GPU (or ``TRITON_INTERPRET=1``, which runs the kernels on CPU tensors, for tests).
"""

from __future__ import annotations

import math

import torch

from minillama.attention import triton_decode, triton_prefill
from minillama.attention.backend import AttentionBackend, BackendError
from minillama.attention.checks import check_kvcache, check_varlen, reject_unsupported
from minillama.attention.paged_gather import reuse_key_indices
from minillama.attention.torch_ref import append_kv, attend_kvcache
from minillama.attention.torch_ref import flash_attn_varlen_func as torch_varlen


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
    """``flash_attn.flash_attn_varlen_func`` on the Triton prefill kernel; same arguments and results
    as the torch backend's (see ``torch_ref.flash_attn_varlen_func``)."""
    fn = "flash_attn_varlen_func"
    reject_unsupported(fn, "triton", dropout_p=(dropout_p, 0.0), window_size=(window_size, (-1, -1)),
                       softcap=(softcap, 0.0), alibi_slopes=(alibi_slopes, None))
    check_varlen(fn, q, k, v, cu_seqlens_q, cu_seqlens_k, block_table)
    if not (triton_decode.usable(q, k, v) and q.stride(-1) == 1):
        return torch_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=softmax_scale,
                            causal=causal, return_attn_probs=return_attn_probs, block_table=block_table)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out, lse = triton_prefill.varlen_prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, scale, causal,
                                             block_table)
    return (out, lse, q.new_empty(0)) if return_attn_probs else out


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
    """``flash_attn.flash_attn_with_kvcache``; a paged decode runs the Triton decode kernel. Same
    arguments and results as the torch backend's (see ``torch_ref.flash_attn_with_kvcache``)."""
    fn = "flash_attn_with_kvcache"
    reject_unsupported(fn, "triton", rotary_cos=(rotary_cos, None), rotary_sin=(rotary_sin, None),
                       cache_batch_idx=(cache_batch_idx, None), cache_leftpad=(cache_leftpad, None),
                       window_size=(window_size, (-1, -1)), softcap=(softcap, 0.0),
                       alibi_slopes=(alibi_slopes, None))
    del rotary_interleaved, num_splits
    max_keys = check_kvcache(fn, q, k_cache, v_cache, k, v, cache_seqlens, block_table)
    seqlen_new = append_kv(q, k_cache, v_cache, k, v, cache_seqlens, block_table, max_keys)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if q.shape[1] != 1 or block_table is None or not triton_decode.usable(q, k_cache, v_cache):
        return attend_kvcache(q, k_cache, v_cache, cache_seqlens, seqlen_new, block_table, max_keys, scale, causal,
                              return_softmax_lse)
    # One query per sequence sees every key it has, so causal changes nothing here.
    if isinstance(cache_seqlens, torch.Tensor) and not seqlen_new:
        seen = cache_seqlens
    elif isinstance(cache_seqlens, torch.Tensor):
        seen = cache_seqlens + seqlen_new
    else:
        full = max_keys if cache_seqlens is None else cache_seqlens + seqlen_new
        seen = torch.full((q.shape[0],), full, dtype=torch.int32, device=q.device)
    out, lse = triton_decode.paged_decode(q, k_cache, v_cache, block_table, seen, scale)
    return (out, lse) if return_softmax_lse else out


class TritonBackend(AttentionBackend):
    """``AttentionBackend`` whose ``check`` knows what the Triton kernels take."""

    def check(self, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        """Raise ``BackendError`` unless the kernels can run these heads (CUDA, fp16/bf16/fp32, 16..256, power of 2)."""
        device = torch.device(device)
        if device.type != "cuda" and not triton_decode.interpreting():
            raise BackendError(f"attention backend '{self.name}' runs only on CUDA devices, got device '{device}': "
                               "use --device cuda or --backend torch")
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise BackendError(f"attention backend '{self.name}' supports float16/bfloat16/float32, got {dtype}: "
                               "use --dtype bfloat16 or --backend torch")
        if not triton_decode.covers(head_dim, device):
            raise BackendError(f"attention backend '{self.name}' needs a power-of-two head_dim from 16 to 256, this "
                               f"model has {head_dim}: use --backend torch")


def load() -> AttentionBackend:
    """The backend; ``BackendError`` if Triton cannot be imported here."""
    if triton_decode.triton is None:
        raise BackendError("attention backend 'triton' needs the triton package, which is not importable here: "
                           "install triton on a CUDA machine or use --backend torch")
    return TritonBackend(name="triton", varlen=flash_attn_varlen_func, with_kvcache=flash_attn_with_kvcache,
                         block_size_multiple=1, forward_scope=reuse_key_indices)
