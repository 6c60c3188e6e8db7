"""Progress for work that keeps a user waiting: loading a model, a long generation that streams nothing.

The whole API::

    from minillama import progress

    with progress.task("loading SmolLM2-135M", total=272, unit="tensors") as t:
        for tensor in tensors:
            ...
            t.advance()              # or t.update(completed=..., total=..., description=...)
            if t.watched: ...        # only work out costly updates when a bar or listener sees them

    for item in progress.track(items, "dequantising", total=len(items), unit="tensors"):
        ...

    progress.set_quiet(True)         # --quiet, or a full-screen app that owns the terminal
    progress.add_listener(fn)        # fn(ProgressUpdate) on every change, drawn or not (a TUI view)
    progress.remove_listener(fn)

Bars are drawn with ``rich.progress`` on stderr, and only when stderr is a terminal, nobody
called ``set_quiet(True)`` and ``MINILLAMA_QUIET`` is unset; they vanish when their task ends, so
the output that follows is clean. Otherwise a task costs a few attribute writes, cheap enough
to update once per engine step. Listeners are called from the thread doing the work.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

__all__ = ["ProgressUpdate", "Task", "add_listener", "drawing", "remove_listener", "set_quiet", "task", "track"]

T = TypeVar("T")


@dataclass(frozen=True)
class ProgressUpdate:
    """One task's state, as listeners see it after each change."""

    description: str
    completed: float
    total: float | None  # None: no known end (a spinner)
    unit: str
    finished: bool


_quiet = False
_listeners: list[Callable[[ProgressUpdate], None]] = []
_lock = threading.Lock()
_bars: Any = None  # the rich Progress while at least one drawn task is open
_open = 0  # drawn tasks open


def set_quiet(quiet: bool = True) -> None:
    """Never draw bars (listeners are still called)."""
    global _quiet
    _quiet = quiet


def drawing() -> bool:
    """Whether a task started now would draw a bar on stderr."""
    if _quiet or os.environ.get("MINILLAMA_QUIET"):
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def add_listener(fn: Callable[[ProgressUpdate], None]) -> None:
    """Call ``fn(update)`` on every task change (start, advance, finish)."""
    _listeners.append(fn)


def remove_listener(fn: Callable[[ProgressUpdate], None]) -> None:
    """Stop calling ``fn``; unknown functions are ignored."""
    if fn in _listeners:
        _listeners.remove(fn)


class Task:
    """A unit of work with an optional total. Use it through :func:`task` (a context manager)."""

    def __init__(self, description: str, total: float | None = None, unit: str = "") -> None:
        self.description, self.total, self.unit = description, total, unit
        self.completed = 0.0
        self.finished = False
        self._id: Any = None  # the rich task id while drawn

    @property
    def watched(self) -> bool:
        """Whether anyone sees this task (a bar is drawn or a listener is attached): callers can skip
        working out an update nobody will see."""
        return self._id is not None or bool(_listeners)

    def advance(self, amount: float = 1.0) -> None:
        """Count ``amount`` more units done."""
        self.completed += amount
        self._changed()

    def update(self, *, completed: float | None = None, total: float | None = None,
               description: str | None = None) -> None:
        """Set any of the completed count, the total and the description."""
        if completed is not None:
            self.completed = completed
        if total is not None:
            self.total = total
        if description is not None:
            self.description = description
        self._changed()

    def _changed(self) -> None:
        if self._id is not None:
            _bars.update(self._id, completed=self.completed, total=self.total, description=self.description)
        if _listeners:
            update = ProgressUpdate(self.description, self.completed, self.total, self.unit, self.finished)
            for fn in list(_listeners):
                fn(update)

    def __enter__(self) -> Task:
        global _bars, _open
        if drawing():
            with _lock:
                if _bars is None:
                    _bars = _new_bars()
                    _bars.start()
                _open += 1
                self._id = _bars.add_task(self.description, total=self.total, unit=self.unit)
        self._changed()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        global _bars, _open
        self.finished = True
        self._changed()
        if self._id is not None:
            with _lock:
                _bars.remove_task(self._id)
                self._id = None
                _open -= 1
                if _open == 0:
                    _bars.stop()
                    _bars = None


def task(description: str, total: float | None = None, unit: str = "") -> Task:
    """A context manager for one unit of work: ``with task("loading", total=n) as t: ... t.advance()``."""
    return Task(description, total, unit)


def track(items: Iterable[T], description: str, total: float | None = None, unit: str = "") -> Iterator[T]:
    """Yield ``items``, advancing a task by one for each (``total`` defaults to ``len(items)``)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with task(description, total, unit) as t:
        for item in items:
            yield item
            t.advance()


def _new_bars() -> Any:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[unit]}"), TimeElapsedColumn(),
                    console=Console(stderr=True), transient=True)
