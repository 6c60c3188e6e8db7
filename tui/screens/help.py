"""The help screen (``?`` or F1): every key, what the views show, and the modes."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

KEYS = (
    ("s / n / .", "next step / layer / site (live at the head: run the engine that far; queued while it runs)"),
    ("S / p / ,", "back one step / layer / site (live: the finished steps, read-only)"),
    ("g / G", "start of the first step / end of the last one (live: back to the head)"),
    ("c", "continue to the next breakpoint (live: run; history and traces: search the recorded steps)"),
    ("b", "toggle a breakpoint on the cursor's site (at a step start: on every step)"),
    ("f", "first (step, layer) over the error budget, and why; again: the next one (A/B: first divergence)"),
    ("i k a d w h x", "views: inspector, KV cache, attention, diff, requests, heatmap, A/B"),
    ("[ ] / - + ", "the request / the attention head the views show"),
    ("↑ ↓ / ← →", "the token row / the column (dimension) of the values shown"),
    ("l", "locate: move to the largest |active - shadow| (or |A - B|, or |value|) of the visible view"),
    ("t", "heatmap: error-budget ratio or difference"),
    ("Enter", "on a diff row, a request row, a heatmap cell or an A/B row: go there"),
    ("tab / escape", "focus the view's table / back to the keys"),
    ("/", "live: type a prompt (checked when sent: refused alone if it cannot run)"),
    ("r", "live: record on/off (a recording started mid-run keeps the running requests and cached keys)"),
    ("R", "live: restart the engine session without quitting (history and the other requests stay)"),
    ("ctrl+p", "command palette: conditional breakpoints (NaN, absmax, the error budget) and every action"),
    ("? / q", "this help / quit"),
)

ABOUT = """\
Live: the engine runs in a worker thread and pauses where you ask; an error in a step fails the request \
that caused it and the others go on. Replay: `minillama-tui traces/NAME` needs no model and no GPU; \
`minillama-tui A --compare B` replays two runs of the same prompts in lockstep.
One rule judges attention everywhere (the diff view, the heatmap, f, the breakpoint, `minillama diff \
--shadow`): a backend is over when its error exceeds twice plain attention's at the same precision."""


class HelpScreen(ModalScreen[None]):
    """Keys and a short tour; any of escape, q, ? or F1 closes it."""

    BINDINGS = [Binding("escape,q,question_mark,f1", "dismiss", "close", show=True)]

    def compose(self) -> ComposeResult:
        t = Table(box=None, pad_edge=False, show_header=False)
        t.add_column(style="bold #87d7ff", no_wrap=True)
        t.add_column()
        for key, what in KEYS:
            t.add_row(key, what)
        with VerticalScroll(id="help-box"):
            title = Text("minillama-tui: keys", style="bold")
            title.append("   (escape, q or ? closes this)", style="dim")
            yield Static(title)
            yield Static(t)
            yield Static(Text("\n" + ABOUT, style="dim"))

    def action_dismiss(self, result: None = None) -> None:
        self.dismiss(result)
