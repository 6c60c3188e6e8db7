"""The debugger's main screen: the state every view binds to, the layout, and the keys that move the cursor.

State is reactive (``ctx``, ``pos``, ``view``, ``seq_id``, ``head``, ``row``, ``col``, ``tick``); views bind
their own reactives to these and redraw themselves, so no handler refreshes a view by hand. Cursor
moves are decided by ``cursor.Driver``; the live engine's side (loading, callbacks, prompts,
recording, restarts) lives in ``live.LiveControl``.
"""

from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Container
from textual.reactive import reactive
from textual.screen import Screen
from textual.widgets import DataTable, Input

from minillama.debug.navigation import Pos

from .breaks import Breaks
from .cursor import Driver, Move
from .footer import DebugFooter
from .live import LiveControl
from .opening import Opening
from .screens.error import reads_trace
from .selection import Selection
from .widgets.attention import AttentionView
from .widgets.base import Context, Jump, View
from .widgets.compare import CompareView
from .widgets.diff import DiffView
from .widgets.heatmap import HeatGrid, HeatmapView
from .widgets.inspector import InspectorView
from .widgets.kvcache import KVCacheView
from .widgets.requests import RequestsView
from .widgets.where import WhereView

#: In DOM order: in the split layout the left view comes first, then attention, then the inspector.
PROMPT_IDLE = "press / to type a prompt"
PROMPT_TYPING = "type a prompt; Enter sends it, Escape leaves"
VIEWS = {"kv": KVCacheView, "diff": DiffView, "requests": RequestsView, "heatmap": HeatmapView,
         "compare": CompareView, "attention": AttentionView, "inspector": InspectorView}
SPLIT_WIDTH = 140  # from here on: diff | attention over inspector, side by side
_DEBUGGER = {"help", "quit", "step", "next_layer", "next_site", "continue", "breakpoint", "back_step", "back_layer", "back_site",
             "first", "last", "find", "record", "view", "seq", "head", "row", "col", "locate", "toggle", "restart"}


class DebugScreen(Opening, LiveControl, Breaks, Selection, Screen):
    """One screen for live and replay; ``source`` opens the timeline (see ``app.DebuggerApp``)."""

    BINDINGS = [
        Binding("question_mark,f1", "help", "help", key_display="?"),
        Binding("q", "quit", "quit"),
        Binding("s", "step", "step"), Binding("n", "next_layer", "layer"), Binding("c", "continue", "cont"),
        Binding("b", "breakpoint", "break"), Binding("S,shift+s", "back_step", "back", key_display="S"),
        Binding("i", "view('inspector')", "inspect"), Binding("k", "view('kv')", "KV"),
        Binding("a", "view('attention')", "attn"), Binding("d", "view('diff')", "diff"),
        Binding("w", "view('requests')", "reqs"), Binding("h", "view('heatmap')", "heat"),
        Binding("x", "view('compare')", "A/B"), Binding("f", "find", "first over"),
        Binding("r", "record", "rec"), Binding("slash", "prompt", "prompt", key_display="/"),
        Binding("R", "restart", "restart", show=False),
        Binding("full_stop", "next_site", "next site", show=False),
        Binding("comma", "back_site", "back site", show=False), Binding("p", "back_layer", "back layer", show=False),
        Binding("g", "first", "first step", show=False), Binding("G", "last", "last step", show=False),
        Binding("right_square_bracket", "seq(1)", "next request", show=False),
        Binding("left_square_bracket", "seq(-1)", "previous request", show=False),
        Binding("plus,equals_sign", "head(1)", "next head", show=False),
        Binding("minus", "head(-1)", "previous head", show=False),
        Binding("up", "row(-1)", show=False), Binding("down", "row(1)", show=False),
        Binding("left", "col(-1)", show=False), Binding("right", "col(1)", show=False),
        Binding("l", "locate", "locate", show=False), Binding("t", "toggle", "ratio/difference", show=False),
        Binding("escape", "unfocus", "back to the keys"),
    ]
    ctx: reactive[Context] = reactive(Context, always_update=True)
    pos: reactive[Pos | None] = reactive(None)
    view: reactive[str] = reactive("inspector")
    seq_id: reactive[int | None] = reactive(None)
    head: reactive[int] = reactive(0)
    row: reactive[int] = reactive(-1)
    col: reactive[int] = reactive(0)
    tick: reactive[int] = reactive(0, always_update=True)

    def __init__(self, source: dict[str, Any]) -> None:
        super().__init__()
        self.source = source
        self.driver: Driver | None = None
        self.loaded = False
        self._toasts: dict[str, float] = {}

    def compose(self) -> ComposeResult:
        bound = {name: getattr(DebugScreen, name) for name in View.BOUND}
        yield WhereView(id="where").data_bind(**bound)
        with Container(id="views"):
            for name, cls in VIEWS.items():
                yield cls(id=name, classes="view").data_bind(**bound)
        yield Input(placeholder=PROMPT_IDLE, id="prompt")
        yield DebugFooter()

    def on_mount(self) -> None:
        self.query_one("#prompt").display = False
        self.watch_view(self.view)
        self.load()

    def on_resize(self) -> None:
        self.set_class(self.size.width >= SPLIT_WIDTH, "-split")
        self.watch_view(self.view)

    # ---- state ----------------------------------------------------------------------------------
    def set_ctx(self, **changes: Any) -> None:
        """Change the context (a new object, so every bound view sees it)."""
        self.ctx = Context(**{**self.ctx.__dict__, **changes})

    def status(self, reason: str | None = None) -> None:
        """Recompute the mode (from the driver) and, if given, set the reason the where panel shows."""
        mode = self.driver.mode(self.loaded, self.ctx.compare is not None) if self.driver else self.ctx.mode
        self.set_ctx(mode=mode, **({} if reason is None else {"reason": reason}), head=getattr(self.driver, "head", None))

    def watch_view(self, name: str) -> None:
        split = self.has_class("-split")
        shown = {name}
        if split:
            shown = {"attention", "inspector", name if name not in ("attention", "inspector") else "diff"}
        left = next(iter(shown - {"attention", "inspector"}), None)
        for view in self.query(".view"):
            view.display = view.id in shown
            view.set_class(split and view.id == left, "-left")
        target = self.query_one(f"#{name}")
        tables = target.query(DataTable) or target.query(HeatGrid)
        if tables and self.focused is not self.query_one("#prompt"):
            tables.first().focus()
        elif isinstance(self.focused, DataTable | HeatGrid):
            self.set_focus(None)

    def watch_pos(self, old: Pos | None, new: Pos | None) -> None:
        if new is None:
            return
        seqs = [s["seq_id"] for s in ((self.ctx.timeline.event(new.step) or {}).get("batch") or {}).get("seqs", [])]
        if self.seq_id not in seqs and seqs:
            self.seq_id = seqs[0]
        if old is None or old.step != new.step or old.site != new.site:
            self.row = -1

    def goto(self, move: Move, reason: str | None = None) -> None:
        """Apply a ``Move``: the new position, its notice, the reason to show."""
        if move.pos is not None:
            self.pos = move.pos
        if move.note:
            self.toast(move.note)
        self.status(reason if reason is not None else (self.ctx.reason if move.pos is None else ""))

    def toast(self, message: str, severity: str = "information", timeout: float = 4.0) -> None:
        """Notify once: the same message is not stacked again while it is still on screen."""
        import time

        now = time.monotonic()
        if self._toasts.get(message, 0.0) > now:
            return
        self._toasts[message] = now + timeout
        self.notify(message, severity=severity, timeout=timeout, markup=False)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Debugger keys are hidden while the prompt has focus; live-only keys in replay; A/B without a pair."""
        if action in _DEBUGGER or action in ("prompt",):
            if isinstance(self.focused, Input):
                return False
        if action == "unfocus":
            return self.focused is not None
        if action in ("record", "prompt", "restart") and not self.live:
            return False
        if action == "view" and parameters == ("compare",) and self.ctx.compare is None:
            return False
        return True

    def on_descendant_focus(self) -> None:
        self._prompt_hint()
        self.refresh_bindings()

    def on_descendant_blur(self) -> None:
        self._prompt_hint()
        self.refresh_bindings()

    def _prompt_hint(self) -> None:
        """The prompt line says how to start typing, and once it has focus, how to send or leave."""
        box = self.query_one("#prompt", Input)
        box.placeholder = PROMPT_TYPING if self.focused is box else PROMPT_IDLE

    # ---- cursor moves ---------------------------------------------------------------------------
    def action_step(self) -> None:
        """Run (or move) to the start of the next step."""
        self.forward("step")

    def action_next_layer(self) -> None:
        """Run (or move) to the end of the next layer."""
        self.forward("layer")

    def action_next_site(self) -> None:
        """Run (or move) to the next hook site."""
        self.forward("site")

    def action_back_step(self) -> None:
        self.goto(self.driver.back(self.pos, "step")) if self.driver else None

    def action_back_layer(self) -> None:
        self.goto(self.driver.back(self.pos, "layer")) if self.driver else None

    def action_back_site(self) -> None:
        self.goto(self.driver.back(self.pos, "site")) if self.driver else None

    def action_first(self) -> None:
        self.goto(self.driver.first()) if self.driver else None

    def action_last(self) -> None:
        self.goto(self.driver.last()) if self.driver else None

    def forward(self, unit: str) -> None:
        """A forward key: move over history, or run the live engine to the next ``unit``."""
        if self.driver is None:
            return
        move = self.driver.forward(self.pos, unit)
        if move.run:
            self.run_engine(move.run)
        else:
            self.goto(move)

    @reads_trace
    def on_jump(self, msg: Jump) -> None:
        msg.stop()
        if self.driver is None:
            return
        if self.driver.live:
            self.driver.following = msg.pos == self.driver.head
        self.pos = msg.pos
        self.status(msg.why)

    def action_view(self, name: str) -> None:
        """Show one of the views."""
        self.view = name

    def action_unfocus(self) -> None:
        self.set_focus(None)

    def action_help(self) -> None:
        self.app.action_help()

    async def action_quit(self) -> None:
        await self.app.action_quit()

