"""minillama-tui: step through the engine live, or replay a recorded trace, in the terminal.

    minillama-tui [--model PATH] [--backend torch|triton|flash-attn] [--shadow [BACKEND]] [--prompt "..."]...
    minillama-tui traces/NAME [--compare traces/OTHER]

The command line is ``cli.py`` (checked before anything heavy is imported). The app holds one
``DebugScreen`` (``screen.py``) and the command palette's debugger commands.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen

from minillama.debug.sources import LiveOptions
from minillama.trace import TraceError

from .screen import DebugScreen
from .screens.error import ErrorScreen, trace_errors


class DebuggerApp(App[None]):
    """The debugger. ``trace`` (and ``compare``) to replay, else ``options`` (and an ``llm``) to go live."""

    CSS_PATH = "app.tcss"
    TITLE = "minillama-tui"
    AUTO_FOCUS = None
    # "x" reaches the app only when the screen's A/B binding is off (no second trace): say why.
    BINDINGS = [Binding("ctrl+p", "command_palette", "palette", show=False),
                Binding("x", "no_compare", show=False)]

    def __init__(self, trace: str | None = None, compare: str | None = None, options: LiveOptions | None = None,
                 llm: Any = None, record_dir: str = "traces") -> None:
        super().__init__()
        self.source = {"trace": trace, "compare": compare, "options": options or LiveOptions(), "llm": llm,
                       "record_dir": record_dir}
        self.main: DebugScreen | None = None

    def on_mount(self) -> None:
        self.main = DebugScreen(self.source)
        self.push_screen(self.main)

    @property
    def failed(self) -> bool:
        """True when the trace or the engine failed to load (``cli.main`` exits 1 then)."""
        return self.main is not None and self.main.ctx.mode == "failed"

    def trace_failed(self, error: TraceError) -> None:
        """A trace damaged past its opening (a step or a table read later) ends in the error screen's one
        line, like one that fails to open (shown once)."""
        if self.main is not None and self.main.ctx.mode != "failed":
            self.main.set_ctx(mode="failed")
            self.push_screen(ErrorScreen("Cannot read the trace", str(error), fatal=True))

    def _handle_exception(self, error: Exception) -> None:
        """A worker that met a damaged trace ends in the error screen (``trace_failed``); anything else is a
        bug and goes to Textual's report. Code on the UI thread catches its own ``TraceError`` (``reads_trace``,
        ``run_action``): one escaping a message handler would end that widget's message loop for good."""
        cause = getattr(error, "error", error)  # a worker's failure wraps the exception it raised
        if isinstance(cause, TraceError) and self.main is not None:
            self.trace_failed(cause)
            return
        super()._handle_exception(error)

    async def run_action(self, action: Any, default_namespace: Any = None, namespaces: Any = None) -> bool:
        """Key bindings run their actions in the app's message loop: a damaged step met by one (a cursor move,
        ``l``, ``+``) ends in the error screen, and the keys (``q`` on that screen) keep working."""
        with trace_errors(self):
            return await super().run_action(action, default_namespace, namespaces)
        return True

    def action_no_compare(self) -> None:
        if self.main is not None:
            self.main.toast("A/B needs a second trace: minillama-tui A --compare B")

    def action_help(self) -> None:
        from .screens.help import HelpScreen

        self.push_screen(HelpScreen())

    async def action_quit(self) -> None:
        self.shutdown()
        self.exit()

    def shutdown(self) -> None:
        """Stop the engine's worker (and close a recording) without waiting on the UI."""
        run = getattr(self.main, "run", None)
        if run is not None:
            run.session.on_pause = run.session.on_event = None
            run.session.stop()

    def on_unmount(self) -> None:
        self.shutdown()

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for cmd in self._debugger_commands():  # the palette runs them in the app's message loop, as keys
            yield cmd._replace(callback=self._reading(cmd.callback))

    def _reading(self, callback: Callable[[], Any]) -> Callable[[], Any]:
        """``callback``, with a damaged step it meets ending in the error screen (as ``run_action`` for keys)."""
        def run() -> Any:
            with trace_errors(self):
                return callback()
            return None
        return run

    def _debugger_commands(self) -> Iterable[SystemCommand]:
        main = self.main
        if main is None:
            return
        yield SystemCommand("Breakpoint: NaN or Inf anywhere", "Stop at the first site whose tensor has NaN/Inf",
                            lambda: main.add_breakpoint("*", "nan"))
        yield SystemCommand("Breakpoint: shadow attention over the error budget",
                            "Stop after the attention of a layer the judging rule calls over (ratio > 2)",
                            lambda: main.add_breakpoint("layers.*.attn.out", "shadow"))
        yield SystemCommand("Breakpoint: absmax above 100", "Stop at a site whose |values| exceed 100",
                            lambda: main.add_breakpoint("*", "absmax", 100.0))
        yield SystemCommand("Breakpoint: every step", "Stop at the start of every step",
                            lambda: main.add_breakpoint("step"))
        yield SystemCommand("Clear all breakpoints", "Remove every breakpoint", main.clear_breakpoints)
        yield SystemCommand("First over the budget (f)", "Jump to the first layer the judging rule calls over",
                            main.action_find)
        yield SystemCommand("Locate the largest difference (l)", "Move the slice to the largest |a - b|",
                            main.action_locate)
        yield SystemCommand("Next site (.)", "Run (or move) to the next hook site", main.action_next_site)
        yield SystemCommand("Back one site (,)", "Move to the previous hook site", main.action_back_site)
        yield SystemCommand("First step (g)", "Go to the first recorded step", main.action_first)
        yield SystemCommand("Last step / live head (G)", "Go to the end of the newest step", main.action_last)
        if main.live:
            yield SystemCommand("Record on/off (r)", "Write the live session to a trace folder", main.action_record)
            yield SystemCommand("Type a prompt (/)", "Send a new request to the live engine", main.action_prompt)
            yield SystemCommand("Restart engine (R)", "A new session on the same engine; history is kept",
                                main.action_restart)
        for name, what in (("inspector", "inspector (i)"), ("kv", "KV cache (k)"), ("attention", "attention (a)"),
                           ("diff", "diff (d)"), ("requests", "requests (w)"), ("heatmap", "heatmap (h)"),
                           ("compare", "A/B (x)")):
            if name != "compare" or main.ctx.compare is not None:
                yield SystemCommand(f"View: {what}", f"Show the {what} view", lambda n=name: main.action_view(n))
