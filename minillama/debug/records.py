"""What the recorder knows about a step on the host, and how a step's raw tables become the trace's.

Two halves, split by thread: ``capture_batch`` runs on the engine's thread when a step begins and
copies only the few numbers that change later (cheap even at hundreds of requests); everything
else (the JSON summary, the decoded statistics, the block tables) is built by ``StepRecord.finish``
on the trace writer's thread, or on demand by a live view.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from minillama.debug.devstats import keys_to_float
from minillama.trace.format import SAMPLE_SITES, T_BAD, T_HASH, T_SHADOW, T_STATS


@dataclass(frozen=True)
class SiteSpec:
    """One tensor site of the catalog: its trailing shape, dtype and which rows it has."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    rows: str  # "tokens" (one per new token) or "samples" (one per sampling request)

    @property
    def width(self) -> int:
        return math.prod(self.shape)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "rows": self.rows}


def site_catalog(model_config, dtype: torch.dtype) -> list[SiteSpec]:
    """Every tensor site of the model, in firing order (the tables' site axis)."""
    from minillama import hooks

    c = model_config
    dims = {"hidden": c.hidden_size, "heads": c.num_attention_heads, "kv_heads": c.num_key_value_heads,
            "head_dim": c.head_dim, "vocab": c.vocab_size}
    act = str(dtype).removeprefix("torch.")
    out = []
    for name in hooks.expected_sites(c.num_hidden_layers):
        kind = "samples" if name in SAMPLE_SITES else "tokens"
        dt = {"logits": "float32", "sampled": "int64"}.get(name, act)
        out.append(SiteSpec(name, hooks.site_shape(name, dims), dt, kind))
    return out


def capture_batch(batch, engine) -> dict[str, Any]:
    """The batch as it is scheduled: plain numbers copied now, since sequences change as they run."""
    bm = engine.block_manager
    return {
        "seqs": [(s.seq_id, s.num_prompt_tokens, len(s), s.num_computed_tokens, n, s.num_cached_tokens,
                  list(s.block_table), s.num_preemptions)
                 for s, n in zip(batch.seqs, batch.num_new_tokens, strict=True)],
        "blocks": [(b, bm.blocks[b].ref_count, bm.blocks[b].hash != -1) for b in bm.used_block_ids],
        "phase": batch.phase,
        "preempted": [s.seq_id for s in batch.preempted],
        "waiting": [s.seq_id for s in engine.scheduler.waiting],
        "free": bm.num_free_blocks,
        "cached_free": sum(1 for b in bm.free_block_ids if bm.blocks[b].hash != -1) if len(bm.blocks) < 4096 else None,
        "hits": bm.num_cache_hit_tokens,
        "preemptions": engine.scheduler.num_preemptions,
        "block_size": bm.block_size,
        "num_blocks": len(bm.blocks),
    }


def batch_summary(raw: dict[str, Any]) -> dict[str, Any]:
    """The trace's ``batch`` object (traces/README.md) from ``capture_batch``'s numbers."""
    seqs = []
    for sid, plen, length, start, n, cached, table, pre in raw["seqs"]:
        seqs.append({"seq_id": sid, "prompt_len": plen, "len": length, "num_computed": start, "num_new": n,
                     "chunk": [start, start + n], "num_cached": cached, "block_table": table, "preemptions": pre,
                     "samples": start + n == length, "recompute": n > 1 and start + n > plen})
    cu = [0]
    for s in seqs:
        cu.append(cu[-1] + s["num_new"])
    return {"phase": raw["phase"], "num_tokens": cu[-1], "seqs": seqs, "cu_seqlens_q": cu,
            "context_lens": [s["num_computed"] + s["num_new"] for s in seqs], "block_size": raw["block_size"],
            "num_blocks": raw["num_blocks"], "num_free_blocks": raw["free"],
            "blocks": {str(b): {"ref": ref, "cached": c} for b, ref, c in sorted(raw["blocks"])},
            "num_cached_free_blocks": raw["cached_free"], "prefix_hit_tokens_total": raw["hits"],
            "preempted": raw["preempted"], "preemptions_total": raw["preemptions"], "waiting": raw["waiting"]}


def batch_tensors(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """``batch.block_tables`` (padded with -1) and ``batch.slot_mapping`` of a batch summary."""
    seqs, bs = batch["seqs"], batch["block_size"]
    width = max((len(s["block_table"]) for s in seqs), default=0)
    tables = np.full((len(seqs), width), -1, dtype=np.int32)
    slots = []
    for i, s in enumerate(seqs):
        bt = np.asarray(s["block_table"], dtype=np.int64)
        tables[i, : len(bt)] = bt
        p = np.arange(s["chunk"][0], s["chunk"][1])
        slots.append(bt[p // bs] * bs + p % bs if len(p) else np.zeros(0, np.int64))
    slot_mapping = np.concatenate(slots) if slots else np.zeros(0, np.int64)
    return {"batch.block_tables": torch.from_numpy(tables), "batch.slot_mapping": torch.from_numpy(slot_mapping)}


def decode_tables(raw: dict[str, np.ndarray], catalog: list[SiteSpec], batch: dict[str, Any],
                  shadow: bool) -> dict[str, np.ndarray]:
    """A step's raw device tables (``stepbuf.views``) -> the trace's tables, as ``TraceReader.tables`` gives them."""
    seqs = batch["seqs"]
    tokens = np.array([s["num_new"] for s in seqs], dtype=np.float64)
    samples = np.array([1.0 if s["samples"] else 0.0 for s in seqs])
    rows = np.stack([samples if spec.rows == "samples" else tokens for spec in catalog], axis=1)  # (R, S)
    width = np.array([spec.width for spec in catalog], dtype=np.float64)
    bad = raw["bad"].astype(np.float64)
    n = rows * width - bad[..., 0] - bad[..., 1]
    s, ss = raw["moments"][..., 0], raw["moments"][..., 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = s / n
        var = np.maximum(ss - s * mean, 0.0) / np.maximum(n - 1, 1)
    std = np.where(n > 1, np.sqrt(var), np.where(n == 1, 0.0, np.nan))
    lo, hi = keys_to_float(raw["keys"][..., 0]), keys_to_float(raw["keys"][..., 1])
    r_idx, s_idx = np.nonzero(raw["bad"].any(-1))
    sparse = np.stack([s_idx, r_idx, raw["bad"][r_idx, s_idx, 0], raw["bad"][r_idx, s_idx, 1]], axis=1)
    return {"stats": np.stack([mean, std, lo, hi], axis=-1).astype(np.float32),
            "bad": sparse.astype(np.int32).reshape(-1, 4), "hash": np.ascontiguousarray(raw["lanes"]),
            "shadow": np.ascontiguousarray(raw["shadow"]) if shadow else None}


def table_tensors(tables: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The tables under their tensor names in a step's blob."""
    names = {"stats": T_STATS, "bad": T_BAD, "hash": T_HASH, "shadow": T_SHADOW}
    return {names[k]: torch.from_numpy(v) for k, v in tables.items() if v is not None}


@dataclass
class StepRecord:
    """One recorded step: its event (JSON), its device snapshot and full tensors, decoded on demand."""

    step: int
    event: dict[str, Any]
    raw_batch: dict[str, Any]
    snapshot: Any  # stepbuf.Snapshot
    full: dict[str, torch.Tensor] = field(default_factory=dict)
    _tables: dict[str, np.ndarray] | None = None

    def batch(self) -> dict[str, Any]:
        if "batch" not in self.event:
            self.event["batch"] = batch_summary(self.raw_batch)
        return self.event["batch"]

    def tables(self, catalog: list[SiteSpec], shadow: bool) -> dict[str, np.ndarray] | None:
        """The decoded statistics tables (waits for the step's copies to land)."""
        if self._tables is None and self.snapshot is not None:
            self._tables = decode_tables(self.snapshot.tables(), catalog, self.batch(), shadow)
        return self._tables
