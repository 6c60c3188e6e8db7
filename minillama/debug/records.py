"""JSON-able descriptions of what happened: tensor statistics and scheduler-step summaries.

These dicts are the common language of the live session, the trace on disk and the TUI.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch


def tensor_stats(t: torch.Tensor) -> dict[str, Any]:
    """Shape, dtype, mean, std, absmax, NaN and Inf counts, and a content hash of ``t``."""
    x = t.detach()
    f = x.float()
    n_nan = n_inf = 0
    if not bool(torch.isfinite(f).all()):  # the common case costs one reduction
        n_nan, n_inf = int(torch.isnan(f).sum()), int(torch.isinf(f).sum())
        f = f[torch.isfinite(f)]
    numel = f.numel()
    if numel > 1:
        std, mean = torch.std_mean(f)
        lo, hi = torch.aminmax(f)
        mean_v, std_v, absmax = float(mean), float(std), max(-float(lo), float(hi))
    else:
        mean_v = float(f.sum()) if numel else math.nan
        std_v, absmax = 0.0, (abs(mean_v) if numel else 0.0)
    return {
        "shape": list(x.shape),
        "dtype": str(x.dtype).removeprefix("torch."),
        "mean": mean_v,
        "std": std_v,
        "absmax": absmax,
        "nan": n_nan,
        "inf": n_inf,
        "hash": content_hash(x),
    }


def content_hash(t: torch.Tensor) -> str:
    """A short hash of the tensor's bytes: equal hashes mean bit-identical values."""
    data = t.detach().contiguous().cpu()
    if data.dtype == torch.bfloat16:
        data = data.view(torch.int16)
    return hashlib.blake2b(data.numpy().tobytes(), digest_size=8).hexdigest()


def row_ranges(seq_ids: list[int], query_lens: list[int]) -> list[list[int]]:
    """``[seq_id, start, end]`` per request: which rows of a flat batch tensor belong to it."""
    out, start = [], 0
    for sid, n in zip(seq_ids, query_lens, strict=True):
        out.append([sid, start, start + n])
        start += n
    return out


def step_summary(step: int, batch, engine) -> dict[str, Any]:
    """Everything a person wants to know about a scheduled step, before it runs."""
    bm = engine.block_manager
    bs = bm.block_size
    seqs = []
    slot_mapping = []
    for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
        start = seq.num_computed_tokens
        slots = [seq.block_table[p // bs] * bs + p % bs for p in range(start, start + n)]
        slot_mapping += slots
        seqs.append({
            "seq_id": seq.seq_id,
            "prompt_len": seq.num_prompt_tokens,
            "len": len(seq),
            "num_computed": start,
            "num_new": n,
            "chunk": [start, start + n],
            "num_cached": seq.num_cached_tokens,
            "block_table": list(seq.block_table),
            "preemptions": seq.num_preemptions,
            "samples": start + n == len(seq),
        })
    used = sorted(bm.used_block_ids)
    return {
        "step": step,
        "phase": batch.phase,
        "num_tokens": batch.num_tokens,
        "seqs": seqs,
        "cu_seqlens_q": _cumsum([s["num_new"] for s in seqs]),
        "context_lens": [s["num_computed"] + s["num_new"] for s in seqs],
        "slot_mapping": slot_mapping,
        "block_size": bs,
        "num_blocks": len(bm.blocks),
        "num_free_blocks": bm.num_free_blocks,
        "blocks": {str(b): {"ref": bm.blocks[b].ref_count, "cached": bm.blocks[b].hash != -1} for b in used},
        "num_cached_free_blocks": sum(1 for b in bm.free_block_ids if bm.blocks[b].hash != -1),
        "prefix_hit_tokens_total": bm.num_cache_hit_tokens,
        "preempted": [s.seq_id for s in batch.preempted],
        "preemptions_total": engine.scheduler.num_preemptions,
        "waiting": [s.seq_id for s in engine.scheduler.waiting],
    }


def _cumsum(xs: list[int]) -> list[int]:
    out = [0]
    for x in xs:
        out.append(out[-1] + x)
    return out
