"""What the recorder knows about a step on the host, and how a step's raw tables become the trace's.

Two halves, split by thread: ``capture_batch`` runs on the engine's thread when a step begins and
copies only the few numbers that change later (cheap even at hundreds of requests); everything
else (the JSON summary, the decoded statistics, the block tables) is built by ``StepRecord.finish``
on the trace writer's thread, or on demand by a live view.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import chain
from operator import attrgetter
from typing import Any

import numpy as np
import torch

from minillama.trace.batch import (
    FLAG_RECOMPUTE,
    FLAG_SAMPLES,
    SEQ_COLUMNS,
    T_BLOCKS,
    T_SEQS,
    T_TABLES,
    summary,
)
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


_SEQ_NUMBERS = attrgetter("seq_id", "num_prompt_tokens", "num_computed_tokens", "num_cached_tokens", "num_preemptions")
_TOKEN_IDS, _BLOCK_TABLE = attrgetter("token_ids"), attrgetter("block_table")


def capture_batch(batch, engine) -> dict[str, Any]:
    """The batch as it is scheduled: plain numbers copied now, since sequences change as they run.

    ``seqs`` is already the blob's ``(R, 8)`` table of ``SEQ_COLUMNS``, filled by C-level loops
    (this runs on the engine's thread at every step); ``tables`` the requests' block lists, copied.
    """
    bm = engine.block_manager
    used = np.flatnonzero(bm.ref_counts)
    r, cols = len(batch.seqs), len(SEQ_COLUMNS)
    seqs = np.zeros((r, cols), dtype=np.int64)
    if r:  # C-level loops over the requests (map, fromiter): hundreds of them, every step
        seqs[:, [0, 1, 3, 5, 6]] = np.fromiter(chain.from_iterable(map(_SEQ_NUMBERS, batch.seqs)), np.int64,
                                               5 * r).reshape(r, 5)
        seqs[:, 2] = np.fromiter(map(len, map(_TOKEN_IDS, batch.seqs)), np.int64, r)
        seqs[:, 4] = batch.num_new_tokens
    plen, length, start, new = seqs[:, 1], seqs[:, 2], seqs[:, 3], seqs[:, 4]
    seqs[:, 7] = np.where(samples_this_step(start, new, length), FLAG_SAMPLES, 0) | \
        np.where((new > 1) & (start + new > plen), FLAG_RECOMPUTE, 0)
    return {
        "seqs": seqs,
        "tables": list(map(list, map(_BLOCK_TABLE, batch.seqs))),
        "blocks": np.stack([used, bm.ref_counts[used], bm.hashed[used]], axis=1),  # (block, refs, cached)
        "phase": batch.phase,
        "preempted": [s.seq_id for s in batch.preempted],
        "waiting": [s.seq_id for s in engine.scheduler.waiting],
        "kv": {"block_size": bm.block_size, "num_blocks": len(bm.blocks), "num_free_blocks": bm.num_free_blocks,
               "num_cached_free_blocks": bm.num_cached_free_blocks, "prefix_hit_tokens_total": bm.num_cache_hit_tokens,
               "preemptions_total": engine.scheduler.num_preemptions},
    }


def samples_this_step(start, new, length):
    """Whether a request that had ``start`` tokens computed and computes ``new`` more of its ``length``
    samples a token at this step (its last known token is computed); numbers or arrays of them."""
    return start + new == length


def batch_arrays(raw: dict[str, Any]) -> dict[str, np.ndarray]:
    """``capture_batch``'s numbers as the blob's batch tables (``trace/batch.py``)."""
    tables = raw["tables"]
    lens = np.fromiter(map(len, tables), np.int64, len(tables))
    table = np.full((len(tables), int(lens.max(initial=0))), -1, dtype=np.int32)
    table[np.arange(table.shape[1]) < lens[:, None]] = np.fromiter(chain.from_iterable(tables), np.int32,
                                                                   int(lens.sum()))  # row by row, in order
    blocks = np.asarray(raw["blocks"], dtype=np.int64).reshape(-1, 3)  # in block order
    return {T_SEQS: raw["seqs"], T_TABLES: table, T_BLOCKS: blocks}


def batch_summary(raw: dict[str, Any], arrays: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """The trace's ``batch`` dict (traces/README.md) from ``capture_batch``'s numbers."""
    arrays = arrays or batch_arrays(raw)
    return summary(arrays[T_SEQS], arrays[T_TABLES], arrays[T_BLOCKS], raw["kv"], raw["phase"], raw["preempted"],
                   raw["waiting"])


def decode_tables(raw: dict[str, np.ndarray], shadow: bool) -> dict[str, np.ndarray]:
    """A step's raw tables (``snapshot.views``, with its ``stats_table``) -> the trace's tables, as
    ``TraceReader.tables`` gives them: the statistics, the NaN/Inf counts as a sparse list, the hashes.

    Copies, never views: ``raw`` may be a ring slot that is reused once this returns (``Snapshot.decoded``).
    """
    bad = np.ascontiguousarray(raw["bad"])
    # either count nonzero: the two int32s as one word, searched flat (np.nonzero of the (R, S) view is
    # ten times slower, at every step)
    r_idx, s_idx = np.divmod(np.flatnonzero(bad.view(np.int64)), bad.shape[1])
    sparse = np.stack([s_idx, r_idx, bad[r_idx, s_idx, 0], bad[r_idx, s_idx, 1]], axis=1)
    return {"stats": np.array(raw["stats"]), "bad": sparse.astype(np.int32).reshape(-1, 4),
            "hash": np.array(raw["lanes"]), "shadow": np.array(raw["shadow"]) if shadow else None}


def site_columns(catalog: list[SiteSpec]) -> tuple[np.ndarray, np.ndarray]:
    """Per site: whether its rows are the sampling requests' (else the new tokens'), and its values per row."""
    return (np.array([spec.rows == "samples" for spec in catalog]),
            np.array([spec.width for spec in catalog], dtype=np.float64))


def step_counts(raw: dict[str, Any]) -> np.ndarray:
    """Per request of ``capture_batch``'s batch: its new tokens, and 1 if it samples this step (``(R, 2)``)."""
    seqs = raw["seqs"]
    return np.stack([seqs[:, 4], (seqs[:, 7] & FLAG_SAMPLES) != 0], axis=1).astype(np.float64)


def table_tensors(tables: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The tables under their tensor names in a step's blob."""
    names = {"stats": T_STATS, "bad": T_BAD, "hash": T_HASH, "shadow": T_SHADOW}
    return {names[k]: v for k, v in tables.items() if v is not None}


@dataclass
class StepRecord:
    """One recorded step: its event (JSON), its device snapshot and full tensors, decoded on demand."""

    step: int
    event: dict[str, Any]
    raw_batch: dict[str, Any]
    snapshot: Any  # snapshot.Snapshot
    full: dict[str, torch.Tensor] = field(default_factory=dict)
    index: int = 0  # the recorder's count of steps before this one
    _tables: dict[str, np.ndarray] | None = None
    _arrays: dict[str, np.ndarray] | None = None
    _batch: dict[str, Any] | None = None

    def arrays(self) -> dict[str, np.ndarray]:
        """The batch tables that go into the step's blob."""
        if self._arrays is None:
            self._arrays = batch_arrays(self.raw_batch)
        return self._arrays

    def batch(self) -> dict[str, Any]:
        """The batch dict every view reads (built once, on first use)."""
        if self._batch is None:
            self._batch = batch_summary(self.raw_batch, self.arrays())
        return self._batch

    def rows(self) -> dict[str, Any]:
        """Just what the tables' row layout needs (each request's new tokens and whether it samples), cheaply."""
        seqs = self.arrays()[T_SEQS]
        return {"seqs": [{"num_new": int(n), "samples": bool(f & FLAG_SAMPLES)} for n, f in seqs[:, [4, 7]].tolist()]}

    def tables(self, shadow: bool) -> dict[str, np.ndarray] | None:
        """The decoded statistics tables (waits for the step's copies to land)."""
        if self._tables is None and self.snapshot is not None:  # None once dropped (it left the history)
            self._tables = self.snapshot.decoded(lambda raw: decode_tables(raw, shadow))
        return self._tables
