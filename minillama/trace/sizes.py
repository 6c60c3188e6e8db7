"""How large a difference between two aligned requests is: exact from full tensors, else a lower bound.

Exact: both traces kept the site's full tensor at the steps of a pair of rows: max |A - B| over the
row (NaN and infinities at the same place count as equal). Otherwise a lower bound from the
per-request statistics, which are kept per (request, site, step), that is over a whole chunk:
``max(|Δmean|, |Δmin|, |Δmax|) <= max |A - B|`` when both sides' statistics cover the same
positions. When the two traces chunked a prompt differently, the statistics of consecutive chunks
are pooled over the smallest span of positions that both chunkings tile exactly (count-weighted
mean, min of mins, max of maxes); chunks that recompute positions after a preemption are not pooled.
"""

from __future__ import annotations

import math

import numpy as np

from minillama.trace.align import PairedRows, RequestRows, Row
from minillama.trace.reader import TraceReader


class Sizes:
    """Sizes of the differences between paired rows of one matched request (see the module docstring)."""

    def __init__(self, a: TraceReader, b: TraceReader, paired: PairedRows, qa: RequestRows, qb: RequestRows,
                 ga: dict[str, np.ndarray], gb: dict[str, np.ndarray]) -> None:
        self.readers = (a, b)
        self.rows = (paired.a, paired.b)
        self.stats = (ga["stats"], gb["stats"])
        self.names = [e["name"] for e in a.catalog]
        self.is_sample = [e.get("rows") == "samples" for e in a.catalog]
        self.limit = paired.limit
        self._keys: tuple[dict[int, set[str]], dict[int, set[str]]] = ({}, {})
        self._chunks = (_chunks(qa), _chunks(qb))
        self._spans: dict[tuple, tuple[np.ndarray, np.ndarray] | None] = {}

    # ---- exact ----------------------------------------------------------------------------------
    def _kept(self, side: int, step: int, site: str) -> bool:
        keys = self._keys[side]
        if step not in keys:
            keys[step] = set(self.readers[side].tensor_keys(step))
        return site in keys[step]

    def exact(self, slot: int, ks: np.ndarray) -> np.ndarray:
        """max |A - B| per pair in ``ks`` at ``slot`` where both kept the tensor (NaN elsewhere).
        Pairs are grouped by their two steps, so each step's tensor is read once."""
        site, sample = self.names[slot], self.is_sample[slot]
        out = np.full(len(ks), np.nan)
        groups: dict[tuple[int, int], list[int]] = {}
        for j, k in enumerate(ks):
            groups.setdefault((self.rows[0][k].step, self.rows[1][k].step), []).append(j)
        loaded: dict[tuple[int, int], np.ndarray | None] = {}
        for (sa, sb), js in groups.items():
            xa, xb = self._rows_of(loaded, 0, sa, site), self._rows_of(loaded, 1, sb, site)
            if xa is None or xb is None:
                continue
            ra, rb = [self.rows[0][ks[j]] for j in js], [self.rows[1][ks[j]] for j in js]
            ia = [r.sample if sample else r.row for r in ra]
            ib = [r.sample if sample else r.row for r in rb]
            out[js] = _max_abs(xa[ia], xb[ib])
        return out

    def _rows_of(self, loaded: dict, side: int, step: int, site: str) -> np.ndarray | None:
        if (side, step) not in loaded:
            t = self.readers[side].tensor(step, site) if self._kept(side, step, site) else None
            loaded[(side, step)] = None if t is None else t.reshape(t.shape[0], -1).double().numpy()
        return loaded[(side, step)]

    # ---- bounds ---------------------------------------------------------------------------------
    def bound(self, slot: int, ks: np.ndarray) -> np.ndarray:
        """A lower bound of max |A - B| per pair from the statistics (NaN where none can be given)."""
        direct = np.array([self.is_sample[slot] or self.rows[0][k].chunk == self.rows[1][k].chunk for k in ks],
                          dtype=bool)
        out = np.full(len(ks), np.nan)
        if direct.any():  # both sides' statistics cover the same positions
            sa, sb = self.stats[0][ks[direct], slot][:, [0, 2, 3]], self.stats[1][ks[direct], slot][:, [0, 2, 3]]
            out[direct] = _gap(sa, sb)
        for j in np.flatnonzero(~direct):
            span = self._span(self.rows[0][ks[j]], self.rows[1][ks[j]])
            if span is not None:
                out[j] = _gap(span[0][slot][None], span[1][slot][None])[0]
        return out

    def _span(self, ra: Row, rb: Row) -> tuple[np.ndarray, np.ndarray] | None:
        key = (ra.step, ra.chunk, rb.step, rb.chunk)
        if key not in self._spans:
            self._spans[key] = self._pool(ra, rb)
        return self._spans[key]

    def _pool(self, ra: Row, rb: Row) -> tuple[np.ndarray, np.ndarray] | None:
        if ra.again or rb.again:
            return None
        lo, hi = min(ra.chunk[0], rb.chunk[0]), max(ra.chunk[1], rb.chunk[1])
        while True:  # grow the span until both sides' clean chunks tile it
            picked = [[c for c in side if c[2] < hi and c[3] > lo] for side in self._chunks]
            if any(not clean for side in picked for *_c, clean in side):
                return None
            nlo = min(c[2] for side in picked for c in side)
            nhi = max(c[3] for side in picked for c in side)
            if (nlo, nhi) == (lo, hi):
                break
            lo, hi = nlo, nhi
        if hi > self.limit:
            return None
        pooled = []
        for side, chunks in enumerate(picked):
            chunks = sorted(chunks, key=lambda c: c[2])
            if chunks[0][2] != lo or chunks[-1][3] != hi or any(x[3] != y[2] for x, y in zip(chunks, chunks[1:], strict=False)):
                return None  # a gap (cached or never computed there): no common span
            pooled.append(self._pooled(side, chunks))
        return pooled[0], pooled[1]

    def _pooled(self, side: int, chunks: list) -> np.ndarray:
        """(S, 3) mean, min, max over the chunks' rows."""
        stats = np.stack([self.readers[side].tables(step)["stats"][req] for step, req, *_rest in chunks])
        n = np.array([end - start for _s, _r, start, end, _c in chunks], dtype=np.float64)[:, None]
        mean = (stats[..., 0] * n).sum(0) / n.sum()
        return np.stack([mean, stats[..., 2].min(0), stats[..., 3].max(0)], axis=-1)

    # ---- answers --------------------------------------------------------------------------------
    def at(self, slot: int, k: int) -> tuple[float | None, str]:
        """The size at one pair: (value, "full" | "stats" | "none")."""
        return self.worst(slot, np.array([k]))

    def worst(self, slot: int, ks: np.ndarray) -> tuple[float | None, str]:
        """The largest difference over pairs ``ks`` at ``slot``: exact when every pair was kept in full,
        else the largest known value marked "stats" (a lower bound)."""
        if self.names[slot] == "sampled":
            return None, "tokens"  # token ids differ: the diverging token says which
        vals = self.exact(slot, ks)
        missing = np.isnan(vals)
        if not missing.any():
            return float(vals.max()), "full"
        vals[missing] = self.bound(slot, ks[missing])
        known = vals[~np.isnan(vals)]
        return (float(known.max()), "stats") if len(known) else (None, "none")


def _chunks(q: RequestRows) -> list[tuple[int, int, int, int, bool]]:
    """Each chunk of a request once: (step, request index, start, end, clean = no recomputed position)."""
    seen: dict[tuple[int, int, int, int], bool] = {}
    for rows in q.rows.values():
        for r in rows:
            key = (r.step, r.req, *r.chunk)
            seen[key] = seen.get(key, True) and not r.again
    return [(*k, clean) for k, clean in seen.items()]


def _gap(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per row, max |x - y| over the statistics both sides have (NaN where none)."""
    d = np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))
    known = ~np.isnan(d)
    return np.where(known.any(-1), np.where(known, d, -np.inf).max(-1), np.nan)


def _max_abs(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per row, max |x - y| with NaNs and infinities at the same place counting as equal (inf: a NaN
    on one side only)."""
    same = (x == y) | (np.isnan(x) & np.isnan(y))
    with np.errstate(invalid="ignore"):
        d = np.where(same, 0.0, np.abs(x - y))
    return np.nan_to_num(d, nan=math.inf).max(-1) if d.shape[-1] else np.zeros(d.shape[0])
