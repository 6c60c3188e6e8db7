"""What every view shares: the debugger context, the cursor reactives it binds to, and one redraw path.

The main screen owns the state (``ctx``, ``pos``, ``seq_id``, ``head``, ``row``, ``col``, ``tick``);
each view binds its own reactives of the same names to it (``data_bind``), so a change of any of
them schedules one redraw of the views that are shown, and hidden views redraw when shown.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rich.console import RenderableType
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.message import Message
from textual.reactive import reactive
from textual.widgets import Static

from minillama.debug.navigation import BEGIN, Pos

from ..screens.error import reads_trace


@dataclass
class Context:
    """What the views read besides the cursor: the timeline and the debugger-model helpers over it."""

    timeline: Any = None  # a Locked timeline (live chain or trace)
    keys: Any = None  # keys.KeyBook
    book: Any = None  # book.RequestBook
    budget: Any = None  # heatmap.BudgetMapper
    compare: Any = None  # compare.Comparison (A/B mode)
    tokens: Any = None  # tokens.TokenText
    breakpoints: list[Any] = field(default_factory=list)
    mode: str = "loading"  # loading, replay, live head, history, running, idle, stopped, failed
    reason: str = ""
    recording: str | None = None
    head: Pos | None = None  # live: where the engine is paused
    queued: int = 0  # live: prompts submitted that join the batch at the next step

    @property
    def live(self) -> bool:
        return bool(self.timeline is not None and getattr(self.timeline, "live", False))


class Jump(Message):
    """A view asks to move the cursor (Enter on a diff row, a heatmap cell, a compare row)."""

    def __init__(self, pos: Pos, why: str = "") -> None:
        super().__init__()
        self.pos, self.why = pos, why


class Choose(Message):
    """A view picks a request / head / row / column (the locator, Enter on a request row)."""

    def __init__(self, seq_id: int | None = None, head: int | None = None, row: int | None = None,
                 col: int | None = None) -> None:
        super().__init__()
        self.seq_id, self.head, self.row, self.col = seq_id, head, row, col


class View(VerticalScroll):
    """A scrollable view that renders ``render_view()`` into one body; subclasses may compose more."""

    TITLE = "view"
    BOUND = ("ctx", "pos", "seq_id", "head", "row", "col", "tick")  # bound to the screen's of the same names
    ctx: reactive[Context] = reactive(Context, always_update=True)
    pos: reactive[Pos | None] = reactive(None)
    seq_id: reactive[int | None] = reactive(None)
    head: reactive[int] = reactive(0)
    row: reactive[int] = reactive(-1)  # token row of the chosen request (-1: its last)
    col: reactive[int] = reactive(0)  # first column (dimension) shown
    tick: reactive[int] = reactive(0, always_update=True)  # the timeline changed (live steps)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.border_title = self.TITLE
        self._scheduled = False
        self._lines: int | None = None

    def compose(self) -> ComposeResult:
        yield Static(classes="view-body")

    # every watched change schedules one redraw
    def watch_ctx(self) -> None:
        self.schedule()

    def watch_pos(self) -> None:
        self.schedule()

    def watch_seq_id(self) -> None:
        self.schedule()

    def watch_head(self) -> None:
        self.schedule()

    def watch_row(self) -> None:
        self.schedule()

    def watch_col(self) -> None:
        self.schedule()

    def watch_tick(self) -> None:
        self.schedule()

    def on_show(self) -> None:
        self.schedule()

    def schedule(self) -> None:
        """Redraw once after the current batch of changes (several reactives often change together)."""
        if not self._scheduled and self.is_mounted:
            self._scheduled = True
            self.call_after_refresh(self.redraw)

    @property
    def shown(self) -> bool:
        """True when the view and every ancestor are displayed."""
        return self.display and self.is_mounted and all(n.display for n in self.ancestors_with_self
                                                        if hasattr(n, "display"))

    @reads_trace
    def redraw(self) -> None:
        """Render now (nothing while hidden: a view redraws when shown)."""
        self._scheduled = False
        if not self.shown:
            return
        body = self.query(".view-body")
        if not body:
            return
        renderable = self.render_view() if self.ctx.timeline is not None and self.pos is not None else self.waiting()
        static = body.first(Static)
        width = static.content_region.width
        lines = None
        if width > 0:  # a layout pass costs more than the rest of a redraw: only when the height changes
            console = self.app.console
            lines = len(console.render_lines(renderable, console.options.update(width=width, height=None),
                                             pad=False, new_lines=False))
        static.update(renderable, layout=lines is None or lines != self._lines)
        self._lines = lines

    def on_resize(self) -> None:
        self._lines = None
        self.schedule()

    def waiting(self) -> RenderableType:
        return Text({"loading": "starting…", "failed": "nothing to show"}.get(self.ctx.mode, "no step yet"),
                    style="dim")

    def render_view(self) -> RenderableType:
        raise NotImplementedError

    # ---- what the cursor stands on --------------------------------------------------------------
    @property
    def tl(self) -> Any:
        return self.ctx.timeline

    @property
    def event(self) -> dict[str, Any] | None:
        return self.tl.event(self.pos.step) if self.tl is not None and self.pos is not None else None

    @property
    def step_batch(self) -> dict[str, Any]:
        return (self.event or {}).get("batch") or {}

    def chosen(self) -> dict[str, Any] | None:
        """The batch entry of the chosen request (the first one when it is not in this step)."""
        seqs = self.step_batch.get("seqs") or []
        return next((s for s in seqs if s["seq_id"] == self.seq_id), seqs[0] if seqs else None)

    def requests(self, upto: int) -> dict[int, dict[str, Any]]:
        """Every request as of the end of step ``upto`` (the one request fold, with checkpoints)."""
        return self.ctx.book.after(upto) if self.ctx.book is not None else self.tl.requests(upto)

    def requests_now(self) -> dict[int, dict[str, Any]]:
        """Every request as the cursor sees it: after its step at ``sampled``, else as the step began (prompts
        known only by their ids, in a live step still running, are decoded here)."""
        if self.pos.site == "sampled" or self.ctx.book is None:
            out = self.requests(self.pos.step if self.pos.site == "sampled" else self.pos.step - 1)
        else:
            out = self.ctx.book.before(self.pos.step)
        tok = self.ctx.tokens
        if tok is not None and tok.ready:
            for sid, r in out.items():
                if not r.get("prompt") and r.get("prompt_token_ids"):
                    out[sid] = {**r, "prompt": tok.text(r["prompt_token_ids"])}
        return out

    def prompt_of(self, sid: int, known: dict[int, dict[str, Any]]) -> str:
        """A request's prompt text: as recorded, else (live) from the engine's own copy of the request."""
        r = known.get(sid) or {}
        if r.get("prompt"):
            return str(r["prompt"])
        session = getattr(self.tl, "session", None)
        seq = getattr(session, "requests", {}).get(sid) if session is not None else None
        tok = self.ctx.tokens
        if seq is not None and tok is not None and tok.ready:
            return tok.text(seq.token_ids[: seq.num_prompt_tokens]) or ""
        return ""

    @property
    def cur_layer(self) -> int | None:
        return self.pos.layer if self.pos is not None else None

    @property
    def at_begin(self) -> bool:
        return self.pos is None or self.pos.site == BEGIN
