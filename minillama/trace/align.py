"""Line two traces up request by request: where each request's computation of each token position is.

A request's computation is one row per token position at every token site (prompt positions from
its prefill chunks, generated positions from decode steps, or from a chunk after a preemption), and
one row at the sample sites (``logits``, ``sampled``) for each position that samples. A format-2
step keeps per-row hash lanes (``tables["hash"][row, slot]``) and per-request statistics, so a
request's rows can be compared whatever else shared its batches: ``index_requests`` finds every
row of every request, ``match`` pairs requests of two traces by prompt token ids (the k-th request
with given ids in A with the k-th in B), and ``pair_rows`` pairs the rows of two matched requests
by position: the k-th computation of a position in A with the k-th in B, an extra one (a recompute
after a preemption) with the other side's last. Positions one trace served from the prefix cache
have no rows there and are left out (``cached`` says which).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from minillama.trace.reader import TraceReader


class Row(NamedTuple):
    """One computation of one token position: where its rows are in the trace."""

    step: int  # recorded step index
    row: int  # row in the step's token-site tensors
    sample: int  # row in the step's sample-site tensors (-1: this row does not sample)
    req: int  # the request's index in the step's batch (its per-request statistics)
    chunk: tuple[int, int]  # the positions [start, end) this request computed in that step
    again: bool  # the position was computed before (this is a recompute after a preemption)


@dataclass
class RequestRows:
    """Every row of one request in one trace."""

    seq_id: int
    index: int  # position in the trace's prompt order
    prompt_ids: list[int]
    prompt: str | None
    tokens: list[int]  # generated ids
    text: str
    rows: dict[int, list[Row]] = field(default_factory=dict)  # position -> computations in time order
    cached: list[tuple[int, int, int]] = field(default_factory=list)  # (start, end, step) served from the cache

    def cached_positions(self) -> int:
        return sum(e - s for s, e, _ in self.cached)


def index_requests(reader: TraceReader) -> dict[int, RequestRows]:
    """Every request of a format-2 trace with the rows of each of its token positions."""
    reqs: dict[int, RequestRows] = {}
    for k, (sid, q) in enumerate(reader.requests().items()):
        reqs[sid] = RequestRows(sid, q["index"] if isinstance(q.get("index"), int) else k,
                                list(q["prompt_token_ids"] or []), q.get("prompt"), list(q["token_ids"]),
                                str(q.get("text") or ""))
    for i in range(reader.num_steps):
        offset = sample = 0
        for b, s in enumerate(reader.step(i).get("batch", {}).get("seqs", [])):
            start, end = (int(x) for x in s["chunk"])
            q = reqs.get(int(s["seq_id"]))
            if q is not None:
                cached = int(s.get("num_cached") or 0)
                if cached and start == cached:  # first chunk after an admission with a prefix-cache hit
                    q.cached.append((0, cached, i))
                for p in range(start, end):
                    before = q.rows.setdefault(p, [])
                    last = p == end - 1 and s["samples"]
                    before.append(Row(i, offset + p - start, sample if last else -1, b, (start, end), bool(before)))
            offset += end - start
            sample += bool(s["samples"])
    return reqs


def match(a: dict[int, RequestRows], b: dict[int, RequestRows]) -> tuple[list[tuple[RequestRows, RequestRows]],
                                                                         list[RequestRows], list[RequestRows]]:
    """Pairs of requests with the same prompt ids (in prompt order), and those only in A, only in B."""
    waiting: dict[tuple[int, ...], list[RequestRows]] = defaultdict(list)
    for q in sorted(b.values(), key=lambda q: q.index):
        waiting[tuple(q.prompt_ids)].append(q)
    pairs, only_a = [], []
    for q in sorted(a.values(), key=lambda q: q.index):
        same = waiting.get(tuple(q.prompt_ids))
        if same:
            pairs.append((q, same.pop(0)))
        else:
            only_a.append(q)
    only_b = sorted((q for qs in waiting.values() for q in qs), key=lambda q: q.index)
    return pairs, only_a, only_b


@dataclass
class PairedRows:
    """The rows of two matched requests, paired position by position (``limit``: positions compared)."""

    positions: np.ndarray  # (K,) token position of each pair
    a: list[Row]
    b: list[Row]
    limit: int  # positions >= limit are not compared (their input tokens differ)
    only_a: list[int]  # positions A computed and B did not (B had them cached, or never got there)
    only_b: list[int]


def first_token_divergence(a: RequestRows, b: RequestRows) -> int | None:
    """Index of the first generated token that differs (None: the shorter answer is a prefix of the longer)."""
    for k, (x, y) in enumerate(zip(a.tokens, b.tokens, strict=False)):
        if x != y:
            return k
    return None


def pair_rows(a: RequestRows, b: RequestRows) -> PairedRows:
    """Pair the computations of two matched requests (see the module docstring)."""
    diverged = first_token_divergence(a, b)
    # the generated token k is the input of position prompt_len + k: past a different token, inputs differ
    limit = len(a.prompt_ids) + diverged if diverged is not None else 1 << 62
    pos, ra, rb = [], [], []
    for p in sorted(set(a.rows) & set(b.rows)):
        if p >= limit:
            break
        xa, xb = a.rows[p], b.rows[p]
        for k in range(max(len(xa), len(xb))):
            pos.append(p)
            ra.append(xa[min(k, len(xa) - 1)])
            rb.append(xb[min(k, len(xb) - 1)])
    only_a = sorted(p for p in set(a.rows) - set(b.rows) if p < limit)
    only_b = sorted(p for p in set(b.rows) - set(a.rows) if p < limit)
    return PairedRows(np.array(pos, dtype=np.int64), ra, rb, limit, only_a, only_b)


def _slots(reader: TraceReader) -> tuple[np.ndarray, np.ndarray]:
    samples = np.array([e.get("rows") == "samples" for e in reader.catalog], dtype=bool)
    return np.flatnonzero(~samples), np.flatnonzero(samples)


def gather(reader: TraceReader, rows: list[Row]) -> dict[str, np.ndarray]:
    """Hash lanes and per-request statistics of ``rows``: ``lanes`` (K, S, 2) uint32, ``stats`` (K, S, 4)
    (of the row's request in that step: over its whole chunk), ``valid`` (K, S) where the row has that site."""
    n, s = len(rows), len(reader.catalog)
    tok, smp = _slots(reader)
    lanes = np.zeros((n, s, 2), np.uint32)
    stats = np.full((n, s, 4), np.nan, np.float32)
    valid = np.zeros((n, s), bool)
    by_step: dict[int, list[int]] = defaultdict(list)
    for k, r in enumerate(rows):
        by_step[r.step].append(k)
    slot_of = {e["name"]: j for j, e in enumerate(reader.catalog)}
    for step, ks in by_step.items():
        t = reader.tables(step)
        if t is None or t.get("hash") is None:
            continue  # a step whose statistics were skipped: its rows compare as unknown
        h = t["hash"].view(np.uint32)
        missing = [slot_of[m] for m in reader.step(step).get("missing_sites") or [] if m in slot_of]
        k_all = np.array(ks)
        req = np.array([rows[k].row for k in ks])
        lanes[np.ix_(k_all, tok)] = h[np.ix_(req, tok)]
        valid[np.ix_(k_all, tok)] = True
        stats[k_all] = t["stats"][[rows[k].req for k in ks]]
        with_sample = [k for k in ks if rows[k].sample >= 0]
        if with_sample and len(smp):
            ks_s = np.array(with_sample)
            lanes[np.ix_(ks_s, smp)] = h[np.ix_([rows[k].sample for k in with_sample], smp)]
            valid[np.ix_(ks_s, smp)] = True
        if missing:
            valid[np.ix_(k_all, missing)] = False
    return {"lanes": lanes, "stats": stats, "valid": valid}


def describe_rows(reader: TraceReader, r: Row) -> dict[str, Any]:
    """Where a row is, for people: step, the engine's step number, phase, chunk, recompute."""
    ev = reader.step(r.step)
    return {"step": r.step, "engine_step": ev.get("step", r.step), "phase": ev.get("phase"),
            "chunk": list(r.chunk), "recompute": r.again}
