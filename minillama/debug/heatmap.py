"""The whole run at a glance: a steps x layers matrix of the shadow attention's error-budget ratio.

Each cell is one layer of one step: the worst of the ratios ``trace.tables.judge`` looks at (either
backend's error over plain attention's, by max-abs and by RMS), whether ``judge`` calls it over, and
(when a second backend ran) the largest |active - shadow|. ``judge`` decides every cell, so the map,
the ``f`` jump, the breakpoint condition and the diff view cannot disagree.

A format-2 trace is read straight from its step blobs (only the shadow table and the request rows
of each step, never the batch dicts: ``TraceReader.step_heads`` and ``step_arrays``): each step is reduced to every field's largest
and sum over its requests, then the ratios and the rule run once over all the steps read, so a
1,000-step trace maps in about 100 ms on a small CPU. Other timelines go through
``Timeline.shadow``. Finished steps never change, so rows are cached.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from minillama.trace.batch import T_SEQS
from minillama.trace.format import DATA, SHADOW_FIELDS, T_SHADOW
from minillama.trace.tables import BUDGET_RATIO, RULE_KEYS, budget_floor, judge, over_budget

_F = {name: i for i, name in enumerate(SHADOW_FIELDS)}
_NUM_NEW = 4  # batch.SEQ_COLUMNS.index("num_new")


@dataclass
class _Row:
    """One step's cells, by layer: worst budget ratio, over the rule, max |a - s| (NaN: none), why."""

    ratio: np.ndarray
    over: np.ndarray
    diff: np.ndarray
    why: dict[int, str]

    @classmethod
    def empty(cls, layers: int) -> _Row:
        """A row with no cell (a step without shadow records)."""
        return cls(np.full(layers, np.nan), np.zeros(layers, bool), np.full(layers, np.nan), {})


def _rows(ratios: dict[str, np.ndarray], diff: np.ndarray | None, have: np.ndarray) -> list[_Row]:
    """Steps' rows from their (steps, layers) ratios by ``RULE_KEYS``, judged by the one rule (``have``: the
    cells with a record; the others stay empty, not NaN ratios, which would be over)."""
    ratio = np.max([ratios[k] for k in RULE_KEYS if k in ratios], axis=0)  # the worst; NaN wins (NaN is over)
    ratio[~have] = np.nan
    over = over_budget(ratios) & have
    diff = np.where(have, diff, np.nan) if diff is not None else np.full(ratio.shape, np.nan)
    why: list[dict[int, str]] = [{} for _ in range(len(ratio))]
    for r, c in zip(*np.nonzero(over), strict=True):  # judge's words for the few cells over
        why[r][int(c)] = judge({k: float(v[r, c]) for k, v in ratios.items()}) or "over the budget"
    return [_Row(ratio[r], over[r], diff[r], why[r]) for r in range(len(ratio))]


@dataclass
class BudgetMap:
    """Rows by timeline index (``index``), columns by layer; NaN where a step has no record of a layer."""

    num_layers: int
    index: list[int] = field(default_factory=list)
    ratio: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    over: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), bool))
    diff: np.ndarray | None = None
    threshold: float = BUDGET_RATIO
    why: dict[tuple[int, int], str] = field(default_factory=dict)
    steps: list[int] = field(default_factory=list)  # the engine's step number of each row (mid-run recordings)

    @property
    def num_over(self) -> int:
        return int(self.over.sum())

    def first_over(self, after: tuple[int, int] | None = None) -> tuple[int, int, str] | None:
        """The first (timeline index, layer, why) over the rule, in firing order, after ``after``."""
        rows, cols = np.nonzero(self.over)
        for r, c in sorted(zip(rows.tolist(), cols.tolist(), strict=True)):
            i = self.index[r]
            if after is None or (i, c) > after:
                return i, c, self.why.get((i, c), "over the budget")
        return None


def layer_ratios(shadow: np.ndarray, num_new: np.ndarray, per_row: int, dtype: str,
                 has_backend: bool) -> tuple[dict[str, np.ndarray], np.ndarray | None] | None:
    """Every layer's budget ratios of one step at once, as ``trace.tables.layer_metrics`` computes them
    one layer at a time (``shadow``: (requests, layers, fields); tests keep the two in step)."""
    got = _reduce(shadow, num_new)
    if got is None:
        return None
    return _ratios(got[0], got[1], _values(num_new, per_row), dtype, has_backend)


def _reduce(shadow: np.ndarray, num_new: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(layers, fields): every field's largest and float64 sum over the requests that computed tokens (None:
    none did), read straight from the float32 table (no float64 copy; the same numbers to the bit)."""
    picked = num_new > 0
    if not picked.any():
        return None
    v = shadow if picked.all() else shadow[picked]
    return v.max(0).astype(np.float64), v.sum(0, dtype=np.float64)


def _values(num_new: np.ndarray, per_row: int) -> float:  # output values computed: the RMS denominator
    return float(num_new[num_new > 0].sum()) * per_row


def _ratios(mx: np.ndarray, sm: np.ndarray, n: float | np.ndarray, dtype: str,
            has_backend: bool) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """The ratios of ``_reduce``'s (..., layers, fields) maxima and sums (``n``: ``_values``, shaped to
    broadcast against (..., layers)): one step, or many stacked."""
    unit = budget_floor(dtype) * mx[..., _F["ref_absmax"]]
    budget = np.maximum(np.maximum(mx[..., _F["budget_max"]], unit), 1e-30)
    budget_rms = np.maximum(np.maximum(np.sqrt(sm[..., _F["budget_sq"]] / n), unit / 4), 1e-30)
    out = {}
    for suffix, who in [("", "err_active")] + ([("_shadow", "err_shadow")] if has_backend else []):
        out["budget_ratio" + suffix] = mx[..., _F[who + "_max"]] / budget
        out["budget_ratio_rms" + suffix] = np.sqrt(sm[..., _F[who + "_sq"]] / n) / budget_rms
    return out, (mx[..., _F["diff_max"]] if has_backend else None)


class BudgetMapper:
    """Builds and caches the ``BudgetMap`` of one timeline (live or recorded)."""

    def __init__(self, tl: Any) -> None:
        self.tl = tl
        self._rows: dict[int, _Row] = {}
        self._steps: dict[int, int] = {}  # timeline index -> the engine's step number, read with the row
        reader = getattr(tl, "reader", None)
        self._fast = reader if reader is not None and getattr(reader, "version", 1) >= 2 else None

    def build(self, first: int = 0, last: int | None = None) -> BudgetMap:
        """The map of timeline indices ``first..last`` (default: every finished step)."""
        tl, layers = self.tl, int(self.tl.num_layers)
        n = tl.num_steps()
        first = max(first, int(getattr(tl, "first_step", lambda: 0)()))
        last = n - 1 if last is None else min(last, n - 1)
        todo = [i for i in range(first, last + 1) if i not in self._rows]
        if todo and self._fast is not None:
            self._read_fast(todo)
        for i in todo:
            if i not in self._rows:
                row = self._row_slow(i)
                ev = tl.event(i) or {}
                self._steps[i] = step_number(ev, i)
                if not ev.get("in_progress"):
                    self._rows[i] = row
                else:
                    return self._assemble(first, i - 1, layers, extra=(i, row))
        return self._assemble(first, last, layers)

    @property
    def sliceable(self) -> bool:
        """Whether ``read_slice`` reads rows (a format-2 trace with blobs: files only, no timeline lock)."""
        return self._open() is not None

    def read_slice(self, count: int) -> bool:
        """Cache the rows of up to ``count`` more steps of a format-2 trace, so a UI can build a long map in
        slices between its frames; False once none is left (or the trace has no blobs: ``build`` reads it)."""
        if self._open() is None:
            return False
        first = max(0, int(getattr(self.tl, "first_step", lambda: 0)()))
        todo = [i for i in range(first, self.tl.num_steps()) if i not in self._rows][:count]
        if todo:
            self._read_fast(todo)
        return bool(todo)

    def _assemble(self, first: int, last: int, layers: int, extra: tuple[int, _Row] | None = None) -> BudgetMap:
        index = list(range(first, last + 1))
        rows = [self._rows[i] for i in index]
        if extra is not None:
            index.append(extra[0])
            rows.append(extra[1])
        if not rows:
            empty = np.zeros((0, layers))
            return BudgetMap(layers, [], empty, empty.astype(bool), None, BUDGET_RATIO, {}, [])
        ratio, over, diff = (np.stack([getattr(r, name) for r in rows]) for name in ("ratio", "over", "diff"))
        why = {(i, c): w for i, r in zip(index, rows, strict=True) for c, w in r.why.items()}
        has_diff = bool(np.isfinite(diff).any())
        steps = [self._steps.get(i, i) for i in index]
        return BudgetMap(layers, index, ratio, over, diff if has_diff else None, BUDGET_RATIO, why, steps)

    def _row_slow(self, i: int) -> _Row:
        """A step's row from its shadow records, one layer at a time (live, format 1)."""
        layers = int(self.tl.num_layers)
        row = _Row.empty(layers)
        for key, m in (self.tl.shadow(i) or {}).items():
            layer = int(key)
            if not (0 <= layer < layers and isinstance(m, dict)):
                continue
            vals = [float(x) for k in RULE_KEYS if (x := m.get(k)) is not None]
            if vals:
                row.ratio[layer] = max(vals, key=lambda x: math.inf if math.isnan(x) else x)  # NaN wins
            if m.get("max_abs") is not None:
                row.diff[layer] = m["max_abs"]
            why = judge(m)
            if why is not None:
                row.over[layer], row.why[layer] = True, why
        return row

    def _open(self) -> tuple[int, str, bool] | None:
        """(values per request row, dtype, whether a second backend ran) of a format-2 trace whose blobs
        can be read; None: its rows are read through the timeline."""
        reader = self._fast
        if reader is None:
            return None
        slot = next((k for k, e in enumerate(reader.catalog) if e.get("name") == "layers.0.attn.out"), None)
        path = os.path.join(reader.path, DATA)
        if slot is None or not os.path.isfile(path) or os.path.getsize(path) == 0:
            return None
        backend = reader.manifest.get("shadow") not in (None, "reference")
        return math.prod(reader.catalog[slot]["shape"]), str(reader.manifest.get("dtype", "float32")), backend

    def _read_fast(self, todo: list[int]) -> None:
        """Format 2: each step's shadow table and request rows straight from its blob."""
        reader, opened = self._fast, self._open()
        if opened is None:
            return
        per_row, dtype, backend = opened
        layers, fields = int(self.tl.num_layers), len(SHADOW_FIELDS)
        mx = np.full((len(todo), layers, fields), np.nan)  # per step and layer, as _reduce gives them
        sm, n = mx.copy(), np.ones((len(todo), 1))
        have = np.zeros((len(todo), layers), bool)
        for k, (i, head) in enumerate(zip(todo, reader.step_heads(todo), strict=True)):
            self._steps[i] = step_number(head, i)
            span = head.get("data")
            if not (isinstance(span, list) and len(span) == 2):
                continue
            shadow, seqs = reader.step_arrays(i, (T_SHADOW, T_SEQS), span)
            if shadow is None or seqs is None or not shadow.size:
                continue
            got = _reduce(shadow, seqs[:, _NUM_NEW])
            if got is not None:
                cols = min(layers, len(got[0]))
                mx[k, :cols], sm[k, :cols], have[k, :cols] = got[0][:cols, :fields], got[1][:cols, :fields], True
                n[k] = _values(seqs[:, _NUM_NEW], per_row)
        ratios, diff = _ratios(mx, sm, n, dtype, backend)  # every step read at once
        for i, row in zip(todo, _rows(ratios, diff, have), strict=True):
            self._rows[i] = row


def step_number(event: dict[str, Any], index: int) -> int:
    """The engine's step number an event names (its timeline index where it names none or garbage)."""
    try:
        return int(event.get("step", index))
    except (TypeError, ValueError):
        return index
