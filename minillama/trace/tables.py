"""From a step's per-request tables to the numbers people read, and the one rule that judges a kernel.

A version-2 step stores per (request, site) mean/std/min/max, sparse NaN/Inf counts, per (row, site)
content-hash lanes, and per (request, layer) shadow metrics (``format.py``). Whole-batch statistics
are derived here from the per-request ones (exact pooling of means and variances, lanes summed), so
both views always agree. ``judge`` is the verdict the breakpoint, the diff view and
``minillama diff --shadow`` share.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from minillama.trace.format import SHADOW_FIELDS, add_lanes, finalize

#: A kernel is over when its error exceeds this many times plain attention's at the same precision.
BUDGET_RATIO = 2.0
_EPS = {"float32": 2.0**-23, "float64": 2.0**-52, "bfloat16": 2.0**-7, "float16": 2.0**-10}
# Rounding units of the output under which the budget never goes. A half-precision output is rounded
# once at the end (one unit covers it); a float32 kernel keeps full precision but sums hundreds of
# products in an order of its own, so correct ones land several units from textbook attention, more
# with more keys (the torch backend on CPU, 2026-12-01: up to 14 units at ~100 keys, 16 at 719 keys,
# where the textbook was within one; its RMS error stayed under the RMS budget).
_FLOOR_UNITS = {"float32": 32, "float64": 32}


def floor_units(dtype: str) -> int:
    """Rounding units of the output under which the budget never goes, for outputs of ``dtype``."""
    return _FLOOR_UNITS.get(dtype, 1)


def budget_floor(dtype: str) -> float:
    """The budget's floor per unit of the reference output's largest magnitude (see ``_FLOOR_UNITS``)."""
    return _EPS.get(dtype, 2.0**-23) * floor_units(dtype)
_F = {name: i for i, name in enumerate(SHADOW_FIELDS)}


def request_rows(batch: dict[str, Any], samples: bool) -> list[tuple[int, int] | None]:
    """Per request of the batch: its rows ``[start, end)`` in a site's tensor (None: it has none)."""
    out: list[tuple[int, int] | None] = []
    start = 0
    for s in batch["seqs"]:
        n = (1 if s["samples"] else 0) if samples else int(s["num_new"])
        out.append((start, start + n) if n else None)
        start += n
    return out


def site_stats(tables: dict[str, np.ndarray], spec: dict[str, Any], slot: int, batch: dict[str, Any],
               req: int | None = None) -> dict[str, Any]:
    """Statistics of one site (``spec``: its catalog entry), of request index ``req`` or the whole batch."""
    rows = request_rows(batch, spec["rows"] == "samples")
    width = math.prod(spec["shape"])
    picked = [req] if req is not None else list(range(len(rows)))
    stats, bad, lanes = tables["stats"], tables["bad"], tables["hash"]
    nan = inf = 0
    counts, means, stds, lo, hi, spans = [], [], [], [], [], []
    bad_at = {(int(r), int(s)): (int(n), int(i)) for s, r, n, i in bad} if len(bad) else {}
    for r in picked:
        if rows[r] is None:
            continue
        a, b = rows[r]
        n_nan, n_inf = bad_at.get((r, slot), (0, 0))
        nan, inf = nan + n_nan, inf + n_inf
        n = (b - a) * width - n_nan - n_inf
        m, sd, mn, mx = (float(x) for x in stats[r, slot, :4])
        counts.append(n)
        means.append(m)
        stds.append(sd)
        lo.append(mn)
        hi.append(mx)
        spans.append((a, b))
    total_rows = sum(b - a for a, b in spans)
    n_all = sum(counts)
    mean, std = _pool(counts, means, stds)
    fin_lo = [x for x in lo if math.isfinite(x)]
    fin_hi = [x for x in hi if math.isfinite(x)]
    mn = min(fin_lo) if fin_lo else math.nan
    mx = max(fin_hi) if fin_hi else math.nan
    summed = add_lanes(np.concatenate([lanes[a:b, slot] for a, b in spans])) if spans else np.zeros(2, np.uint32)
    return {"shape": [total_rows, *spec["shape"]], "dtype": spec["dtype"], "mean": mean, "std": std, "min": mn,
            "max": mx, "absmax": max(abs(mn), abs(mx)) if n_all else 0.0, "nan": nan, "inf": inf,
            "hash": finalize(summed, total_rows * width), "lanes": [int(x) for x in summed],
            "count": total_rows * width, "rows": spans}


def _pool(counts: list[int], means: list[float], stds: list[float]) -> tuple[float, float]:
    """Mean and sample std of the union of groups given each group's count, mean and std."""
    n = sum(counts)
    if n <= 0:  # (negative only in damaged tables)
        return math.nan, math.nan
    mean = sum(c * m for c, m in zip(counts, means, strict=True) if c) / n
    if n == 1:
        return mean, 0.0
    ss = sum((c - 1) * s * s + c * (m - mean) ** 2 for c, m, s in zip(counts, means, stds, strict=True) if c)
    return mean, _root(max(ss, 0.0) / (n - 1))


def layer_metrics(shadow: np.ndarray, batch: dict[str, Any], layer: int, elements_per_row: int, dtype: str,
                  has_backend: bool, req: int | None = None) -> dict[str, Any]:
    """One layer's shadow comparison, over the batch or one request (``shadow``: (R, L, fields))."""
    rows = request_rows(batch, False)
    picked = [r for r in ([req] if req is not None else range(len(rows))) if rows[r] is not None]
    if not picked:
        return {}
    v = shadow[picked, layer].astype(np.float64)
    n = sum(rows[r][1] - rows[r][0] for r in picked) * elements_per_row
    unit = budget_floor(dtype) * float(v[:, _F["ref_absmax"]].max())
    out: dict[str, Any] = {"elements": n, "unit": unit}
    budget = max(float(v[:, _F["budget_max"]].max()), unit, 1e-30)
    budget_rms = max(_root(v[:, _F["budget_sq"]].sum() / n), unit / 4, 1e-30)
    who = [("", "err_active")] + ([("_shadow", "err_shadow")] if has_backend else [])
    for suffix, field in who:
        err = float(v[:, _F[field + "_max"]].max())
        rms = _root(v[:, _F[field + "_sq"]].sum() / n)
        out[field], out[field + "_rms"] = err, rms
        out["budget_ratio" + suffix] = err / budget
        out["budget_ratio_rms" + suffix] = rms / budget_rms
    out["budget"], out["budget_rms"] = budget, budget_rms
    if has_backend:
        out["max_abs"] = float(v[:, _F["diff_max"]].max())
        out["rms"] = _root(v[:, _F["diff_sq"]].sum() / n)
    return out


def _root(x: float) -> float:
    """sqrt of a mean square (NaN for what no real square sum is, e.g. damaged data)."""
    return math.sqrt(x) if x >= 0 else math.nan


#: The ratios the rule reads, in the order ``judge`` names them: either backend's, by max-abs and by RMS.
RULE_KEYS = ("budget_ratio", "budget_ratio_rms", "budget_ratio_shadow", "budget_ratio_rms_shadow")


def judge(metrics: dict[str, Any], ratio: float = BUDGET_RATIO) -> str | None:
    """Why a layer's shadow record is over the budget (None: within it). The one rule.

    Over: either backend's error, by max-abs or by RMS, is more than ``ratio`` times plain attention's
    at the same precision (the budget is floored at rounding units of the output: one for half
    precision, ``_FLOOR_UNITS`` for float32/64, so two correct kernels are never over on rounding alone). Records of
    format 1 carry only ``budget_ratio``. A ratio that is NaN is over.
    """
    for key in RULE_KEYS:
        x = metrics.get(key)
        if x is not None and not x <= ratio:
            who = "shadow" if key.endswith("_shadow") else "active"
            what = "RMS" if "_rms" in key else "max-abs"
            return f"{who} backend's {what} error is {x:.2f}x the plain-attention budget (over {ratio:g}x)"
    return None


def over_budget(ratios: dict[str, np.ndarray], ratio: float = BUDGET_RATIO) -> np.ndarray | None:
    """``judge`` for many layers at once (arrays of equal shape by key): True where it would say over
    (None when no ratio is given)."""
    over = None
    for key in RULE_KEYS:
        x = ratios.get(key)
        if x is not None:
            o = ~(np.asarray(x) <= ratio)
            over = o if over is None else over | o
    return over

