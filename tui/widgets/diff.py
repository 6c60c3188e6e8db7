"""Diff: each layer's attention error against the shadow backend and the reference, judged by the one rule.

``trace.tables.judge`` decides over or within (the rule the breakpoint condition, the heatmap and
``minillama diff --shadow`` use); the bars use fixed scales, so the same height is the same value on
every step. Enter on a row moves the cursor to that layer's attention output.
"""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.text import Text
from textual.app import ComposeResult
from textual.widgets import DataTable, Static

from minillama.debug.navigation import Pos
from minillama.trace.tables import BUDGET_RATIO, floor_units, judge

from ..format import bars, num, plural
from .base import Jump, View

#: The verdict and the ratios first: on a narrow pane the table scrolls sideways, the verdict stays in view.
COLUMNS = (("layer", "layer"), ("verdict", "verdict"), ("budget_ratio", "ratio"), ("budget_ratio_rms", "ratio rms"),
           ("max_abs", "max|a-s|"), ("err_active", "err active"), ("err_shadow", "err shadow"),
           ("budget_ratio_shadow", "ratio shadow"))


class DiffView(View):
    """Per-layer shadow records of the cursor's step (or of the previous step, before this one ran)."""

    TITLE = "diff"

    def compose(self) -> ComposeResult:
        yield Static(classes="view-body")
        yield DataTable(cursor_type="row", zebra_stripes=False, id="diff-table")

    def has_shadow(self) -> bool:
        """Whether this run compares attention at all (live: the session's shadow; a trace: its manifest)."""
        reader = getattr(self.tl, "reader", None)
        if reader is not None:
            return bool(reader.manifest.get("shadow"))
        recorder = getattr(self.tl, "recorder", None)
        return recorder is not None and recorder.shadow is not None

    def records(self) -> tuple[int, dict[str, Any], str]:
        """The step whose records are shown, its records, and a note when it is not the cursor's step."""
        i = self.pos.step
        recs = self.tl.shadow(i) or {}
        if not recs and self.at_begin and i - 1 >= int(getattr(self.tl, "first_step", lambda: 0)()):
            prev = self.tl.shadow(i - 1) or {}
            if prev:
                return i - 1, prev, "this step has not run its attention yet: showing the step before (n runs a layer)"
        return i, recs, ""

    def render_view(self) -> Any:
        table = self.query_one(DataTable)
        if self.event is None:
            table.display = False
            return Text("No step here.", style="dim")
        i, recs, note = self.records()
        if not recs:
            table.display = False
            if self.has_shadow():
                return Text(f"Step {(self.event or {}).get('step', i)} has not run its attention yet: n runs the next "
                            "layer, s the whole step.", style="dim")
            how = "start live with --shadow (a backend, or alone for the float64 reference)" if self.ctx.live else \
                "record with `minillama record --shadow ...` (or live with --shadow)"
            return Text(f"No shadow comparison in this run: {how}.", style="#ffd75f")
        layers = sorted(recs, key=int)
        verdicts = {k: judge(recs[k]) for k in layers}
        over = [k for k in layers if verdicts[k]]
        total = int(self.tl.num_layers)
        head = Text()
        if over:
            head.append(f" first layer over the budget: layer {over[0]} ", style="bold white on #d70000")
            head.append(f"  {verdicts[over[0]]}; {len(over)} of {plural(len(layers), 'layer')} over", style="#ff5f5f")
        elif len(layers) < total:
            verb = "is" if len(layers) == 1 else "are"
            head.append(f"the {plural(len(layers), 'layer')} computed so far (of {total}) {verb} within the error "
                        "budget", style="bold #5fd75f")
        else:
            head.append("the only layer is within the error budget" if total == 1 else
                        f"all {total} layers within the error budget", style="bold #5fd75f")
        backend = recs[layers[0]].get("backend", "?")
        dtype = str(getattr(self.tl, "dtype", "float32"))
        sub = Text(f"step {(self.tl.event(i) or {}).get('step', i)} · active vs {backend} · over = error > "
                   f"{BUDGET_RATIO:g}x plain attention's (max-abs or RMS; the budget floored at {plural(floor_units(dtype), 'rounding unit')} "
                   f"of the {dtype} output)", style="dim")
        by_layer = [max((x for x in (recs[k].get("budget_ratio"), recs[k].get("budget_ratio_shadow"))
                         if x is not None), default=None) if k in recs else None for k in map(str, range(total))]
        spark = Text("ratio by layer, log 0.1…100, red over 2: ".rjust(42))
        spark.append_text(bars(by_layer, 0.1, 100.0, BUDGET_RATIO))
        parts: list[Any] = [head, sub, spark]
        if any(recs[k].get("max_abs") is not None for k in layers):
            spark2 = Text("max|active-shadow| by layer, log 1e-8…1: ".rjust(42))
            spark2.append_text(bars([recs.get(str(k), {}).get("max_abs") for k in range(total)], 1e-8, 1.0,
                                    style="#d787ff", hot="#d787ff"))
            parts.append(spark2)
        if note:
            parts.append(Text(note, style="italic #ffd75f"))
        self._fill(table, i, recs, layers, verdicts)
        return Group(*parts)

    def _fill(self, table: DataTable, i: int, recs: dict[str, Any], layers: list[str],
              verdicts: dict[str, str | None]) -> None:
        table.display = True
        cols = [(k, label) for k, label in COLUMNS if k in ("layer", "verdict") or any(k in recs[x] for x in layers)]
        key = (i, tuple(layers), tuple(c for c, _ in cols))
        if getattr(self, "_filled", None) != key:
            table.clear(columns=True)
            for k, label in cols:
                table.add_column(label, key=k)
            for k in layers:
                m, why = recs[k], verdicts[k]
                cells: list[Any] = []
                for c, _ in cols:
                    if c == "layer":
                        cells.append(Text(k, justify="right"))
                    elif c == "verdict":
                        cells.append(Text("OVER" if why else "ok", style="bold #ff5f5f" if why else "#5fd75f"))
                    else:
                        x = m.get(c)
                        hot = c.startswith("budget_ratio") and x is not None and not x <= BUDGET_RATIO
                        cells.append(Text(num(x), justify="right", style="bold #ff5f5f" if hot else ""))
                table.add_row(*cells, key=k)
            self._filled = key
        self._step_shown = i
        if self.cur_layer is not None and str(self.cur_layer) in layers:
            table.move_cursor(row=layers.index(str(self.cur_layer)), animate=False)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        layer = int(str(event.row_key.value))
        self.post_message(Jump(Pos(self._step_shown, f"layers.{layer}.attn.out"), f"layer {layer} from the diff"))
