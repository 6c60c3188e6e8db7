"""Opening the source in a worker thread: a trace (and its A/B partner) or the engine, then the context
every view reads (timeline, request book, key book, budget map, token text)."""

from __future__ import annotations

import gc
import os
import time
from typing import Any

from rich.markup import escape
from textual import work
from textual.message import Message

from minillama.debug.navigation import Pos

from .screens.error import reads_trace

#: Steps the background fold takes per hold of the book's lock (the UI thread waits at most that long).
WARM_CHUNK = 1
#: Seconds the background fold rests after each hold (it shares the GIL with the UI thread).
WARM_PAUSE = 0.002


class Loaded(Message):
    def __init__(self, ctx: dict[str, Any], run: Any = None) -> None:
        super().__init__()
        self.ctx, self.run = ctx, run


class LoadFailed(Message):
    def __init__(self, title: str, error: str) -> None:
        super().__init__()
        self.title, self.error = title, error


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


class Opening:
    """Mixed into ``DebugScreen``."""

    source: dict[str, Any]
    run: Any = None

    @property
    def live(self) -> bool:
        return self.source.get("trace") is None

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
                for t in (tl, compare.b) if compare is not None else (tl,):
                    if t.num_steps():  # the step the cursor opens on, parsed here: a damaged one refuses the
                        t.event(0)  # trace now, in words, instead of on the UI thread (the reader caches it)
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

    @reads_trace
    def on_loaded(self, msg: Loaded) -> None:
        from .cursor import Driver

        self.set_ctx(**msg.ctx)
        self.query_one("#where").border_title = escape(title_of(msg.ctx["timeline"], msg.ctx.get("compare")))
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
            self._warm_book()
            self.status("")
            return
        self.run = msg.run
        self.driver = Driver(msg.run.timeline, msg.run.session)
        self.query_one("#prompt").display = True
        self._hook_session(msg.run.session)
        self.set_ctx(breakpoints=msg.run.session.breakpoints)
        msg.run.session.start()
        self.status("starting…")

    @work(thread=True, group="book")
    def _warm_book(self) -> None:
        """Fold every request once in the background (checkpoints), so that G on a long trace is instant.

        A few steps at a time: the fold holds the book's lock, and the views ask the book for the
        requests at the cursor on the UI thread (256 requests a step fold at ~8 ms a step here). The
        checkpoints live as long as the trace is open: each chunk's are moved out of the cycle
        collector's reach (``gc.freeze``), whose full passes over them took ~200 ms each, on the UI
        thread too, at 256 requests x 845 steps."""
        book, last = self.ctx.book, self.ctx.timeline.num_steps() - 1
        for k in [*range(min(WARM_CHUNK, last + 1) - 1, last, WARM_CHUNK), last]:
            book.after(k)
            gc.freeze()
            time.sleep(WARM_PAUSE)  # a window with the GIL free, so the UI thread need not wait for a switch

    @work(thread=True, group="tokens")
    def _load_tokens(self) -> None:
        self.ctx.tokens.load()
        self.app.call_from_thread(lambda: setattr(self, "tick", self.tick + 1))

    def on_load_failed(self, msg: LoadFailed) -> None:
        from .screens.error import ErrorScreen

        self.set_ctx(mode="failed")
        self.query_one("#where").border_title = msg.title.lower()
        self.app.push_screen(ErrorScreen(msg.title, msg.error, fatal=True))

