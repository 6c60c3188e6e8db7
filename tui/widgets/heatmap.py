"""Heatmap: the whole run at a glance, steps down, layers across, one cell per (step, layer).

Cells show the error-budget ratio (``minillama.debug.heatmap``; ``judge`` decides red), or ``t``
toggles to the difference (max |active - shadow|, or |A - B| in A/B mode), each on a fixed scale
with the threshold marked. Arrows move the cell cursor; Enter jumps to that step and layer.
The grid draws only its visible lines (Textual's line API), so 1,000 steps cost what 40 do.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import numpy as np
from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.geometry import Size
from textual.message import Message
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip
from textual.widgets import Static

from minillama.debug.navigation import Pos

from ..format import diff_colour, plural, ratio_colour
from .base import Jump, View

LABEL = 7  # "  1234 " step labels
DIFF_THRESHOLD = 1e-3
SLICE = 64  # steps of a trace's map read at a time on the UI thread (~10 ms on a small CPU)


class HeatGrid(ScrollView, can_focus=True):
    """The grid of cells; posts ``Jump`` on Enter."""

    BINDINGS = [Binding("up", "move(-1, 0)", show=False), Binding("down", "move(1, 0)", show=False),
                Binding("left", "move(0, -1)", show=False), Binding("right", "move(0, 1)", show=False),
                Binding("pageup", "move(-20, 0)", show=False), Binding("pagedown", "move(20, 0)", show=False),
                Binding("home", "move(-1000000, 0)", show=False), Binding("end", "move(1000000, 0)", show=False),
                Binding("enter", "jump", "jump there")]
    cursor: reactive[tuple[int, int]] = reactive((0, 0))

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.index: list[int] = []
        self.labels: list[int] = []
        self.values: np.ndarray = np.zeros((0, 0))
        self.over: np.ndarray = np.zeros((0, 0), bool)
        self.kind = "ratio"
        self.threshold = 2.0

    def show(self, index: list[int], values: np.ndarray, over: np.ndarray, kind: str, threshold: float,
             labels: list[int] | None = None) -> None:
        """Draw ``values`` (rows: timeline ``index``, labelled with the engine's step numbers ``labels``), red
        where ``over`` (ratio) or over ``threshold`` (difference)."""
        self.index, self.values, self.over, self.kind, self.threshold = index, values, over, kind, threshold
        self.labels = labels if labels is not None and len(labels) == len(index) else list(index)
        self.virtual_size = Size(LABEL + 2 * values.shape[1] + 1, len(index))
        self.refresh()

    def cell(self, r: int, c: int) -> float | None:
        v = float(self.values[r, c])
        return None if math.isnan(v) else v

    def render_line(self, y: int) -> Strip:
        sx, sy = self.scroll_offset
        r = y + sy
        if r >= len(self.index):
            return Strip.blank(self.size.width)
        cr, cc = self.cursor
        segs = [Segment(f"{self.labels[r]:>6} ", Style(dim=r != cr, bold=r == cr))]
        colour = ratio_colour if self.kind == "ratio" else diff_colour
        for c in range(self.values.shape[1]):
            v = self.cell(r, c)
            if self.kind == "ratio" and self.over[r, c] and not (v is not None and v > self.threshold):
                v = self.threshold * 1.5  # over by the other measure (RMS): at least the legend's "over" colour
            bg = colour(v, self.threshold)
            text = "▐▌" if (r, c) == (cr, cc) else "  "
            segs.append(Segment(text, Style.parse(f"bold white on {bg}")))
        return Strip(segs).crop(sx, sx + self.size.width)

    def watch_cursor(self, old: tuple[int, int], new: tuple[int, int]) -> None:
        self.refresh()
        self.scroll_to_region_row(new[0])
        self.post_message(HeatGrid.Moved())

    def scroll_to_region_row(self, r: int) -> None:
        h = self.size.height or 1
        if r < self.scroll_offset.y:
            self.scroll_to(y=r, animate=False)
        elif r >= self.scroll_offset.y + h:
            self.scroll_to(y=r - h + 1, animate=False)

    def action_move(self, dr: int, dc: int) -> None:
        if not self.index:
            return
        r = min(max(self.cursor[0] + dr, 0), len(self.index) - 1)
        c = min(max(self.cursor[1] + dc, 0), max(self.values.shape[1] - 1, 0))
        self.cursor = (r, c)

    def action_jump(self) -> None:
        if self.index:
            r, c = self.cursor
            self.post_message(Jump(Pos(self.index[r], f"layers.{c}.attn.out"), f"heatmap cell (step {self.labels[r]}, "
                                                                               f"layer {c})"))

    class Moved(Message):
        """The cell cursor moved (the view's header follows it)."""


class HeatmapView(View):
    """The heatmap of every recorded step (rows) and layer (columns)."""

    TITLE = "heatmap"
    kind: reactive[str] = reactive("ratio")

    def compose(self) -> ComposeResult:
        yield Static(classes="view-body")
        yield HeatGrid(id="heat-grid")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.map: Any = None
        self.diffs: Any = None
        self._busy = False

    def watch_kind(self) -> None:
        self.schedule()

    def on_show(self) -> None:  # a trace's map starts now, not at the first redraw (after the footer's keys)
        if self.map is None and self.ctx.timeline is not None and not self.ctx.live:
            self._start()
        super().on_show()

    def toggle(self) -> None:
        """Switch between the budget ratio and the difference."""
        self.kind = "diff" if self.kind == "ratio" else "ratio"

    def render_view(self) -> Any:
        if self.map is None or self.ctx.live or (self.ctx.compare is not None and self.diffs is None):
            self._start()
        if self.map is None:
            return Text("computing the heatmap…", style="dim italic")
        grid = self.query_one(HeatGrid)
        m = self.map
        if self.kind == "diff" and self.ctx.compare is not None and self.diffs is not None:
            values, what = self.diffs, "max |A - B| over the layer's sites"
        elif self.kind == "diff" and m.diff is not None:
            values, what = m.diff, "max |active - shadow|"
        else:
            values, what = m.ratio, "error-budget ratio"
        kind = "ratio" if values is m.ratio else "diff"
        labels = m.steps
        grid.show(m.index, values, m.over, kind, m.threshold if kind == "ratio" else DIFF_THRESHOLD, labels)
        if self.pos is not None and self.pos != getattr(self, "_synced", None) and self.pos.step in m.index:
            self._synced = self.pos  # the cell cursor follows the debugger's cursor (not the other way round)
            grid.cursor = (m.index.index(self.pos.step), self.cur_layer or 0)
        head = Text(f"{what}, step × layer: {plural(len(m.index), 'step')}, {plural(m.num_layers, 'layer')}; ",
                    style="bold")
        if kind == "ratio" and not np.isfinite(values).any():
            how = "start with --shadow" if self.ctx.live else "this trace was recorded without --shadow"
            head.append(f"no shadow attention in this run, nothing to judge ({how})", style="#d7af00")
        elif kind == "ratio":
            head.append(f"{m.num_over} cells over the budget" if m.num_over else "every cell within the budget",
                        style="#ff5f5f" if m.num_over else "#5fd75f")
        else:
            big = int(np.nansum(values > DIFF_THRESHOLD))
            head.append(f"{big} of {int(np.isfinite(values).sum())} cells differ by more than {DIFF_THRESHOLD:g}",
                        style="#ff5f5f" if big else "#5fd75f")
        head.append("   ↑↓←→ move  Enter jump  f first over  t ratio/difference", style="dim")
        legend = Text("scale: ")
        if kind == "ratio":
            for label, r in (("≤0.25", 0.2), ("≤1", 0.9), ("≤2", 1.9), (">2 over", 3.0), (">10", 11.0)):
                legend.append("  ", style=f"on {ratio_colour(r, 2.0)}")
                legend.append(f" {label}  ")
        else:
            for label, d in (("0", 0.0), ("<1e-5", 1e-6), (f"<{DIFF_THRESHOLD:g}", 1e-4), (">1e-3", 1e-2),
                             (">0.1", 1.0)):
                legend.append("  ", style=f"on {diff_colour(d, DIFF_THRESHOLD)}")
                legend.append(f" {label}  ")
        legend.append("   (threshold: ratio 2 / |diff| 1e-3)", style="dim")
        r, c = grid.cursor
        here = Text("")
        if m.index:
            v = grid.cell(min(r, len(m.index) - 1), c)
            here = Text(f"cell: step {labels[min(r, len(m.index) - 1)]}, layer {c}: "
                        f"{'-' if v is None else format(v, '.3g')}")
            why = m.why.get((m.index[min(r, len(m.index) - 1)], c))
            if why:
                here.append(f"  OVER: {why}", style="#ff5f5f")
        axis = Text(" " * (LABEL - 6) + "layer ", style="dim")  # the ticks are layers; rows are labelled by step
        for c in range(m.num_layers):
            axis.append(f"{c:<2}"[:2] if c % 5 == 0 else "  ", style="bold" if c == grid.cursor[1] else "dim")
        width = max(self.size.width - 2, 10)
        axis.truncate(width)
        if self.size.height and self.size.height < 16:  # a short pane: one line each, so grid rows still show
            for line in (head, legend, here):
                line.truncate(width, overflow="ellipsis")
        return Text("\n").join([head, legend, here, axis])

    def on_heat_grid_moved(self, _msg: Any) -> None:
        self.schedule()

    def _start(self) -> None:
        """Build the map in the background, unless a build is under way."""
        if self._busy:
            return
        self._busy = True
        if self.ctx.compare is None and self.ctx.budget.sliceable:
            self._build_in_slices()
        else:
            self._build()

    @work(group="heatmap")
    async def _build_in_slices(self) -> None:
        """A trace's map in slices between the UI's frames (a thread fought the UI for the GIL: 2x slower)."""
        try:
            while self.ctx.budget.read_slice(SLICE):
                await asyncio.sleep(0)
            m = self.ctx.budget.build()
        finally:
            self._busy = False
        self._built(m, None)

    @work(thread=True, group="heatmap")
    def _build(self) -> None:
        """A live or A/B map in a worker thread (a live timeline's lock may be held by the engine)."""
        try:
            m = self.ctx.budget.build()
            diffs = self._diffs(m) if self.ctx.compare is not None else None
        finally:
            self._busy = False
        self.app.call_from_thread(self._built, m, diffs)

    def _diffs(self, m: Any) -> np.ndarray:
        comp = self.ctx.compare
        out = np.full((len(m.index), m.num_layers), np.nan)
        from minillama import hooks

        for r, i in enumerate(m.index):
            if i >= comp.num_steps():
                continue
            for d in comp.sites(i):
                layer = hooks.site_layer(d.site)
                if layer is not None and d.max_abs is not None and layer < m.num_layers:
                    out[r, layer] = np.fmax(out[r, layer], d.max_abs)
        return out

    def _built(self, m: Any, diffs: Any) -> None:
        changed = self.map is None or len(self.map.index) != len(m.index) or (diffs is not None and self.diffs is None)
        self.map, self.diffs = m, diffs if diffs is not None else self.diffs
        if changed:
            self.schedule()
