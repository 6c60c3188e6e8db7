"""One trace's shadow-backend records, per layer: ``minillama diff --shadow DIR``.

``diff_shadow(reader)`` summarises per layer how far the shadow backend strayed from the active one
(format 1 records as they were saved; format 2 from the per-request shadow tables, through
``TraceReader.shadow``). The result carries ``exit_code`` (1 = a layer over the gate) for CI.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from minillama.trace.format import TraceError
from minillama.trace.reader import TraceReader
from minillama.trace.tables import judge

#: ``diff --shadow --threshold`` absent and no budgets recorded: max abs difference that still counts as equal.
DEFAULT_THRESHOLD = 1e-3
#: ``diff --shadow`` without a threshold: a kernel whose error exceeds this many times plain attention's is over.
DEFAULT_BUDGET_RATIO = 2.0


class TraceMismatchError(TraceError):
    """Two traces that cannot be compared (different prompts)."""


@dataclass
class ShadowLayer:
    """One layer's worst values over every step. ``max_abs``/``rel``: active vs shadow backend;
    ``err_*``: each one vs the float64 reference; ``budget_ratio*``: that error over plain attention's."""

    layer: int
    backend: str
    steps: int = 0
    max_abs: float | None = None
    rel: float | None = None
    err_active: float | None = None
    err_shadow: float | None = None
    budget_ratio: float | None = None
    budget_ratio_shadow: float | None = None
    step_of_max: int = 0
    first_step_over: int | None = None

    @property
    def over(self) -> bool:
        return self.first_step_over is not None


@dataclass
class ShadowDiff:
    """Per-layer shadow summary of one trace; ``gate`` says what counts as over."""

    path: str
    layers: list[ShadowLayer]
    gate: str
    threshold: float | None
    steps: int

    @property
    def first_over(self) -> ShadowLayer | None:
        return next((lay for lay in self.layers if lay.over), None)

    @property
    def exit_code(self) -> int:
        return 1 if self.first_over is not None else 0

    def to_json(self) -> dict:
        """Plain JSON for ``diff --shadow --json`` (values that are not finite become null)."""
        from dataclasses import asdict

        from minillama.trace.diff import json_safe

        first = self.first_over
        return json_safe({"trace": self.path, "steps": self.steps, "gate": self.gate, "threshold": self.threshold,
                          "exit_code": self.exit_code, "first_over": None if first is None else first.layer,
                          "layers": [{**asdict(lay), "over": lay.over} for lay in self.layers]})


# ---- one trace's shadow records -------------------------------------------------------------------
def _num(x: object) -> float:
    try:
        return float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


_SHADOW_KEYS = ("max_abs", "rel", "err_active", "err_shadow", "budget_ratio", "budget_ratio_shadow")


def _worst_ratio(rec: dict) -> float | None:
    ratios = [_num(rec[k]) for k in ("budget_ratio", "budget_ratio_shadow") if rec.get(k) is not None]
    return max(ratios) if ratios else None


def diff_shadow(reader: TraceReader, threshold: float | None = None) -> ShadowDiff:
    """Per-layer maxima over steps of the shadow records.

    Over = ``max_abs > threshold`` (``err_active`` when no shadow backend ran) when a threshold is
    given; else ``tables.judge`` (either backend's error, max-abs or RMS, over ``DEFAULT_BUDGET_RATIO``
    times plain attention's) when budgets were recorded; else ``max_abs > DEFAULT_THRESHOLD``.
    """
    layers: dict[int, ShadowLayer] = {}
    records: list[tuple[int, int, dict]] = []
    for i in range(reader.num_steps):
        for key, rec in reader.shadow(i).items():
            if not isinstance(rec, dict):
                continue
            layer = int(key)
            records.append((i, layer, rec))
            lay = layers.setdefault(layer, ShadowLayer(layer, str(rec.get("backend", "?"))))
            lay.steps += 1
            for k in _SHADOW_KEYS:
                if rec.get(k) is None:
                    continue
                v, cur = _num(rec[k]), getattr(lay, k)
                if cur is None or v > cur or (math.isnan(v) and not math.isnan(cur)):
                    setattr(lay, k, v)
                    if k == ("max_abs" if "max_abs" in rec else "err_active"):
                        lay.step_of_max = i
    if not layers:
        raise TraceError(f"{reader.path} has no shadow records: record it with `minillama record --shadow ...`")
    any_budget = any(_worst_ratio(rec) is not None for _i, _l, rec in records)
    if threshold is not None:
        gate = f"max_abs > {threshold:g}"
        over = lambda r: not _num(r.get("max_abs", r.get("err_active"))) <= threshold
    elif any_budget:
        gate = f"error > {DEFAULT_BUDGET_RATIO:g}x plain attention's at this precision (max-abs or RMS)"
        over = lambda r: judge(r, DEFAULT_BUDGET_RATIO) is not None  # the one judging rule
    else:
        gate = f"max_abs > {DEFAULT_THRESHOLD:g}"
        over = lambda r: not _num(r.get("max_abs", r.get("err_active"))) <= DEFAULT_THRESHOLD
    for i, layer, rec in records:
        lay = layers[layer]
        if lay.first_step_over is None and over(rec):
            lay.first_step_over = i
    return ShadowDiff(reader.path, [layers[k] for k in sorted(layers)], gate, threshold, reader.num_steps)


# ---- rendering ------------------------------------------------------------------------------------
def render_shadow(res: ShadowDiff, console=None) -> None:
    """Print a ``ShadowDiff`` as a per-layer table and the first layer over the gate."""
    from rich.markup import escape
    from rich.table import Table

    from minillama.trace.render import console_for

    console = console or console_for()
    t = Table(title=f"shadow vs active backend, {escape(res.path)} ({res.steps} steps); over = {escape(res.gate)}")
    f = lambda x, spec=".2e": "-" if x is None else format(x, spec)
    cols = [("layer", lambda lay: str(lay.layer)), ("shadow", lambda lay: escape(str(lay.backend))),
            ("max|a-s|", lambda lay: f(lay.max_abs)), ("rel", lambda lay: f(lay.rel)),
            ("err act", lambda lay: f(lay.err_active)), ("err shd", lambda lay: f(lay.err_shadow)),
            ("ratio", lambda lay: f(lay.budget_ratio, ".2f")), ("ratio shd", lambda lay: f(lay.budget_ratio_shadow, ".2f")),
            ("worst@", lambda lay: str(lay.step_of_max)),
            ("over@", lambda lay: "-" if lay.first_step_over is None else str(lay.first_step_over))]
    cols = [(name, get) for name, get in cols if any(get(lay) != "-" for lay in res.layers) or name == "over@"]
    for name, _get in cols:
        t.add_column(name, justify="right", no_wrap=True)
    for lay in res.layers:
        t.add_row(*[get(lay) for _n, get in cols], style="red" if lay.over else "")
    console.print(t)
    first = res.first_over
    if first is None:
        console.print(f"[bold green]no layer over[/] ({escape(res.gate)}) (exit 0)")
    else:
        console.print(f"[bold red]first layer over:[/] layer {first.layer} (from step {first.first_step_over}; "
                      f"worst at step {first.step_of_max}) (exit 1)")
