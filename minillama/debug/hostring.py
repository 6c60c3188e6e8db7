"""The host side of a step's tables: a ring of pinned slots, shareable with the trace writer process.

``stepbuf.StatsBuffer.snapshot`` copies a step's tables into a slot without blocking and stamps the
slot behind the copies. A slot is held here by its ``Snapshot`` until read in place, copied out or
dropped, and may also be *lent* to the writer process (``lend``): that process maps the same memory
(``layout``: a memfd it inherits), waits for the stamp (``RingView.read``) and says it is done by
writing the use number back. The slot is reused once both sides let it go, so a step crosses to the
writer as a small message, not as its tables through a pipe.

Control words (int64, at the start of the shared memory): ``ready[slot]``, the stamp of the slot's
latest use whose copies landed (``use % STAMPS``), and ``released[slot]``, the latest use the writer
process finished. Where memfd or page-locking of it is not available the ring is private pinned
memory, lent to nobody.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
import weakref
from collections import deque
from typing import Any

import numpy as np
import torch

#: Slots: steps whose tables may be in flight, waiting for a reader here, or lent, at once.
RING = 8
#: Stamps cycle through this many values (a device table of them is the stamp copies' source).
STAMPS = 4096
_CTRL = 4096  # bytes of control words before the first slot
_PAGE = 4096


class HostRing:
    """``RING`` slots, each one array per shape in ``shapes`` (``(shape, dtype)``; see the module docstring).
    ``shared``: put them in memory another process can map (False: pinned memory of this process on
    CUDA; a CPU ring is always shared, since only a writer process needs one there)."""

    def __init__(self, shapes: list[tuple[tuple[int, ...], torch.dtype]], device: torch.device, shared: bool) -> None:
        self.device = device
        self.shapes = shapes
        self.fd: int | None = None
        self._mm = None
        if shared:
            self._share()
        if self.fd is None:
            self.slots = [tuple(torch.empty(s, dtype=d, pin_memory=device.type == "cuda") for s, d in shapes)
                          for _ in range(RING)]
            ctrl = torch.zeros(2 * RING, dtype=torch.int64, pin_memory=device.type == "cuda")
            self._ctrl_t = ctrl
            self.ready, self.released = ctrl.numpy()[:RING], ctrl.numpy()[RING:]
        if device.type == "cuda":
            self._stamps = torch.arange(STAMPS, dtype=torch.int64, device=device)
        self._free: deque[int] = deque(range(RING))
        self._holders: dict[int, Any] = {}
        self._order: deque[int] = deque()
        self._lent: dict[int, int] = {}  # slot -> the use the writer process has it for
        self._use = 0
        self._lock = threading.Lock()
        self.remote_alive = lambda: True  # set by whoever lends: False once the borrower is gone
        self.evictions = 0  # snapshots copied out on the engine's thread to free a slot
        self.waits = 0  # acquires that waited for the writer process to give a slot back

    @property
    def shared(self) -> bool:
        return self.fd is not None

    def _share(self) -> None:
        if not hasattr(os, "memfd_create"):
            return
        placement, total = _placement([(s, str(d).removeprefix("torch.")) for s, d in self.shapes])
        fd = os.memfd_create("minillama-stats-ring")
        try:
            os.ftruncate(fd, total)
            mm = mmap.mmap(fd, total)
        except OSError:
            os.close(fd)
            return
        base = torch.frombuffer(mm, dtype=torch.uint8)
        if self.device.type == "cuda":
            ptr = base.data_ptr()
            if int(torch.cuda.cudart().cudaHostRegister(ptr, total, 0)) != 0:  # not page-locked: copies would block
                del base
                mm.close()
                os.close(fd)
                return
            weakref.finalize(self, _unregister, ptr)
        self.fd, self._mm, self._base, self._placement, self.total = fd, mm, base, placement, total
        weakref.finalize(self, os.close, fd)
        self._ctrl_t = base[: 16 * RING].view(torch.int64)
        ctrl = self._ctrl_t.numpy()
        self.ready, self.released = ctrl[:RING], ctrl[RING:]
        self.slots = [tuple(base[off: off + n].view(getattr(torch, d)).view(shape) for off, n, shape, d in arrays)
                      for arrays in placement]

    def layout(self) -> dict[str, Any] | None:
        """What the writer process needs to map the slots (``RingView``: the memfd, which it inherits, and
        where each slot's arrays lie); None if the ring is private."""
        if self.fd is None:
            return None
        return {"fd": self.fd, "total": self.total, "slots": self._placement}

    # ---- the engine's side ----------------------------------------------------------------------
    def acquire(self) -> tuple[int, int]:
        """A free slot and its use number; when none is free, the oldest snapshot not lent is copied out
        (``evictions``), else this waits for the writer process to give one back (``waits``)."""
        waited = False
        while True:
            with self._lock:
                self._reclaim()
                if self._free:
                    slot = self._free.popleft()
                    self._use += 1
                    return slot, self._use
                oldest = next((self._holders[s] for s in self._order if s not in self._lent), None)
            if oldest is not None:
                self.evictions += 1
                oldest.copy_out()
                continue
            if not self.remote_alive():
                self.remote_gone()
                continue
            if not waited:
                self.waits, waited = self.waits + 1, True
            time.sleep(0.0002)

    def stamp(self, slot: int, use: int) -> None:
        """Mark the slot's tables for ``use`` as landed, behind the copies just queued (CPU: they landed)."""
        if self.device.type == "cuda":
            self._ctrl_t[slot: slot + 1].copy_(self._stamps[use % STAMPS: use % STAMPS + 1], non_blocking=True)
        else:
            self.ready[slot] = use % STAMPS

    def hold(self, slot: int, snap: Any) -> None:
        with self._lock:
            self._holders[slot] = snap
            self._order.append(slot)

    def release(self, slot: int, snap: Any) -> None:
        """This side is done with ``slot`` (``snap`` gave it back); free unless it is still lent."""
        with self._lock:
            if self._holders.get(slot) is snap:
                del self._holders[slot]
                self._order.remove(slot)
                if slot not in self._lent:
                    self._free.append(slot)

    def lend(self, slot: int, use: int) -> None:
        with self._lock:
            self._lent[slot] = use

    def unlend(self, slot: int) -> None:
        """A lend whose message never went out."""
        with self._lock:
            self._lent.pop(slot, None)
            if slot not in self._holders:
                self._free.append(slot)

    def num_lent(self) -> int:
        return len(self._lent)

    def remote_gone(self) -> None:
        """The writer process is gone: every lent slot is free again (unless held here)."""
        with self._lock:
            for slot in self._lent:
                if slot not in self._holders:
                    self._free.append(slot)
            self._lent.clear()

    def _reclaim(self) -> None:
        for slot, use in list(self._lent.items()):
            if self.released[slot] >= use:
                del self._lent[slot]
                if slot not in self._holders:
                    self._free.append(slot)


class RingView:
    """The writer process's view of a shared ring (``HostRing.layout``; its memfd is closed here once mapped)."""

    def __init__(self, layout: dict[str, Any]) -> None:
        self._mm = mmap.mmap(layout["fd"], layout["total"])
        os.close(layout["fd"])
        ctrl = np.frombuffer(self._mm, dtype=np.int64, count=2 * RING)
        self.ready, self.released = ctrl[:RING], ctrl[RING:]
        self.slots = [[np.frombuffer(self._mm, dtype=d, count=n // np.dtype(d).itemsize, offset=off).reshape(shape)
                       for off, n, shape, d in arrays] for arrays in layout["slots"]]

    def read(self, slot: int, use: int, stop: Any, timeout: float = 60.0) -> list[np.ndarray] | None:
        """The slot's arrays once ``use``'s stamp is there (None if ``stop()`` or ``timeout`` came first)."""
        want, t0 = use % STAMPS, time.monotonic()
        while self.ready[slot] != want:
            if stop() or time.monotonic() - t0 > timeout:
                return None
            time.sleep(0.0001)
        return self.slots[slot]

    def release(self, slot: int, use: int) -> None:
        self.released[slot] = use


def _placement(shapes: list[tuple[tuple[int, ...], str]]) -> tuple[list[list[tuple[int, int, tuple, str]]], int]:
    """Where each slot's arrays lie in the shared memory, ``(offset, bytes, shape, dtype name)``, each
    page-aligned after the control words; and the memory's size. One list for both processes."""
    sizes = [int(np.prod(shape)) * np.dtype(d).itemsize for shape, d in shapes]
    out, off = [], _CTRL
    for _ in range(RING):
        arrays = []
        for (shape, d), n in zip(shapes, sizes, strict=True):
            arrays.append((off, n, tuple(shape), d))
            off += -(-n // _PAGE) * _PAGE
        out.append(arrays)
    return out, off


def _unregister(ptr: int) -> None:
    try:
        torch.cuda.cudart().cudaHostUnregister(ptr)
    except Exception:  # at exit, CUDA may be torn down first
        pass
