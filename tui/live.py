"""The screen's engine side: the live session's callbacks, running it, prompts, recording, restarts.

The engine runs in the debug session's worker thread; its callbacks only post messages, so the UI
never waits on the engine and the engine never waits on the UI. An engine error fails the request
that caused it (``sources.culprits``) and a new session goes on with the others (``LiveRun.restart``).
"""

from __future__ import annotations

import os
import time
from typing import Any

from textual.message import Message
from textual.widgets import Input

from .opening import one_line


class EnginePaused(Message):
    def __init__(self, index: int | None, position: Any) -> None:
        super().__init__()
        self.index, self.position = index, position


class EngineEvent(Message):
    def __init__(self, kind: str, data: Any = None, session: Any = None) -> None:
        super().__init__()
        self.kind, self.data, self.session = kind, data, session


class LiveControl:
    """Mixed into ``DebugScreen``: everything that talks to the engine or opens the source."""

    run: Any = None
    _last_step_redraw = 0.0

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
        if self.ctx.queued:
            self.set_ctx(queued=self.run.session.num_pending)
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
        """Tell the session to run to the next ``unit`` (step, layer, site or continue)."""
        s = self.run.session
        {"step": s.step, "layer": s.next_layer, "site": s.next_site, "continue": s.continue_}[unit]()
        self.driver.running = unit
        self.status({"step": "running to the next step…", "layer": "running to the next layer…",
                     "site": "running to the next site…", "continue": "running to the next breakpoint…"}[unit])

    def continue_engine(self) -> None:
        """``c`` at the live head: run until a breakpoint fires or the requests finish."""
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
        """A new session on the same engine, ``failed`` requests dropped with their reason; history is kept."""
        old = self.run.session
        if old.recording:
            self.toast(f"Recording stopped: {self.ctx.recording}")
        try:
            session = self.run.restart(failed)
        except Exception as e:  # the engine cannot go on: history stays browsable, R tries again
            self.driver.stopped, self.driver.running = one_line(e), None
            self.driver.queue.clear()
            self.toast(f"{why}The engine could not restart ({one_line(e)}): R tries again.", "error", 10)
            self.status(f"engine stopped: {one_line(e)}")
            return
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
            self.set_ctx(queued=self.run.session.num_pending)
            self.toast(f"Queued ({len(ids)} tokens): the request joins the batch at the next step.")
