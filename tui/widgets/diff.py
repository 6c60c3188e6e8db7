"""Diff: each layer's attention error against the shadow backend / the float64 reference, over depth."""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from tui.format import num, sparkline
from tui.state import ViewState
from tui.widgets.base import TimelineView

#: A kernel whose error is more than twice plain attention's at the same precision adds error of its own.
BUDGET_THRESHOLD = 2.0


def first_over(shadow: dict[str, dict], threshold: float = BUDGET_THRESHOLD) -> tuple[int | None, str]:
    """The first layer whose active (or shadow) error-budget ratio exceeds ``threshold``, and which one."""
    for layer in sorted(shadow, key=int):
        m = shadow[layer]
        if (m.get("budget_ratio") or 0.0) > threshold:
            return int(layer), "active"
        if (m.get("budget_ratio_shadow") or 0.0) > threshold:
            return int(layer), "shadow"
    return None, ""


class DiffView(TimelineView):
    """Per-layer error of this step: which layer's kernel first leaves the error budget."""

    TITLE = "diff"

    def render_state(self, state: ViewState) -> RenderableType:
        ev = state.event
        if ev is None:
            return Text("No step yet.", style="dim")
        shadow = ev.get("shadow") or {}
        if not shadow:
            return Text("No shadow comparison at this step: start live with --shadow (reference, or another "
                        "backend), or record with `minillama record --shadow reference`.", style="yellow")
        layers = sorted(shadow, key=int)
        flagged, who = first_over(shadow)
        over = {int(k) for k in layers if max(shadow[k].get("budget_ratio") or 0.0,
                                              shadow[k].get("budget_ratio_shadow") or 0.0) > BUDGET_THRESHOLD}
        backend = shadow[layers[0]].get("backend", "?")
        head = Text()
        if flagged is None:
            head.append(f"all {len(layers)} layers within the error budget (ratio ≤ {BUDGET_THRESHOLD:g})",
                        style="bold green")
        else:
            ratio = shadow[str(flagged)].get("budget_ratio" if who == "active" else "budget_ratio_shadow")
            head.append(f"first layer over threshold: layer {flagged}", style="bold white on red")
            head.append(f"  ({who} error / budget = {num(ratio)} > {BUDGET_THRESHOLD:g}; "
                        f"{len(over)} layer{'s' if len(over) != 1 else ''} over)", style="bold red")
        spark = Text("budget ratio over depth (log): ")
        ratios = [shadow[k].get("budget_ratio") for k in layers]
        spark.append_text(sparkline(ratios, highlight={i for i, k in enumerate(layers) if int(k) in over}))
        if any("max_abs" in shadow[k] for k in layers):
            spark.append("\nmax |active-shadow| (log):      ")
            spark.append_text(sparkline([shadow[k].get("max_abs") for k in layers], style="magenta",
                                        highlight={i for i, k in enumerate(layers) if int(k) in over}))
        t = Table(box=None, pad_edge=False, header_style="bold")
        cols = [("layer", "layer"), ("max_abs", "max|a-s|"), ("rel", "rel"), ("err_active", "err active"),
                ("err_shadow", "err shadow"), ("budget", "budget"), ("budget_ratio", "ratio"),
                ("budget_ratio_shadow", "ratio shadow")]
        cols = [(k, label) for k, label in cols if k == "layer" or any(k in shadow[x] for x in layers)]
        for _, label in cols:
            t.add_column(label, justify="right", no_wrap=True)
        cur = state.layer
        for k in layers:
            m = shadow[k]
            style = "bold white on red" if int(k) == flagged else ("red" if int(k) in over else "")
            if cur is not None and int(k) == cur:
                style = (style + " reverse").strip() if style else "reverse"
            cells = [(k + (" ◂" if cur is not None and int(k) == cur else "")) if c == "layer" else num(m.get(c))
                     for c, _ in cols]
            t.add_row(*cells, style=style)
        return Group(head, Text(f"step {ev.get('step', state.step)} · active vs {backend} · "
                                f"threshold: error budget ratio > {BUDGET_THRESHOLD:g}", style="dim"), spark, t)
