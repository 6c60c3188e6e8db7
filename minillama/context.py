"""The step context: the tensors every attention layer of one forward pass needs.

Set once per step by the model runner, read by each ``Attention`` layer, so the model's forward
keeps a plain ``(input_ids, positions)`` signature. It lives below ``engine/`` and ``layers/`` so
that both take it from beneath them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Context:
    """Per-step attention metadata, vLLM names.

    ``is_prefill`` selects ``flash_attn_varlen_func`` (prefill, chunked prefill, mixed batches);
    otherwise every sequence adds one token and ``flash_attn_with_kvcache`` runs (decode).
    """

    is_prefill: bool = False
    cu_seqlens_q: torch.Tensor | None = None  # (batch+1,) int32, offsets of each sequence's new tokens
    cu_seqlens_k: torch.Tensor | None = None  # (batch+1,) int32, offsets of each sequence's keys
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    slot_mapping: torch.Tensor | None = None  # (num_tokens,) int64 cache slot of each new token, -1 = skip
    context_lens: torch.Tensor | None = None  # (batch,) int32, keys per sequence (decode)
    block_tables: torch.Tensor | None = None  # (batch, max_blocks) int32, None if no key comes from the cache
    # for the debugger (set only while a hook listener is attached): which request and token position
    # each row is, on the device, so hook sites need no host data; and the rows that sample
    positions: torch.Tensor | None = None  # (num_tokens,) int64 token position of each row
    seq_index: torch.Tensor | None = None  # (num_tokens,) int32 index in the batch of each row's request
    sample_rows: torch.Tensor | None = None  # (num_samples,) int64 rows whose logits are sampled
    sample_index: torch.Tensor | None = None  # (num_samples,) int32 their requests' batch indices
    sample_positions: torch.Tensor | None = None  # (num_samples,) int64 their token positions
    seq_ids: list[int] = field(default_factory=list)
    query_lens: list[int] = field(default_factory=list)
    key_lens: list[int] = field(default_factory=list)  # keys per sequence (prefill; host copies of cu_seqlens_k)
    step: int = -1
    # batch-invariant mode (Config.batch_invariant): layers and attention compute each row independently
    batch_invariant: bool = False


_CONTEXT = Context()


def set_context(ctx: Context) -> None:
    global _CONTEXT
    _CONTEXT = ctx


def get_context() -> Context:
    return _CONTEXT


def reset_context() -> None:
    set_context(Context())
