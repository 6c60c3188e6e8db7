"""A/B: the cursor's step in both runs, site by site, with the first diverging site and token of the pair.

Rows are the sites both runs recorded, for the chosen request when both computed the same chunk of
it (else the whole batch): A's and B's mean and absmax, |A - B| (exact from full tensors, else a
lower bound from the statistics, 0 when the content hashes agree) and how it was measured. Enter
on a row moves the cursor to that site.
"""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.widgets import DataTable, Static

from minillama.debug.compare import THRESHOLD
from minillama.debug.navigation import Pos

from ..format import flat, num, seq_label
from .base import Jump, View


class CompareView(View):
    """Both runs at the cursor's step."""

    TITLE = "A/B"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.summary: tuple[Any, Any] | None = None
        self._batch_only = False  # the table's request rows fell back to the whole batch

    def compose(self) -> ComposeResult:
        yield Static(classes="view-body")
        yield DataTable(cursor_type="row", id="compare-table")

    def render_view(self) -> Any:
        comp, table = self.ctx.compare, self.query_one(DataTable)
        if comp is None:
            table.display = False
            return Text("A/B needs two traces: minillama-tui A --compare B", style="#ffd75f")
        if self.summary is None and not getattr(self, "_summarising", False):
            self._summarising = True
            self._summarise()
        i = self.pos.step if self.pos is not None else 0
        out = Text()
        from ..opening import title_of

        out.append(f"A {title_of(comp.a)}\nB {title_of(comp.b)}\n", style="dim")
        pairs = ", ".join(f"#{a}↔#{b}" for a, b in comp.pairs.items())
        out.append(f"requests matched by prompt token ids: {pairs}")
        if comp.unmatched:
            out.append(f"; only in A: {', '.join(f'#{s}' for s in comp.unmatched)}", style="#ffd75f")
        out.append("\n")
        if self.summary is None:
            out.append("finding the first diverging site and token…\n", style="dim italic")
        else:
            site, split = self.summary
            if site is not None:
                out.append(f"first site over {THRESHOLD:g}: ", style="bold")
                out.append(f"step {site[0]} {site[1].site} |A-B| {num(site[1].max_abs)} ({site[1].method})\n",
                           style="#ff5f5f")
            else:
                out.append(f"no site differs by more than {THRESHOLD:g}\n", style="#5fd75f")
            if split is not None:
                out.append("first diverging token: ", style="bold")
                out.append(f"step {split.step}, request #{split.seq_a} (B #{split.seq_b}): A ")
                out.append(repr(flat(split.text_a)), style="bold")
                out.append(" vs B ")
                out.append(repr(flat(split.text_b)), style="bold")
                out.append(f" after {flat(split.before)[-40:]!r}\n", style="dim")
            else:
                out.append("every matched request sampled the same tokens\n", style="#5fd75f")
        seq = self.chosen()
        seq_a = seq["seq_id"] if seq is not None and (seq["seq_id"], comp.pairs.get(seq["seq_id"])) in \
            comp.aligned(i) else None
        if seq_a is None and not comp.same_batch(i):
            out.append(f"step {i}: the two runs computed different chunks; pick a request both ran the same "
                       "way ([ ])", style="#ffd75f")
            table.display = False
            return out
        out.append("step ")
        out.append(str(i), style="bold")
        out.append(" · ")
        out.append_text(seq_label(seq_a) if seq_a is not None else Text("whole batch"))
        self._fill(table, i, seq_a)
        if seq_a is not None and self._batch_only:
            out.append("  (rows marked \"whole batch\": a trace kept no per-request statistics there, format 1)",
                       style="#ffd75f")
        out.append("   Enter: go to the site", style="dim")
        return out

    def _fill(self, table: DataTable, i: int, seq_a: int | None) -> None:
        table.display = True
        key = (i, seq_a)
        if getattr(self, "_filled", None) == key:
            return
        table.clear(columns=True)
        # the difference first, so a narrow terminal cuts the means rather than it
        for col in ("site", "|A-B|", "A mean", "B mean", "A absmax", "B absmax", "how"):
            table.add_column(col, key=col)
        diffs = self.ctx.compare.sites(i, seq_a)
        for d in diffs:
            a, b = d.a or {}, d.b or {}
            bound = "≥" if d.method == "stats" and d.max_abs else ""  # a lower bound, from the statistics
            how = d.method + (", whole batch" if d.whole_batch else "")
            table.add_row(Text(d.site), Text(bound + num(d.max_abs, 3), style="bold #ff5f5f" if d.over else ""),
                          num(a.get("mean"), 3), num(b.get("mean"), 3), num(a.get("absmax"), 3),
                          num(b.get("absmax"), 3), Text(how, style="dim"), key=d.site)
        self._filled, self._step = key, i
        self._batch_only = any(d.whole_batch for d in diffs)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.post_message(Jump(Pos(self._step, str(event.row_key.value)), "site from the A/B table"))

    @work(thread=True, exclusive=True, group="compare")
    def _summarise(self) -> None:
        comp = self.ctx.compare
        got = (comp.first_divergence(), comp.first_token_split())
        self.app.call_from_thread(self._done, got)

    def _done(self, got: tuple[Any, Any]) -> None:
        self.summary = got
        self.schedule()
