"""Run a ``TraceWriter`` on its own thread, so the engine never waits for JSON or the disk.

The engine hands ``submit`` a callable per step; the thread runs it, writes the step, and syncs
both files once whatever was queued is written (a group commit). A step that cannot be prepared
ends the trace (a ``stopped`` line), never the engine.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

from minillama.trace.writer import TraceWriter


class BackgroundWriter:
    """A ``TraceWriter`` on its own thread. ``submit(fn)`` queues ``fn() -> (event, tensors)``; the
    thread runs it, writes the step, and syncs once the queue is empty. ``submit`` blocks only when
    ``depth`` steps are waiting (the disk cannot keep up), and returns False once the writer stopped."""

    def __init__(self, writer: TraceWriter, depth: int = 256) -> None:
        self.writer = writer
        self._queue: queue.Queue[Callable[[], tuple[dict, dict]] | threading.Event | None] = queue.Queue(depth)
        self._thread = threading.Thread(target=self._run, name="minillama-trace-writer", daemon=True)
        self._thread.start()

    @property
    def path(self) -> str:
        return self.writer.path

    @property
    def num_steps(self) -> int:
        return self.writer.num_steps

    @property
    def stopped(self) -> bool:
        return self.writer.stopped

    def submit(self, fn: Callable[[], tuple[dict, dict]]) -> bool:
        """Queue one step; False once the writer stopped (size cap, disk error)."""
        if self.writer.stopped or self.writer.closed:
            return False
        self._queue.put(fn)
        return True

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if not isinstance(item, threading.Event) and not self.writer.stopped:
                self._write(item)
            if (self._queue.empty() or isinstance(item, threading.Event)) and not self.writer.stopped:
                try:
                    self.writer.sync()
                except OSError as e:
                    self.writer._stop(f"syncing the trace failed ({e})")
            if isinstance(item, threading.Event):
                item.set()

    def _write(self, fn: Callable[[], tuple[dict, dict]]) -> None:
        try:
            event, tensors = fn()
        except Exception as e:  # a step that cannot be finished ends the trace, not the engine
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
            self.writer._stop(f"preparing a step failed ({type(e).__name__}: {msg})")
            return
        self.writer.write_step(event, tensors, sync=False)

    def flush(self) -> None:
        """Wait until every step submitted so far is written and synced."""
        if self._thread.is_alive():
            done = threading.Event()
            self._queue.put(done)
            done.wait()

    def close(self, reason: str = "finished") -> None:
        """Write what is queued, then the end line; waits for the thread. Safe to call twice."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self.writer.close(reason)
