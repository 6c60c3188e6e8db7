"""A step's tables on their way to the host (``Snapshot``), and their typed views (``views``).

``stepbuf.StatsBuffer`` lays the tables out and hands out snapshots of its ring slots; a snapshot
gives its slot back once read in place, copied out or dropped.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch

if TYPE_CHECKING:
    from minillama.debug.stepbuf import StatsBuffer

T = TypeVar("T")


class Snapshot:
    """A step's tables on their way to the host: pinned ring memory until ``decoded`` reads them there,
    ``copy_out`` copies them out (when the ring needs the slot) or ``drop`` lets them go unread."""

    def __init__(self, buffer: StatsBuffer | None, slot: int | None, req: torch.Tensor, rows: torch.Tensor,
                 done: torch.cuda.Event | None, use: int = 0) -> None:
        # weak: the buffer holds its snapshots (``_holders``), and a cycle would leave a dropped recorder's
        # buffer, pinned ring included, to the garbage collector, at any moment
        self._buffer, self._slot = (weakref.ref(buffer) if buffer is not None else None), slot
        self.req, self.rows, self.done, self.use = req, rows, done, use
        self.lent = False  # handed to the writer process in place (``lend``)
        self.num_sites, self.shadow_shape = (buffer.num_sites, buffer.shadow_shape) if buffer else (0, (0, 0))
        self._tables: dict[str, np.ndarray] | None = None
        self._any_bad: bool | None = None  # known once decoded in place
        self._decoded: Any = None  # decoded()'s result
        self._lock = threading.Lock()

    def tables(self) -> dict[str, np.ndarray]:
        """The raw tables (moments, keys, bad, shadow, lanes) as numpy arrays of their own; the first call
        waits for the copies and gives the ring slot back."""
        self.copy_out()
        if self._tables is None:
            raise RuntimeError("this step's raw tables are gone: decoded in place, or dropped with the step")
        return self._tables

    def copy_out(self) -> None:
        """Copy the raw tables out of the ring slot and give it back (nothing to do once that happened)."""
        with self._lock:
            if self._tables is None and self.req is not None:
                if self.done is not None:
                    self.done.synchronize()
                self._tables = {k: v.copy() for k, v in self._views().items()}
                self._give_back()

    def decoded(self, fn: Callable[[dict[str, np.ndarray]], T]) -> T | None:
        """``fn(raw tables)``, computed once (later calls, from any thread, get the first result), read
        in place in the ring slot if the tables are still there (the trace writer's way: no copy of the
        raw tables), which gives the slot back; None once dropped. ``fn`` must return arrays of its own."""
        with self._lock:
            if self._decoded is not None:
                return self._decoded
            if self._tables is not None:
                self._decoded = fn(self._tables)
                return self._decoded
            if self.req is None:
                return None  # dropped
            if self.done is not None:
                self.done.synchronize()
            raw = self._views()
            self._decoded = fn(raw)
            self._any_bad = bool(raw["bad"].any())
            self._give_back()
            return self._decoded

    def hand_over(self, fn: Callable[[dict[str, np.ndarray]], None], keep: bool) -> bool:
        """``fn(arrays)`` with the step's tables, then the ring slot is given back: ``{"req", "rows"}``,
        the slot's memory read in place (once the copies landed); if ``keep`` (a view may read them
        later) or they were copied out before, the raw tables (``tables``); ``{"decoded": ...}`` if a
        view decoded them first. False once dropped."""
        if keep:
            self.copy_out()
        with self._lock:
            if self._decoded is not None:
                fn({"decoded": self._decoded})
                return True
            if self._tables is not None:
                fn(self._tables)
                return True
            if self.req is None:
                return False
            if self.done is not None:
                self.done.synchronize()
            fn({"req": self.req.numpy(), "rows": self.rows.numpy()})
            self._give_back()
            return True

    def lend(self, fn: Callable[[dict[str, int]], None], keep: bool) -> bool:
        """Hand the tables over in place to the writer process that maps the ring: ``fn`` gets the slot,
        its use number and the table sizes; the slot is not reused until that process says it read it,
        nor while this side holds it (``keep``: a view may read it later; else given up now). False,
        with nothing done, if the tables left the slot, were decoded here first, or the ring is private."""
        with self._lock:
            buffer = self._buffer() if self._buffer is not None else None
            ring = buffer.ring if buffer is not None else None
            if self.req is None or self._decoded is not None or ring is None or not ring.shared:
                return False
            ring.lend(self._slot, self.use)
            try:
                fn({"slot": self._slot, "use": self.use, "reqs": self.req.shape[0], "rows": self.rows.shape[0]})
            except BaseException:
                ring.unlend(self._slot)
                raise
            self.lent = True
            if not keep:
                self._give_back()
            return True

    def any_bad(self) -> bool:
        """Whether some site of the step saw a NaN or Inf, without copying or decoding the tables."""
        with self._lock:
            if self._any_bad is not None:
                return self._any_bad
            if self._tables is not None:
                return bool(self._tables["bad"].any())
            if self.req is None:
                return False  # dropped: nobody asks about a step that left the history
            if self.done is not None:
                self.done.synchronize()
            return bool(self._views()["bad"].any())

    def drop(self) -> None:
        """Give the ring slot back unread: nobody can ask for this step's tables any more (a session's
        step that left its history with no trace being written). Later reads find nothing: ``decoded``
        gives None, ``any_bad`` False, ``tables`` raises."""
        with self._lock:
            if self._tables is None and self._decoded is None and self.req is not None:
                self._give_back()

    def _views(self) -> dict[str, np.ndarray]:  # callers check first that the slot is still held
        return views(self.req.numpy(), self.rows.numpy(), self.num_sites, self.shadow_shape)

    def _give_back(self) -> None:
        self.req = self.rows = None  # type: ignore[assignment]
        buffer = self._buffer() if self._buffer is not None else None
        if buffer is not None and self._slot is not None:
            buffer.ring.release(self._slot, self)


def shadow_words(shadow_shape: tuple[int, int]) -> int:
    """8-byte words of a request row that hold its shadow metrics (``(layers, fields)`` float32, rounded up)."""
    layers, fields = shadow_shape
    return -(-layers * fields // 2)


def views(req: np.ndarray, rows: np.ndarray, s: int, shadow_shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """Typed views of one request-table array ``(R, words)`` int64 (``stepbuf``'s layout) and one
    row-table array."""
    r = req.shape[0]
    layers, fields = shadow_shape
    shadow_end = 4 * s + shadow_words(shadow_shape)
    return {
        "stats": req[:, shadow_end:].view(np.float32).reshape(r, s, 4),
        "moments": req[:, : 2 * s].view(np.float64).reshape(r, s, 2),
        "keys": req[:, 2 * s: 3 * s].view(np.int32).reshape(r, s, 2),
        "bad": req[:, 3 * s: 4 * s].view(np.int32).reshape(r, s, 2),
        "shadow": req[:, 4 * s: shadow_end].view(np.float32)[:, : layers * fields].reshape(r, layers, fields),
        "lanes": rows,
    }
