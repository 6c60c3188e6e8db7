"""The attention layer: write new K/V into the paged cache, then call the backend.

It reads the step's metadata from the context and never names a backend: the one it was given
is used for prefill (``varlen``) and decode (``with_kvcache``) alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from minillama import hooks
from minillama.context import Context, get_context
from minillama.layers import invariant_attention, triton_ops


def store_kvcache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor) -> None:
    """Write each new token's K/V at its slot (block * block_size + offset) of the paged cache.

    Slot -1 means "skip" (padding in a captured decode graph). To stay free of host syncs those
    rows are sent to the cache's spare last block, which the block manager never hands out.
    On the GPU one Triton kernel writes K and V and skips those rows (``triton_ops.store_kv``).
    """
    if triton_ops.store_kv_covers(k, k_cache):
        triton_ops.store_kv(k, v, k_cache, v_cache, slot_mapping)
        return
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    spare = num_slots - 1
    slots = torch.where(slot_mapping >= 0, slot_mapping, spare)
    k_cache.view(num_slots, *k_cache.shape[2:]).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(num_slots, *v_cache.shape[2:]).index_copy_(0, slots, v.to(v_cache.dtype))


@dataclass
class AttentionCall:
    """Everything one attention call saw, so a shadow backend can redo it on the same cache."""

    layer: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    context: Context
    scale: float


class Attention(nn.Module):
    def __init__(self, layer: int, num_heads: int, num_kv_heads: int, head_dim: int, backend) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5
        self.backend = backend
        self.k_cache = self.v_cache = torch.empty(0)  # set by the model runner

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (tokens, heads, head_dim), k/v (tokens, kv_heads, head_dim) -> (tokens, heads, head_dim)."""
        ctx = get_context()
        if self.k_cache.numel():
            store_kvcache(k, v, self.k_cache, self.v_cache, ctx.slot_mapping)
        out = run_attention(self.backend, q, k, v, self.k_cache, self.v_cache, ctx, self.scale)
        if hooks.enabled:
            call = AttentionCall(self.layer, q, k, v, self.k_cache, self.v_cache, ctx, self.scale)
            hooks.emit(f"layers.{self.layer}.attn.call", out, call=call)
        return out


def run_attention(backend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, ctx: Context, scale: float) -> torch.Tensor:
    """One attention call with ``backend`` on a step's inputs (also used by the shadow debugger)."""
    if ctx.batch_invariant and not backend.batch_invariant:
        return invariant_attention.attention(q, k, v, k_cache, v_cache, ctx, scale)
    if ctx.is_prefill:
        if ctx.block_tables is not None:  # some keys come from the cache: read them all from there
            k, v = k_cache, v_cache
        return backend.varlen(q, k, v, ctx.cu_seqlens_q, ctx.cu_seqlens_k, ctx.max_seqlen_q, ctx.max_seqlen_k,
                              softmax_scale=scale, causal=True, block_table=ctx.block_tables)
    out = backend.with_kvcache(q.unsqueeze(1), k_cache, v_cache, cache_seqlens=ctx.context_lens,
                               block_table=ctx.block_tables, softmax_scale=scale, causal=True)
    return out.squeeze(1)
