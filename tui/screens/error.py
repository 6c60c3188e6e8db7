"""An error shown as a message, never a traceback: a bad trace path, an engine that died."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Static

from minillama.trace.format import TraceError

F = TypeVar("F", bound=Callable[..., Any])


@contextlib.contextmanager
def trace_errors(app: Any) -> Iterator[None]:
    """Code run on the UI thread that reads the trace: a damaged step it meets ends in the error screen
    (``DebuggerApp.trace_failed``). A ``TraceError`` must not escape into Textual: after a handler raises,
    the widget's message loop stops for good, so it never handles another message (nor the callbacks a
    test pilot waits on); after a key's action raises, the app's own loop stops."""
    try:
        yield
    except TraceError as e:
        app.trace_failed(e)


def reads_trace(handler: F) -> F:
    """A widget's message handler (or callback) run under ``trace_errors``."""

    @functools.wraps(handler)
    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        with trace_errors(self.app):
            return handler(self, *args, **kwargs)
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
