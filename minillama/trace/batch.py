"""A step's batch in format 2: three small integer tables in the step's blob, and the summary made from them.

``batch.seqs`` (R, 8) int64, one row per request in batch order: ``SEQ_COLUMNS``.
``batch.block_tables`` (R, W) int32: each request's physical KV blocks, padded with -1.
``batch.blocks`` (U, 3) int64: each block in use with its reference count and whether it is cached.
The step's JSON line keeps the scalars (``kv``: block size, counts; ``preempted``; ``waiting``).
Tables keep a step of hundreds of requests cheap to write and to read; ``summary`` turns them into
the dict every view reads (traces/README.md, "batch").
"""

from __future__ import annotations

from typing import Any

import numpy as np

SEQ_COLUMNS = ("seq_id", "prompt_len", "len", "num_computed", "num_new", "num_cached", "preemptions", "flags")
FLAG_SAMPLES, FLAG_RECOMPUTE = 1, 2
T_SEQS, T_TABLES, T_BLOCKS = "batch.seqs", "batch.block_tables", "batch.blocks"


def summary(seqs: np.ndarray, tables: np.ndarray, blocks: np.ndarray, kv: dict[str, Any], phase: str,
            preempted: list[int], waiting: list[int]) -> dict[str, Any]:
    """The batch dict of a step from its tables."""
    out_seqs, cu, slots = [], [0], []
    bs = int(kv.get("block_size") or 1)
    for row, table in zip(seqs.tolist(), tables.tolist(), strict=True):
        sid, plen, length, start, n, cached, pre, flags = row
        bt = [b for b in table if b >= 0]
        out_seqs.append({"seq_id": sid, "prompt_len": plen, "len": length, "num_computed": start, "num_new": n,
                         "chunk": [start, start + n], "num_cached": cached, "block_table": bt, "preemptions": pre,
                         "samples": bool(flags & FLAG_SAMPLES), "recompute": bool(flags & FLAG_RECOMPUTE)})
        cu.append(cu[-1] + n)
        slots += [bt[p // bs] * bs + p % bs for p in range(start, start + n) if p // bs < len(bt)]
    return {"phase": phase, "num_tokens": cu[-1], "seqs": out_seqs, "cu_seqlens_q": cu,
            "context_lens": [s["num_computed"] + s["num_new"] for s in out_seqs], "slot_mapping": slots,
            "block_size": bs, "num_blocks": kv.get("num_blocks"), "num_free_blocks": kv.get("num_free_blocks"),
            "blocks": {str(b): {"ref": ref, "cached": bool(c)} for b, ref, c in blocks.tolist()},
            "num_cached_free_blocks": kv.get("num_cached_free_blocks"),
            "prefix_hit_tokens_total": kv.get("prefix_hit_tokens_total"),
            "preempted": list(preempted), "preemptions_total": kv.get("preemptions_total"), "waiting": list(waiting)}
