"""Breakpoints, and the one place that decides whether one fires.

A breakpoint names sites by fnmatch pattern (``"step"`` = each step's start) and, optionally, a
condition: ``nan`` (a NaN or Inf anywhere in the tensor), ``absmax`` (|x| > value), ``shadow``
(the shadow attention over the error budget: ``trace.tables.judge``, the rule the diff view and
``minillama diff --shadow`` use too; ``value`` is the ratio, default 2). A condition can be checked
on a tensor in hand (when paused inside a step) or on a step's per-request statistics tables (live
at graph speed, or over recorded history): both give the same answer for the same step.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from minillama.trace.tables import BUDGET_RATIO, judge, layer_metrics

CONDITIONS = (None, "nan", "absmax", "shadow")


@dataclass
class Breakpoint:
    """Pause at sites matching ``pattern`` (fnmatch; "step" = each step start), if ``condition`` holds."""

    pattern: str = "*"
    condition: str | None = None
    value: float = 0.0
    enabled: bool = True

    def __post_init__(self) -> None:
        if self.condition not in CONDITIONS:
            raise ValueError(f"unknown breakpoint condition {self.condition!r}: use nan, absmax or shadow")
        if self.condition == "shadow" and not self.value:
            self.value = BUDGET_RATIO

    def matches(self, site: str) -> bool:
        name = "step" if site == "step.begin" else site
        return self.enabled and fnmatch.fnmatchcase(name, self.pattern)

    @property
    def needs_site_pause(self) -> bool:
        """True for a breakpoint that stops at a site inside a step (only an eager run can)."""
        return self.enabled and self.condition is None and self.pattern != "step"

    def describe(self) -> str:
        cond = {None: "", "nan": " if NaN/Inf", "absmax": f" if absmax > {self.value:g}",
                "shadow": f" if shadow over {self.value:g}x budget"}[self.condition]
        return f"{self.pattern}{cond}"

    # ---- checks ---------------------------------------------------------------------------------
    def holds_on_tensor(self, tensor: torch.Tensor | None) -> bool:
        """The ``nan`` / ``absmax`` condition on a tensor in hand."""
        if tensor is None or not tensor.is_floating_point():
            return False
        if self.condition == "nan":
            return not bool(torch.isfinite(tensor).all())
        if self.condition == "absmax":
            return float(tensor.detach().abs().amax()) > self.value if tensor.numel() else False
        return False

    def holds_on_stats(self, stats: dict[str, Any] | None) -> bool:
        """The ``nan`` / ``absmax`` condition on a site's statistics (``TraceReader.stats``)."""
        if not stats:
            return False
        if self.condition == "nan":
            return bool(stats.get("nan") or stats.get("inf"))
        if self.condition == "absmax":
            x = stats.get("absmax")
            return isinstance(x, int | float) and math.isfinite(x) and x > self.value
        return False

    def holds_on_shadow(self, metrics: dict[str, Any] | None) -> bool:
        """The ``shadow`` condition on one layer's shadow record."""
        return bool(metrics) and judge(metrics, self.value) is not None

    def first_hit(self, event: dict[str, Any], tables: dict[str, np.ndarray] | None,
                  catalog: list[dict[str, Any]], dtype: str, has_backend: bool) -> str | None:
        """The first site (in firing order) of a finished step where this conditional breakpoint fires."""
        if self.condition is None or tables is None:
            return None
        batch = event["batch"]
        missing = set(event.get("missing_sites") or ())
        if self.condition == "shadow":
            if tables.get("shadow") is None:
                return None
            slot = next((k for k, e in enumerate(catalog) if e["name"] == "layers.0.attn.out"), None)
            per_row = math.prod(catalog[slot]["shape"]) if slot is not None else 1
            for layer in range(tables["shadow"].shape[1]):
                site = f"layers.{layer}.attn.out"
                if self.matches(site) and self.holds_on_shadow(
                        layer_metrics(tables["shadow"], batch, layer, per_row, dtype, has_backend)):
                    return site
            return None
        bad_slots = set(tables["bad"][:, 0].tolist()) if len(tables["bad"]) else set()
        sampled = bool(event.get("sampled"))
        for slot, spec in enumerate(catalog):
            name = spec["name"]
            if name in missing or (spec.get("rows") == "samples" and not sampled) or not self.matches(name):
                continue
            if self.condition == "nan" and slot in bad_slots:
                return name
            if self.condition == "absmax":
                rows = [k for k, s in enumerate(batch["seqs"])
                        if (s["samples"] if spec.get("rows") == "samples" else s["num_new"])]
                vals = np.abs(tables["stats"][rows, slot, 2:4])
                if np.nanmax(vals, initial=0.0) > self.value:
                    return name
        return None
