"""The screen's engine side: opening the source, the live session's callbacks, prompts, recording, restarts.

The engine runs in the debug session's worker thread; its callbacks only post messages, so the UI
never waits on the engine and the engine never waits on the UI. An engine error fails the request
that caused it (``sources.culprits``) and a new session goes on with the others (``LiveRun.restart``).
"""

from __future__ import annotations

import os
import time
from typing import Any

from textual import work
from textual.message import Message
from textual.widgets import Input

from minillama.debug.navigation import Pos


class Loaded(Message):
    def __init__(self, ctx: dict[str, Any], run: Any = None) -> None:
        super().__init__()
        self.ctx, self.run = ctx, run


class LoadFailed(Message):
    def __init__(self, title: str, error: str) -> None:
        super().__init__()
        self.title, self.error = title, error


class EnginePaused(Message):
    def __init__(self, index: int | None, position: Any) -> None:
        super().__init__()
        self.index, self.position = index, position


class EngineEvent(Message):
    def __init__(self, kind: str, data: Any = None, session: Any = None) -> None:
        super().__init__()
        self.kind, self.data, self.session = kind, data, session


def one_line(e: BaseException) -> str:
    """``TypeName: first line`` of an exception (what the user sees instead of a traceback)."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def title_of(tl: Any, compare: Any = None) -> str:
    """The panel title: a trace by its folder name (not its full path), a live session by its model."""
    reader = getattr(tl, "reader", None)
    if reader is None:
        return tl.title()
    m = reader.manifest
    name = os.path.basename(os.path.normpath(reader.path))
    shadow = f", shadow {m['shadow']}" if m.get("shadow") else ""
    text = f"replay: {name} ({m.get('backend', '?')}{shadow}, {m.get('device', '?')}) · {reader.num_steps} steps"
    if compare is not None:
        text += f" · A/B with {os.path.basename(os.path.normpath(compare.b.reader.path))}"
    return text + ("" if reader.status == "complete" else f" · {reader.status}")


class LiveControl:
    """Mixed into ``DebugScreen``: everything that talks to the engine or opens the source."""

    run: Any = None
    _last_step_redraw = 0.0

    @property
    def live(self) -> bool:
        return self.source.get("trace") is None

    # ---- opening --------------------------------------------------------------------------------
    @work(thread=True, exclusive=True, group="load")
    def load(self) -> None:
        """Open the trace (and its A/B partner) or start the engine, in a worker thread."""
        from minillama.debug import sources
        from minillama.debug.book import RequestBook
        from minillama.debug.heatmap import BudgetMapper
        from minillama.debug.keys import KeyBook
        from minillama.debug.tokens import TokenText

        src = self.source
        try:
            if not self.live:
                tl = sources.Locked(sources.open_trace(src["trace"]))
                compare = None
                if src.get("compare"):
                    from minillama.debug.compare import Comparison

                    compare = Comparison(tl, sources.Locked(sources.open_trace(src["compare"])))
                ctx = dict(timeline=tl, keys=KeyBook(tl), budget=BudgetMapper(tl), compare=compare,
                           tokens=TokenText(manifest=tl.reader.manifest),
                           book=RequestBook(tl, tl.reader.manifest.get("requests")))
                self.post_message(Loaded(ctx))
                return
            llm = src.get("llm") or sources.load_engine(src["options"])
            run = sources.LiveRun(llm, src["options"])
            for p in src["options"].prompts:
                run.submit(p)
        except Exception as e:  # a bad trace, a model that does not load: one line, never a traceback
            what = "Cannot open the trace" if not self.live else "Cannot start the engine"
            self.post_message(LoadFailed(what, one_line(e) if type(e).__name__ not in ("TraceError", "OptionError",
                                                                                      "CompareError") else str(e)))
            return
        tl = run.timeline
        self.post_message(Loaded(dict(timeline=tl, keys=KeyBook(tl), budget=BudgetMapper(tl),
                                      tokens=TokenText(tokenizer=llm.tokenizer), book=tl.book), run))

    def on_loaded(self, msg: Loaded) -> None:
        from .cursor import Driver

        self.set_ctx(**msg.ctx)
        self.query_one("#where").border_title = title_of(msg.ctx["timeline"], msg.ctx.get("compare"))
        if msg.run is None:
            self.driver = Driver(msg.ctx["timeline"])
            self.loaded = True
            tl = msg.ctx["timeline"]
            if tl.num_steps():
                self.pos = Pos(0)
            else:
                self.toast("This trace holds no steps.", "warning")
            if msg.ctx["compare"] is not None:
                self.view = "compare"
            self._load_tokens()
            self.status("")
            return
        self.run = msg.run
        self.driver = Driver(msg.run.timeline, msg.run.session)
        self.query_one("#prompt").display = True
        self._hook_session(msg.run.session)
        self.set_ctx(breakpoints=msg.run.session.breakpoints)
        msg.run.session.start()
        self.status("starting…")

    @work(thread=True, group="tokens")
    def _load_tokens(self) -> None:
        self.ctx.tokens.load()
        self.app.call_from_thread(lambda: setattr(self, "tick", self.tick + 1))

    def on_load_failed(self, msg: LoadFailed) -> None:
        from .screens.error import ErrorScreen

        self.set_ctx(mode="failed")
        self.query_one("#where").border_title = msg.title.lower()
        self.app.push_screen(ErrorScreen(msg.title, msg.error, fatal=True))

    # ---- the engine's callbacks (its thread: post only) -----------------------------------------
    def _hook_session(self, session: Any) -> None:
        tl = self.run.timeline

        def paused(position: Any) -> None:
            self.post_message(EnginePaused(tl.index_of(session, position.step), position))

        def event(kind: str, data: Any) -> None:
            if kind in ("step", "idle", "error", "rejected"):
                self.post_message(EngineEvent(kind, data, session))

        session.on_pause, session.on_event = paused, event

    def on_engine_paused(self, msg: EnginePaused) -> None:
        self.loaded = True
        pos = msg.position
        move = self.driver.paused(msg.index, pos.site, pos.reason.startswith("breakpoint"))
        self.tick += 1
        if move.run:
            self.pos = move.pos
            self.run_engine(move.run)
            return
        self.goto(move, pos.reason if pos.reason.startswith("breakpoint") else f"paused: {pos.reason}")

    def on_engine_event(self, msg: EngineEvent) -> None:
        if self.run is None or msg.session is not self.run.session:
            return  # a session already replaced by a restart
        if msg.kind == "step":
            self.run.timeline.requests()  # fold as it happens (the live history forgets old steps)
            now = time.monotonic()
            if self.driver.running and now - self._last_step_redraw > 0.1:
                self._last_step_redraw = now
                if self.driver.following:
                    from minillama.debug.navigation import last_pos

                    self.pos = last_pos(self.run.timeline)
                self.tick += 1
        elif msg.kind == "idle":
            self.loaded = True
            self.goto(self.driver.went_idle(), "all requests finished")
            self.tick += 1
        elif msg.kind == "rejected":
            self.toast(f"Prompt refused: {msg.data}", "error", 8)
        elif msg.kind == "error":
            self.recover(msg.data)

    # ---- running the engine ---------------------------------------------------------------------
    def run_engine(self, unit: str) -> None:
        s = self.run.session
        {"step": s.step, "layer": s.next_layer, "site": s.next_site, "continue": s.continue_}[unit]()
        self.driver.running = unit
        self.status({"step": "running to the next step…", "layer": "running to the next layer…",
                     "site": "running to the next site…", "continue": "running to the next breakpoint…"}[unit])

    def continue_engine(self) -> None:
        if self.driver.idle:
            self.toast("All requests finished: press / and type a prompt to start new work.")
            return
        self.driver.queue.clear()
        self.run_engine("continue")

    def recover(self, error: BaseException) -> None:
        """The engine failed a step: fail the request(s) that caused it and go on with the others."""
        from minillama.debug.sources import culprits

        failed = culprits(self.run.session, error)
        self.restart(failed, f"The engine failed a step ({one_line(error)}). ")

    def action_restart(self, failed: dict[int, str] | None = None, why: str = "") -> None:
        """Restart the engine's session without quitting (history and the other requests are kept)."""
        if self.run is not None:
            self.restart(failed or {}, "")

    def restart(self, failed: dict[int, str], why: str) -> None:
        old = self.run.session
        if old.recording:
            self.toast(f"Recording stopped: {self.ctx.recording}")
        session = self.run.restart(failed)
        for bp in old.breakpoints:
            session.add_breakpoint(bp)
        self.driver.session, self.driver.head, self.driver.running = session, None, None
        self.driver.queue.clear()
        self.driver.stopped, self.driver.idle, self.driver.following = None, False, True
        self._hook_session(session)
        self.set_ctx(breakpoints=session.breakpoints, recording=None)
        session.start()
        names = ", ".join(f"#{s}" for s in failed)
        self.toast(why + (f"Failed alone: {names}; the others go on." if failed else "Engine session restarted."),
                   "warning" if failed else "information", 10)
        self.status("restarted")

    # ---- breakpoints, recording, prompts ----------------------------------------------------------
    def action_breakpoint(self) -> None:
        """Toggle an unconditional breakpoint on the cursor's site (at a step start: every step)."""
        if self.pos is None:
            return
        pattern = "step" if self.pos.site == "step.begin" else self.pos.site
        if self.run is not None:
            on_now = self.run.session.toggle_breakpoint(pattern)
        else:
            from minillama.debug.breakpoints import Breakpoint

            bps = self.ctx.breakpoints
            found = [bp for bp in bps if bp.pattern == pattern and bp.condition is None]
            for bp in found:
                bps.remove(bp)
            if not found:
                bps.append(Breakpoint(pattern))
            on_now = not found
        self.toast(f"Breakpoint {'set on' if on_now else 'removed from'} {pattern}.")
        self.set_ctx()

    def add_breakpoint(self, pattern: str, condition: str | None = None, value: float = 0.0) -> None:
        """Add a conditional breakpoint (from the command palette)."""
        from minillama.debug.breakpoints import Breakpoint

        bp = Breakpoint(pattern, condition, value)
        if self.run is not None:
            self.run.session.add_breakpoint(bp)
        else:
            self.ctx.breakpoints.append(bp)
        self.toast(f"Breakpoint set: {bp.describe()}.")
        self.set_ctx()

    def clear_breakpoints(self) -> None:
        if self.run is not None:
            self.run.session.clear_breakpoints()
        else:
            self.ctx.breakpoints.clear()
        self.toast("All breakpoints cleared.")
        self.set_ctx()

    def action_record(self) -> None:
        """Switch recording of the live session on or off."""
        from minillama.debug.recording import start_recording

        s = self.run.session
        if s.recording:
            path, steps = self.ctx.recording, s._writer.num_steps if s._writer is not None else 0
            s.stop_recording()
            self.set_ctx(recording=None)
            self.toast(f"Recording saved: {path} ({steps} steps). Replay it with: minillama-tui {path}", timeout=8)
            return
        base = os.path.join(self.source.get("record_dir") or "traces", time.strftime("live-%Y%m%d-%H%M%S"))
        path, n = base, 1
        while os.path.exists(path):
            n += 1
            path = f"{base}-{n}"
        try:
            caught = start_recording(s, path)
        except Exception as e:
            self.toast(f"Cannot record: {one_line(e)}", "error", 8)
            return
        self.set_ctx(recording=path)
        more = f" (with {caught['requests']} running requests and {caught['blocks']} cached blocks)" \
            if caught["requests"] or caught["blocks"] else ""
        self.toast(f"Recording every following step to {path}{more}; r again stops.")

    def action_prompt(self) -> None:
        self.query_one("#prompt", Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        """A typed prompt: checked, then queued; refused alone (a toast) when the engine cannot run it."""
        from minillama.engine.llm_engine import RequestError

        if event.input.id != "prompt":
            return
        text = event.value
        event.input.value = ""
        self.set_focus(None)
        if self.run is None or self.driver.stopped:
            self.toast("The engine is not running: the prompt was not sent.", "warning")
            return
        try:
            ids = self.run.submit(text)
        except RequestError as e:
            self.toast(f"Prompt refused: {e}", "error", 8)
            return
        except Exception as e:  # e.g. a tokenizer that cannot encode the text: refused alone all the same
            self.toast(f"Prompt refused: {one_line(e)}", "error", 8)
            return
        if self.driver.idle:
            self.driver.idle, self.driver.following = False, True
            self.run_engine("step")
        else:
            self.toast(f"Queued ({len(ids)} tokens): the request joins the batch at the next step.")
