"""The help screen (``?`` or F1): every key, what the views show, and the two modes."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

KEYS = (
    ("s", "next step: run to the start of the next scheduler step"),
    ("n", "next layer: run to the end of the next decoder layer (then logits, then the next step)"),
    (".", "next site: run to the next hook site (q, k, v, attention out, mlp out, ...)"),
    ("c", "continue until a breakpoint fires (live: or the requests finish)"),
    ("b", "toggle a breakpoint on the current site (at a step start: on every step)"),
    ("p", "back one layer (replay, and the finished steps of a live session)"),
    ("S (shift+s)", "back one step"),
    (",", "back one site"),
    ("g / G", "first step / last step (live: back to the live head)"),
    ("w i k a d", "views: where, tensor inspector, KV cache, attention, diff"),
    ("[ ]", "choose the request shown in the KV cache and attention views"),
    ("- +", "choose the attention head of the heatmap"),
    ("/", "type a new prompt (live); Enter sends it, Escape leaves the input"),
    ("r", "record on/off (live): writes traces/live-YYYYmmdd-HHMMSS"),
    ("tab", "focus the view, then arrows / PgUp / PgDn scroll it (escape or tab again to leave)"),
    ("ctrl+p", "command palette: breakpoints on NaN / shadow error, clearing them, and every action"),
    ("? or F1", "this help"),
    ("q", "quit"),
)

ABOUT = """\
Live: the engine runs in a worker thread and pauses at hook sites; stepping back walks the finished \
steps read-only ("history") and stepping forward past the newest step returns to the live head.
Replay: `minillama-tui traces/NAME` opens a recorded trace with no model and no GPU; every move works \
both ways.
Views: where (step, phase, layer, site, why we stopped, the requests and their text) · inspector \
(statistics and a slice of values per request) · KV cache (blocks by owner, shared blocks with \
reference counts, a request's block table and the slots it wrote) · attention (active vs shadow \
output and a weight heatmap recomputed from q and the cached keys) · diff (per-layer error against \
the shadow / float64 reference, budget ratio over depth, first layer over threshold)."""


class HelpScreen(ModalScreen[None]):
    """Keys and a short tour; any of escape, q, ? or F1 closes it."""

    BINDINGS = [Binding("escape,q,question_mark,f1", "dismiss", "close", show=True)]

    def compose(self) -> ComposeResult:
        t = Table(box=None, pad_edge=False, show_header=False)
        t.add_column(style="bold cyan", no_wrap=True)
        t.add_column()
        for key, what in KEYS:
            t.add_row(key, what)
        with VerticalScroll(id="help-box"):
            yield Static(Text("minillama-tui: keys", style="bold"))
            yield Static(t)
            yield Static(Text("\n" + ABOUT, style="dim"))

    def action_dismiss(self, result: None = None) -> None:
        self.dismiss(result)
