"""minillama-tui: step through the engine live, or replay a recorded trace, in the terminal.

    minillama-tui [--model PATH] [--backend torch|flash-attn] [--shadow [BACKEND]] [--prompt "..."]...
    minillama-tui traces/NAME

The engine runs in the debug session's worker thread; its callbacks only post messages to the app,
so the UI never waits on the engine and the engine never waits on the UI. Views read one timeline
interface (``tui.sources``) and do not know whether it is live or recorded.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterable
from typing import Any

from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.screen import Screen
from textual.widgets import ContentSwitcher, Footer, Input

from tui.navigation import BEGIN, Pos, before, find_breakpoint, next_pos, prev_pos, sites_of
from tui.screens.error import ErrorScreen
from tui.screens.help import HelpScreen
from tui.sources import LiveOptions, LiveSource, RequestBook, open_trace, start_live
from tui.state import ViewState
from tui.widgets.attention import AttentionView
from tui.widgets.base import TimelineView
from tui.widgets.diff import DiffView
from tui.widgets.inspector import InspectorView
from tui.widgets.kvcache import KVCacheView
from tui.widgets.requests import RequestsView
from tui.widgets.where import WhereView

VIEWS = ("inspector", "kv", "attention", "diff", "requests")


# ---- messages the worker threads post (thread-safe, never blocking the engine) --------------------
class Loaded(Message):
    def __init__(self, source: Any, session: Any = None) -> None:
        super().__init__()
        self.source, self.session = source, session


class LoadFailed(Message):
    def __init__(self, title: str, error: str) -> None:
        super().__init__()
        self.title, self.error = title, error


class Paused(Message):
    def __init__(self, position: Any) -> None:
        super().__init__()
        self.position = position


class EngineEvent(Message):
    def __init__(self, kind: str, data: Any) -> None:
        super().__init__()
        self.kind, self.data = kind, data


class SearchDone(Message):
    def __init__(self, hit: tuple[Pos, str] | None, fallback: Pos | None, note: str) -> None:
        super().__init__()
        self.hit, self.fallback, self.note = hit, fallback, note


def one_line(e: BaseException) -> str:
    """``TypeName: first line`` of an exception (what the user sees instead of a traceback)."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


class DebuggerApp(App[None]):
    """The debugger. Pass ``trace`` to replay, else ``options`` (and optionally a loaded ``llm``) to go live."""

    CSS_PATH = "app.tcss"
    TITLE = "minillama-tui"
    AUTO_FOCUS = None
    BACK = Binding.Group("back")
    VIEWS = Binding.Group("views", compact=True)
    BINDINGS = [
        Binding("s", "step", "step"),
        Binding("n", "next_layer", "layer"),
        Binding("c", "continue", "cont"),
        Binding("b", "breakpoint", "break"),
        Binding("p", "back_layer", "back layer", group=BACK),
        Binding("S,shift+s", "back_step", "back step", key_display="S", group=BACK),
        Binding("r", "record", "rec"),
        Binding("i", "view('inspector')", "inspector", group=VIEWS),
        Binding("k", "view('kv')", "KV cache", group=VIEWS),
        Binding("a", "view('attention')", "attention", group=VIEWS),
        Binding("d", "view('diff')", "diff", group=VIEWS),
        Binding("w", "view('requests')", "requests (where)", group=VIEWS),
        Binding("question_mark,f1", "help", "help", key_display="?"),
        Binding("q", "quit", "quit"),
        Binding("full_stop", "next_site", "next site", show=False),
        Binding("comma", "back_site", "back site", show=False),
        Binding("g", "first", "first step", show=False),
        Binding("G", "last", "last step / live head", show=False),
        Binding("right_square_bracket", "seq(1)", "next request", show=False),
        Binding("left_square_bracket", "seq(-1)", "previous request", show=False),
        Binding("plus,equals_sign", "head(1)", "next head", show=False),
        Binding("minus", "head(-1)", "previous head", show=False),
        Binding("slash", "prompt", "prompt", show=False),
    ]

    def __init__(self, trace: str | None = None, options: LiveOptions | None = None, llm: Any = None,
                 record_dir: str = "traces") -> None:
        super().__init__()
        self.trace_path = trace
        self.options = options or LiveOptions()
        self.llm = llm
        self.record_dir = record_dir
        self.live = trace is None
        self.source: Any = None
        self.session: Any = None
        self.book: RequestBook | None = None
        self.cursor: Pos | None = None
        self.head: Pos | None = None  # live: where the engine is paused
        self.following = True  # live: the cursor tracks the head
        self.running = False
        self.run_mode = ""
        self.queue: list[str] = []
        self.idle = False
        self.failed = False
        self.reason = ""
        self.seq_id: int | None = None
        self.head_index = 0
        self.local_breakpoints: list[Any] = []
        self.record_path: str | None = None
        self.view = "inspector"
        self.loaded = False  # True once the trace is open or the live session has paused for the first time

    # ---- layout -----------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        with Vertical(id="main"):
            yield WhereView(id="where")
            with ContentSwitcher(initial="inspector", id="views"):
                yield InspectorView(id="inspector", classes="view")
                yield KVCacheView(id="kv", classes="view")
                yield AttentionView(id="attention", classes="view")
                yield DiffView(id="diff", classes="view")
                yield RequestsView(id="requests", classes="view")
        yield Input(placeholder="/ to type a prompt, Enter sends it to the engine", id="prompt")
        yield Footer(show_command_palette=False)

    def on_mount(self) -> None:
        self.query_one("#prompt", Input).display = self.live
        self.query_one(WhereView).border_title = "minillama-tui"
        self._refresh()
        if self.live:
            self._load_live()
        else:
            self._load_trace()

    # ---- loading (workers) --------------------------------------------------------------------------
    @work(thread=True, exclusive=True, group="load")
    def _load_trace(self) -> None:
        from minillama.trace.reader import TraceError

        try:
            source = open_trace(self.trace_path or "")
        except TraceError as e:
            self.post_message(LoadFailed("Cannot open the trace", str(e)))
            return
        except Exception as e:  # anything else a damaged folder can raise: still one line
            self.post_message(LoadFailed("Cannot open the trace", f"{self.trace_path}: {one_line(e)}"))
            return
        self.post_message(Loaded(source))

    @work(thread=True, exclusive=True, group="load")
    def _load_live(self) -> None:
        try:
            session = start_live(self.options, self.llm)
        except Exception as e:
            self.post_message(LoadFailed("Cannot start the engine", one_line(e)))
            return
        self.post_message(Loaded(LiveSource(session), session))

    def on_loaded(self, msg: Loaded) -> None:
        self.source = msg.source
        self.book = RequestBook(self.source)
        self.query_one(WhereView).border_title = self.source.title()
        if msg.session is None:
            self._warm_book()
            self.loaded = True
            self.cursor = Pos(0, BEGIN) if self.source.num_steps() else None
            if self.source.num_steps() == 0:
                self.notify("This trace holds no steps.", severity="warning")
            self._refresh()
            return
        session = self.session = msg.session
        session.on_pause = self._worker_paused
        session.on_event = self._worker_event
        self.running = True
        session.start()
        self._refresh()

    def _warm_book(self) -> None:
        """Fold the trace's requests a few milliseconds at a time while the UI is idle, so that jumping
        to the end of a long trace is instant (on the UI thread: the trace reader is not thread-safe)."""
        if self.book is None or self.book.warmed():
            return
        self.book.warm(budget_s=0.008)
        self.set_timer(0.02, self._warm_book)

    def on_load_failed(self, msg: LoadFailed) -> None:
        self.failed = True
        self.query_one(WhereView).border_title = msg.title.lower()
        self._refresh()
        self.push_screen(ErrorScreen(msg.title, msg.error, fatal=True))

    # ---- engine callbacks (worker thread: post, never touch widgets) ----------------------------------
    def _worker_paused(self, position: Any) -> None:
        if isinstance(self.source, LiveSource):
            self.source.remember(self._index(position.step))
        self.post_message(Paused(position))

    def _worker_event(self, kind: str, data: Any) -> None:
        if kind in ("step", "idle", "error"):
            self.post_message(EngineEvent(kind, data))

    def _index(self, engine_step: int) -> int:
        """Timeline index of an engine step number (they differ when the engine ran before the session)."""
        s = self.session
        events = s.events
        cur = s.current_event
        base = events[0]["step"] if events else (cur["step"] if cur else engine_step)
        return engine_step - base

    def on_paused(self, msg: Paused) -> None:
        pos = msg.position
        site = pos.site
        if site.endswith(".attn.call"):  # not a recorded site: show the attention inputs just before it
            site = site.removesuffix("call") + "v"
        self.head = Pos(self._index(pos.step), site)
        if pos.reason.startswith("breakpoint"):
            self.queue.clear()
        if self.queue and self.following and self.engine_alive:
            self.cursor = self.head  # a key pressed while running: show where we are and go on
            self._run(self.queue.pop(0))
            return
        self.running = False
        self.idle = False
        self.loaded = True
        if self.following:
            self.cursor = self.head
            self.reason = pos.reason if pos.reason.startswith("breakpoint") else f"paused: {pos.reason}"
        self._refresh()

    def on_engine_event(self, msg: EngineEvent) -> None:
        if msg.kind == "step" and self.running and self.following:
            n = len(self.session.events)
            if n:
                self.cursor = Pos(n - 1, sites_of(self.session.events[-1])[-1])
                self.reason = "running…"
                self._refresh()
        elif msg.kind == "idle":
            self.queue.clear()
            self.running = False
            self.idle = True
            self.loaded = True
            self.head = None
            if self.following:
                n = len(self.session.events)
                self.cursor = Pos(n - 1, sites_of(self.session.events[-1])[-1]) if n else None
                self.reason = "all requests finished: press / to type a prompt"
            self._refresh()
        elif msg.kind == "error":
            self.queue.clear()
            self.running = False
            self.head = None
            self.push_screen(ErrorScreen("The engine stopped with an error", one_line(msg.data) +
                                         "\n\nThe steps it finished stay browsable (p, S, g)."))
            self._refresh()

    # ---- the cursor -------------------------------------------------------------------------------
    @property
    def breakpoints(self) -> list[Any]:
        return self.session.breakpoints if self.session is not None else self.local_breakpoints

    @property
    def engine_alive(self) -> bool:
        s = self.session
        return s is not None and s.error is None and s._thread is not None and s._thread.is_alive()

    def mode(self) -> str:
        if self.failed:
            return "not loaded"
        if not self.loaded:
            return "loading" if self.live else "opening"
        if not self.live:
            return "replay"
        if not self.following:
            return "history (read-only)"
        if self.session is not None and self.session.error is not None:
            return "history (read-only)"
        if self.running:
            return "running"
        if self.idle:
            return "idle"
        return "live head"

    def state(self) -> ViewState:
        tl = self.source
        pos = self.cursor
        event = tl.event(pos.step) if tl is not None and pos is not None else None
        seq_ids = [s["seq_id"] for s in ((event or {}).get("batch") or {}).get("seqs", [])]
        if self.seq_id not in seq_ids:
            self.seq_id = seq_ids[0] if seq_ids else None
        requests = {}
        if self.book is not None and pos is not None:
            requests = self.book.after(pos.step if pos.site == "sampled" else pos.step - 1)
        return ViewState(timeline=tl, step=pos.step if pos else 0, site=pos.site if pos else BEGIN, event=event,
                         mode=self.mode(), reason=self.reason, seq_id=self.seq_id, head=self.head_index,
                         breakpoints=list(self.breakpoints), requests=requests,
                         recording=self.record_path if self.session is not None and self.session.recording else None)

    def _refresh(self, views: bool = True) -> None:
        """Redraw the where panel and (unless ``views`` is False) the visible view from the cursor."""
        st = self.state()
        self.query_one(WhereView).show(st)
        if views:
            self.query_one(f"#{self.view}", TimelineView).show(st)

    def _goto(self, pos: Pos, reason: str = "") -> None:
        self.cursor = pos
        self.reason = reason
        if self.live and self.head is not None and pos == self.head:
            self.following = True
        self._refresh()

    def _back_to_head(self, note: str) -> None:
        self.following = True
        if self.head is not None:
            self.cursor = self.head
            self.reason = "back at the live head"
        elif self.session is not None and self.session.events:
            self.cursor = Pos(len(self.session.events) - 1, sites_of(self.session.events[-1])[-1])
            self.reason = "newest step"
        self.notify(note, timeout=3)
        self._refresh()

    def _forward(self, unit: str) -> None:
        if self.source is None or self.cursor is None and not self.live:
            return
        if not self.live:
            nxt = next_pos(self.source, self.cursor, unit)
            if nxt is None:
                self.notify("End of the trace: press p or S to step back, g for the first step.", timeout=3)
                return
            self._goto(nxt)
            return
        if not self.following:
            nxt = next_pos(self.source, self.cursor, unit) if self.cursor else None
            if nxt is None or self.head is None or not before(nxt, self.head, self.source):
                self._back_to_head("Back at the live head: the next key runs the engine.")
            else:
                self._goto(nxt)
            return
        if not self.engine_alive:
            self.notify("The engine is not running (it stopped); history stays browsable.", severity="warning")
            return
        if self.idle:
            self.notify("All requests finished: press / and type a prompt to start new work.", timeout=4)
            return
        if self.running and self.run_mode != "continue":
            if len(self.queue) < 32:  # keys pressed while the engine works run one after another
                self.queue.append(unit)
            self.reason = f"running… ({len(self.queue)} more queued)"
            self.query_one(WhereView).show(self.state())
            return
        self._run(unit)

    def _run(self, unit: str) -> None:
        """Tell the session to run to the next ``unit`` ("step", "layer", "site" or "continue")."""
        {"step": self.session.step, "layer": self.session.next_layer, "site": self.session.next_site,
         "continue": self.session.continue_}[unit]()
        self.run_mode = unit
        self.running = True
        self.reason = {"step": "running to the next step…", "layer": "running to the next layer…",
                       "site": "running to the next site…", "continue": "running to the next breakpoint…"}[unit]
        self._refresh(views=False)  # only the status line: the engine needs the CPU now

    def _back(self, unit: str) -> None:
        if self.source is None:
            return
        start = self.cursor or self.head
        if start is None:
            return
        prv = prev_pos(self.source, start, unit)
        if prv is None:
            self.notify("At the first step: nothing earlier was recorded.", timeout=3)
            return
        if self.live:
            self.following = False
        self._goto(prv)

    # ---- actions --------------------------------------------------------------------------------
    def action_step(self) -> None:
        """Run (or move) to the start of the next step."""
        self._forward("step")

    def action_next_layer(self) -> None:
        """Run (or move) to the end of the next layer."""
        self._forward("layer")

    def action_next_site(self) -> None:
        """Run (or move) to the next hook site."""
        self._forward("site")

    def action_back_layer(self) -> None:
        self._back("layer")

    def action_back_step(self) -> None:
        self._back("step")

    def action_back_site(self) -> None:
        self._back("site")

    def action_continue(self) -> None:
        """Run to the next breakpoint (over history and traces: search the recorded steps)."""
        if self.source is None or self.cursor is None and not self.live:
            return
        if self.live and self.following:
            if not self.engine_alive:
                self.notify("The engine is not running (it stopped).", severity="warning")
                return
            if self.idle:
                self.notify("All requests finished: press / and type a prompt to start new work.", timeout=4)
                return
            self.queue.clear()
            self._run("continue")
            return
        self.reason = "searching…"
        self._refresh()
        self._search(self.cursor, self.head if self.live else None)

    @work(thread=True, exclusive=True, group="search")
    def _search(self, start: Pos, limit: Pos | None) -> None:
        hit = find_breakpoint(self.source, start, list(self.breakpoints), limit)
        fallback, note = None, ""
        if hit is None and not self.live:
            last = self.source.num_steps() - 1
            fallback = Pos(last, sites_of(self.source.event(last))[-1]) if last >= 0 else None
            note = "No breakpoint ahead: at the end of the trace." if self.breakpoints else \
                "No breakpoints set (b sets one on the current site): at the end of the trace."
        elif hit is None:
            note = "No breakpoint in the history: back at the live head (c again runs the engine)."
        self.post_message(SearchDone(hit, fallback, note))

    def on_search_done(self, msg: SearchDone) -> None:
        if msg.hit is not None:
            self._goto(*msg.hit)
        elif self.live:
            self._back_to_head(msg.note)
        else:
            if msg.fallback is not None:
                self._goto(msg.fallback, "end of trace")
            self.notify(msg.note, timeout=4)

    def action_breakpoint(self) -> None:
        """Toggle an unconditional breakpoint on the cursor's site."""
        if self.cursor is None:
            return
        pattern = "step" if self.cursor.site == BEGIN else self.cursor.site
        if self.session is not None:
            on_now = self.session.toggle_breakpoint(pattern)
        else:
            from minillama.debug.session import Breakpoint

            found = [bp for bp in self.local_breakpoints if bp.pattern == pattern and bp.condition is None]
            for bp in found:
                self.local_breakpoints.remove(bp)
            if not found:
                self.local_breakpoints.append(Breakpoint(pattern))
            on_now = not found
        self.notify(f"Breakpoint {'set on' if on_now else 'removed from'} {pattern}.", timeout=3)
        self._refresh()

    def add_breakpoint(self, pattern: str, condition: str | None = None, value: float = 0.0) -> None:
        """Add a conditional breakpoint (from the command palette)."""
        from minillama.debug.session import Breakpoint

        bp = Breakpoint(pattern, condition, value)
        self.breakpoints.append(bp)
        self.notify(f"Breakpoint set: {bp.describe()}.", timeout=3)
        self._refresh()

    def clear_breakpoints(self) -> None:
        self.breakpoints.clear()
        self.notify("All breakpoints cleared.", timeout=3)
        self._refresh()

    def action_record(self) -> None:
        """Switch recording of the live session on or off."""
        if self.session is None:
            self.notify("Replay is read-only: recording works in live mode.", severity="warning", timeout=3)
            return
        if self.session.recording:
            path = self.record_path
            steps = self.session._writer.num_steps if self.session._writer is not None else 0
            self.session.stop_recording()
            self.notify(f"Recording saved: {path} ({steps} steps). Replay it with: minillama-tui {path}", timeout=6)
            self._refresh()
            return
        path = base = os.path.join(self.record_dir, time.strftime("live-%Y%m%d-%H%M%S"))
        n = 1
        while os.path.exists(path):  # two recordings within one second
            n += 1
            path = f"{base}-{n}"
        try:
            self.session.start_recording(path)
        except Exception as e:
            self.notify(f"Cannot record: {one_line(e)}", severity="error", timeout=6)
            return
        self.record_path = path
        self.notify(f"Recording every following step to {path} (r again stops).", timeout=4)
        self._refresh()

    def action_view(self, name: str) -> None:
        """Show one of the views."""
        self.view = name
        self.query_one(ContentSwitcher).current = name
        self._refresh()

    def action_seq(self, delta: int) -> None:
        """Choose the request shown by the KV cache and attention views."""
        ids = [s["seq_id"] for s in self.state().seqs]
        if ids:
            i = ids.index(self.seq_id) if self.seq_id in ids else 0
            self.seq_id = ids[(i + delta) % len(ids)]
            self._refresh()

    def action_head(self, delta: int) -> None:
        """Choose the attention head of the heatmap."""
        heads = 1
        if self.source is not None and self.cursor is not None:
            rec = (((self.source.event(self.cursor.step) or {}).get("sites") or {})
                   .get(f"layers.{self.state().layer or 0}.attn.q"))
            if rec and len(rec.get("shape", [])) == 3:
                heads = rec["shape"][1]
        self.head_index = (self.head_index + delta) % max(heads, 1)
        self._refresh()

    def action_first(self) -> None:
        if self.source is not None and self.source.num_steps():
            if self.live:
                self.following = False
            self._goto(Pos(0, BEGIN))

    def action_last(self) -> None:
        if self.source is None:
            return
        if self.live:
            self._back_to_head("At the live head.")
        elif self.source.num_steps():
            self._goto(Pos(self.source.num_steps() - 1, BEGIN))

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_prompt(self) -> None:
        if not self.live:
            self.notify("Replay is read-only: prompts go to a live session.", severity="warning", timeout=3)
            return
        self.query_one("#prompt", Input).focus()

    @on(Input.Submitted, "#prompt")
    def _submit(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        event.input.value = ""
        self.set_focus(None)
        if not text:
            return
        if self.session is None or not self.engine_alive:
            self.notify("The engine is not running: the prompt was not sent.", severity="warning")
            return
        from minillama import SamplingParams

        try:
            self.session.submit(text, SamplingParams(temperature=self.options.temperature,
                                                     max_tokens=self.options.max_tokens))
        except Exception as e:
            self.notify(f"Prompt refused: {one_line(e)}", severity="error", timeout=6)
            return
        if self.idle:
            self.session.step()  # wake up paused at the new step's start
            self.idle = False
            self.running = True
            self.following = True
            self.reason = "starting the new request…"
            self._refresh()
        else:
            self.notify("Queued: the request joins the batch at the next step.", timeout=3)

    def on_key(self, event) -> None:
        if event.key == "escape" and self.focused is not None and self.screen is self.screen_stack[0]:
            self.set_focus(None)
            event.stop()

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield SystemCommand("Next site", "Run (or move) to the next hook site (.)", self.action_next_site)
        yield SystemCommand("Back one site", "Move to the previous hook site (,)", self.action_back_site)
        yield SystemCommand("First step", "Go to the first recorded step (g)", self.action_first)
        yield SystemCommand("Last step / live head", "Go to the newest position (G)", self.action_last)
        yield SystemCommand("Breakpoint: NaN or Inf anywhere", "Stop at any site whose tensor has NaN/Inf",
                            lambda: self.add_breakpoint("*", "nan"))
        yield SystemCommand("Breakpoint: shadow differs by more than 1e-3",
                            "Stop after the attention of a layer whose shadow output differs",
                            lambda: self.add_breakpoint("layers.*.attn.out", "shadow", 1e-3))
        yield SystemCommand("Breakpoint: absmax above 100", "Stop at any site whose |values| exceed 100",
                            lambda: self.add_breakpoint("*", "absmax", 100.0))
        yield SystemCommand("Breakpoint: every step", "Stop at the start of every step",
                            lambda: self.add_breakpoint("step"))
        yield SystemCommand("Clear all breakpoints", "Remove every breakpoint", self.clear_breakpoints)
        yield SystemCommand("Record on/off", "Write the live session to traces/ (r)", self.action_record)
        yield SystemCommand("Type a prompt", "Send a new request to the live engine (/)", self.action_prompt)
        for name, what in (("inspector", "tensor inspector (i)"), ("kv", "KV cache (k)"),
                           ("attention", "attention (a)"), ("diff", "diff (d)"), ("requests", "requests (w)")):
            yield SystemCommand(f"View: {what}", f"Show the {what} view", lambda n=name: self.action_view(n))

    # ---- the end ----------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop the engine's worker (and close a recording) without waiting on the UI."""
        if self.session is not None:
            self.session.on_pause = self.session.on_event = None
            self.session.stop()

    async def action_quit(self) -> None:
        self.shutdown()
        self.exit()

    def on_unmount(self) -> None:
        self.shutdown()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """``minillama-tui``'s arguments, checked (see ``tui.cli``, which parses them before heavy imports)."""
    from tui import cli

    return cli.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """The ``minillama-tui`` entry point (``tui.cli.main``: options checked before the engine starts)."""
    from tui import cli

    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
