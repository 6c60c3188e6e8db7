"""An error shown as a message, never a traceback: a bad trace path, an engine that died."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Static

from minillama.trace.format import TraceError

F = TypeVar("F", bound=Callable[..., Any])


def reads_trace(handler: F) -> F:
    """A message handler (or callback) of a widget that reads the trace on the UI thread: a damaged step it
    meets ends in the error screen (``DebuggerApp.trace_failed``). A ``TraceError`` must not escape into
    Textual: after a handler raises, the widget's message loop stops for good, so it never handles another
    message (nor the callbacks a test pilot waits on)."""

    @functools.wraps(handler)
    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return handler(self, *args, **kwargs)
        except TraceError as e:
            self.app.trace_failed(e)
            return None

    return run  # type: ignore[return-value]


class ErrorScreen(ModalScreen[None]):
    """A titled message; ``fatal`` errors only offer quitting (there is nothing behind them to go back to)."""

    BINDINGS = [Binding("q", "app.quit", "quit"), Binding("escape", "close", "close")]

    def __init__(self, title: str, message: str, fatal: bool = False) -> None:
        super().__init__()
        self.title_text, self.message, self.fatal = title, message, fatal

    def compose(self) -> ComposeResult:
        with Vertical(id="error-box"):
            yield Static(self.title_text, id="error-title")
            yield Static(self.message, id="error-message", markup=False)
            yield Static("q: quit" + ("" if self.fatal else " · escape: back"), id="error-hint")

    def action_close(self) -> None:
        if not self.fatal:
            self.dismiss(None)
