"""One step's statistics on the device, in one preallocated buffer, and their trip to the host.

Layout: ``req`` holds one row of 8-byte words per request of the batch, ``rows`` one per row of the
flat batch (``S`` = number of sites in the catalog, ``L`` layers, ``K`` shadow fields)::

    req[r]  = [ moments (S, 2) float64: sum, sum of squares of finite values
              | keys    (S, 2) int32:   order-preserving keys of min and max (devstats.float_keys_np)
              | bad     (S, 2) int32:   NaN and Inf counts
              | shadow  (L, K) float32: the shadow-attention metrics of request r at each layer ]
    rows[i] = lanes (S, 2) int32: the content-hash lanes of row i at each site

Each step resets the first ``R`` request rows (one copy of a template row), the hook sites fill
them in (atomics on the GPU, numpy on the CPU), and ``snapshot`` copies ``req[:R]`` and
``rows[:n]`` without blocking into a slot of a ring of pinned host buffers, with an event to wait
on. Nothing else crosses to the host. A slot is given back once its tables are copied out (by the
trace writer's thread, or on demand).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch

from minillama.debug.devstats import KEY_MAX_INIT, KEY_MIN_INIT

T = TypeVar("T")

#: Pinned host slots: steps whose tables may be in flight or waiting for the trace writer at once.
RING = 8


class Snapshot:
    """A step's tables on their way to the host: pinned ring memory until ``decoded`` reads them there
    or ``copy_out`` copies them out (when the ring needs the slot)."""

    def __init__(self, buffer: StatsBuffer | None, slot: int | None, req: torch.Tensor, rows: torch.Tensor,
                 done: torch.cuda.Event | None) -> None:
        self._buffer, self._slot = buffer, slot
        self.req, self.rows, self.done = req, rows, done
        self.num_sites, self.shadow_shape = (buffer.num_sites, buffer.shadow_shape) if buffer else (0, (0, 0))
        self._tables: dict[str, np.ndarray] | None = None
        self._any_bad: bool | None = None  # known once decoded in place
        self._lock = threading.Lock()

    def tables(self) -> dict[str, np.ndarray]:
        """The raw tables (moments, keys, bad, shadow, lanes) as numpy arrays of their own; the first call
        waits for the copies and gives the ring slot back."""
        self.copy_out()
        if self._tables is None:
            raise RuntimeError("this step's raw tables were decoded in place (decoded) and are gone")
        return self._tables

    def copy_out(self) -> None:
        """Copy the raw tables out of the ring slot and give it back (nothing to do once that happened)."""
        with self._lock:
            if self._tables is None and self.req is not None:
                if self.done is not None:
                    self.done.synchronize()
                self._tables = {k: v.copy() for k, v in views(self.req.numpy(), self.rows.numpy(), self.num_sites,
                                                              self.shadow_shape).items()}
                self._give_back()

    def decoded(self, fn: Callable[[dict[str, np.ndarray]], T]) -> T:
        """``fn(raw tables)``, read in place in the ring slot if the tables are still there (the trace
        writer's way: no copy of the raw tables), which gives the slot back. ``fn`` must return
        arrays of its own, not views of its argument."""
        with self._lock:
            if self._tables is not None:
                return fn(self._tables)
            if self.done is not None:
                self.done.synchronize()
            raw = views(self.req.numpy(), self.rows.numpy(), self.num_sites, self.shadow_shape)
            out = fn(raw)
            self._any_bad = bool(raw["bad"].any())
            self._give_back()
            return out

    def any_bad(self) -> bool:
        """Whether some site of the step saw a NaN or Inf, without copying or decoding the tables."""
        with self._lock:
            if self._any_bad is not None:
                return self._any_bad
            if self._tables is not None:
                return bool(self._tables["bad"].any())
            if self.done is not None:
                self.done.synchronize()
            s = self.num_sites
            return bool(self.req.numpy()[:, 3 * s: 4 * s].any())

    def _give_back(self) -> None:
        self.req = self.rows = None  # type: ignore[assignment]
        if self._buffer is not None and self._slot is not None:
            self._buffer._release(self._slot, self)


def views(req: np.ndarray, rows: np.ndarray, s: int, shadow_shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """Typed views of one request-table array ``(R, words)`` int64 and one row-table array."""
    r = req.shape[0]
    layers, fields = shadow_shape
    return {
        "moments": req[:, : 2 * s].view(np.float64).reshape(r, s, 2),
        "keys": req[:, 2 * s: 3 * s].view(np.int32).reshape(r, s, 2),
        "bad": req[:, 3 * s: 4 * s].view(np.int32).reshape(r, s, 2),
        "shadow": req[:, 4 * s:].view(np.float32)[:, : layers * fields].reshape(r, layers, fields),
        "lanes": rows,
    }


class StatsBuffer:
    """The device tables of one step (see the module docstring)."""

    def __init__(self, num_sites: int, max_reqs: int, max_rows: int, shadow_shape: tuple[int, int],
                 device: torch.device) -> None:
        s = self.num_sites = num_sites
        layers, fields = self.shadow_shape = shadow_shape
        self.words = 4 * s + -(-layers * fields // 2)
        self.device = device
        if device.type == "cpu":  # numpy's zeros: a torch fill this large would start an OpenMP pool on
            # the constructing thread, which then slows the engine thread's parallel ops (bench_debug.in_thread)
            self.req = torch.from_numpy(np.zeros((max_reqs, self.words), dtype=np.int64))
            self.rows = torch.from_numpy(np.zeros((max_rows, s, 2), dtype=np.int32))
        else:
            self.req = torch.zeros(max_reqs, self.words, dtype=torch.int64, device=device)
            self.rows = torch.zeros(max_rows, s, 2, dtype=torch.int32, device=device)
        init = np.zeros(self.words, dtype=np.int64)
        keys = init[2 * s: 3 * s].view(np.int32).reshape(s, 2)
        keys[:, 0], keys[:, 1] = KEY_MIN_INIT, KEY_MAX_INIT
        self._init = torch.from_numpy(init).to(device)
        r = self.req  # typed views over the same memory, for the kernels
        self.moments = r[:, : 2 * s].view(torch.float64).view(-1, s, 2)
        self.keys = r[:, 2 * s: 3 * s].view(torch.int32).view(-1, s, 2)
        self.bad = r[:, 3 * s: 4 * s].view(torch.int32).view(-1, s, 2)
        self.shadow = r[:, 4 * s:].view(torch.float32)[:, : layers * fields].reshape(r.shape[0], layers, fields)
        self._np = views(self.req.numpy(), self.rows.numpy(), s, shadow_shape) if device.type == "cpu" else None
        self._ring: list[tuple[torch.Tensor, torch.Tensor]] = []  # pinned host copies, reused
        self._free: deque[int] = deque()
        self._holders: dict[int, Snapshot] = {}
        self._order: deque[int] = deque()
        self._ring_lock = threading.Lock()

    @property
    def max_reqs(self) -> int:
        return self.req.shape[0]

    @property
    def max_rows(self) -> int:
        return self.rows.shape[0]

    def numpy_tables(self) -> dict[str, np.ndarray]:
        """Writable numpy views of the CPU tables (the CPU statistics path fills them)."""
        assert self._np is not None, "numpy tables exist only for a CPU buffer"
        return self._np

    def reset(self, num_reqs: int) -> None:
        """Clear the first ``num_reqs`` request rows for a new step (one kernel on the GPU)."""
        self.req[:num_reqs].copy_(self._init.expand(num_reqs, -1))

    def snapshot(self, num_reqs: int, num_rows: int) -> Snapshot:
        """Copy the step's used tables to the host without blocking (into a slot of a pinned ring)."""
        if self.device.type != "cuda":
            return Snapshot(self, None, self.req[:num_reqs].clone(), self.rows[:num_rows].clone(), None)
        slot = self._acquire()
        req, rows = self._ring[slot]
        req, rows = req[:num_reqs], rows[:num_rows]
        req.copy_(self.req[:num_reqs], non_blocking=True)
        rows.copy_(self.rows[:num_rows], non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        snap = Snapshot(self, slot, req, rows, done)
        with self._ring_lock:
            self._holders[slot] = snap
            self._order.append(slot)
        return snap

    def prepare_ring(self) -> None:
        """Allocate the pinned ring now (page-locking takes a while), not at the first step."""
        if not self._ring and self.device.type == "cuda":
            self._ring = [(torch.empty(self.req.shape, dtype=self.req.dtype, pin_memory=True),
                           torch.empty(self.rows.shape, dtype=self.rows.dtype, pin_memory=True))
                          for _ in range(RING)]
            self._free = deque(range(RING))

    def _acquire(self) -> int:
        """A free ring slot; when all are held, the oldest snapshot is copied out to free its slot."""
        self.prepare_ring()
        while True:
            with self._ring_lock:
                if self._free:
                    return self._free.popleft()
                oldest = self._holders[self._order[0]]
            oldest.copy_out()

    def _release(self, slot: int, snap: Snapshot) -> None:
        with self._ring_lock:
            if self._holders.get(slot) is snap:
                del self._holders[slot]
                self._order.remove(slot)
                self._free.append(slot)
