"""One step's statistics on the device, in one preallocated buffer, and their trip to the host.

Layout: ``req`` holds one row of 8-byte words per request of the batch, ``rows`` one per row of the
flat batch (``S`` = number of sites in the catalog, ``L`` layers, ``K`` shadow fields)::

    req[r]  = [ moments (S, 2) float64: sum, sum of squares of finite values
              | keys    (S, 2) int32:   order-preserving keys of min and max (devstats.float_keys_np)
              | bad     (S, 2) int32:   NaN and Inf counts
              | shadow  (L, K) float32: the shadow-attention metrics of request r at each layer
              | stats   (S, 4) float32: mean, std, min, max, finished from the above at the step's end ]
    rows[i] = lanes (S, 2) int32: the content-hash lanes of row i at each site

The hook sites fill the request rows in (atomics on the GPU, numpy on the CPU), and ``snapshot``
finishes ``stats`` (``stats_table`` on the CPU: the trace writer does no arithmetic) and copies
``finished[:R]`` and ``rows[:n]`` without blocking into a slot of a ring of pinned host buffers
(``hostring``: memory the trace writer process maps too), with an event to wait on. On the CPU
``finished`` is ``req`` itself, reset at each step's start (one copy of a template row). On the GPU it is a second table: one kernel
(``devstats.finish_cuda``) copies the sums there beside their statistics and clears ``req`` behind
them, so a step needs no reset launch of its own (host time is what recording costs there).
Nothing else crosses to the host. A slot is given back once its tables are read there
(``Snapshot.decoded``, the trace writer's thread or a view, whichever asks first), copied out
(when the ring is full) or dropped (``Snapshot.drop``: nobody can read them any more), and once
the writer process it was lent to (``Snapshot.lend``) read it; the snapshot and the tables' typed
views live in ``snapshot.py``. On the CPU a step's tables are cloned, unless a writer process
shares a ring (``share_ring``).
"""

from __future__ import annotations

import numpy as np
import torch

from minillama.debug import devstats
from minillama.debug.devstats import KEY_MAX_INIT, KEY_MIN_INIT
from minillama.debug.hostring import RING, HostRing  # noqa: F401  (RING: the recorder's)
from minillama.debug.snapshot import Snapshot, shadow_words, views


class StatsBuffer:
    """The device tables of one step (see the module docstring)."""

    def __init__(self, num_sites: int, max_reqs: int, max_rows: int, shadow_shape: tuple[int, int],
                 device: torch.device, per_sample: np.ndarray | None = None, width: np.ndarray | None = None) -> None:
        """``per_sample`` / ``width`` (one per site): whether a site's rows are the sampling requests' (else
        the new tokens'), and its values per row; they turn the sums into ``stats_table``'s statistics."""
        s = self.num_sites = num_sites
        layers, fields = self.shadow_shape = shadow_shape
        self.shadow_words = shadow_words(shadow_shape)
        self.words = 6 * s + self.shadow_words
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
        self._acc = acc = self._typed(self.req)  # typed views over the same memory, for the kernels
        self.moments, self.keys, self.bad, self.shadow = acc["moments"], acc["keys"], acc["bad"], acc["shadow"]
        self.finished = torch.empty_like(self.req) if device.type == "cuda" else self.req
        self._out = self._typed(self.finished)
        self.stats = self._out["stats"]
        self._dirty = True  # req may hold sums no finish cleared (a new buffer, an abandoned step, a capture)
        self._np = views(self.req.numpy(), self.rows.numpy(), s, shadow_shape) if device.type == "cpu" else None
        per_sample = np.zeros(s, bool) if per_sample is None else np.asarray(per_sample, bool)
        self._per_sample = torch.as_tensor(per_sample, device=device)
        self._per_sample_i32 = torch.as_tensor(per_sample.astype(np.int32), device=device)  # the finish kernel's
        self._width = torch.as_tensor(np.ones(s) if width is None else width, dtype=torch.float64, device=device)
        self.ring: HostRing | None = None  # on the GPU before the first snapshot; on the CPU for a writer process

    def _typed(self, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed views of a request table (``snapshot.views``'s layout, for the kernels)."""
        s, (layers, fields) = self.num_sites, self.shadow_shape
        return {"moments": t[:, : 2 * s].view(torch.float64).view(-1, s, 2),
                "keys": t[:, 2 * s: 3 * s].view(torch.int32).view(-1, s, 2),
                "bad": t[:, 3 * s: 4 * s].view(torch.int32).view(-1, s, 2),
                "shadow": t[:, 4 * s: 4 * s + self.shadow_words].view(torch.float32)[:, : layers * fields].reshape(
                    t.shape[0], layers, fields),
                "stats": t[:, 4 * s + self.shadow_words:].view(torch.float32).view(-1, s, 4)}

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
        """Clear the first ``num_reqs`` request rows for a new step. On the GPU the last step's finish
        cleared them already: only a table that something else wrote (``touched``) is cleared, whole."""
        if self.device.type == "cuda":
            if self._dirty:
                self.req.copy_(self._init.expand(self.max_reqs, -1))
            self._dirty = True  # until this step's finish clears it
            return
        self.req[:num_reqs].copy_(self._init.expand(num_reqs, -1))

    def touched(self) -> None:
        """Something other than a step wrote the sums (a graph capture's warm-up pass): clear them first."""
        self._dirty = True
        self.reset(self.max_reqs)

    def finish(self, num_reqs: int, counts: np.ndarray | None = None, clear: bool = True,
               tail: list[tuple[torch.Tensor, int]] = (), pos: torch.Tensor | None = None) -> torch.Tensor:
        """The step's statistics table from its sums, on the device: ``stats_table`` of the first
        ``num_reqs`` requests, given each one's new tokens and whether it samples (``(R, 2)``; None:
        one each, sampled, a decode step). On the GPU into ``finished`` beside a copy of the sums, and
        with ``clear`` the sums are cleared behind it (not when peeking at a step in progress).
        ``tail`` (GPU, decode steps): up to two sites still to add first, ``(rows view, slot)``, row r
        request r's at position ``pos[r]`` (``devstats.finish_cuda``)."""
        r = num_reqs
        if self.device.type == "cuda":  # one kernel; a decode step's counts are all ones and need no copy
            c = None
            if counts is not None and not bool((counts == 1).all()):  # a small copy behind the step's work
                c = devstats.to_device(np.asarray(counts, dtype=np.int32), torch.int32, self.device)
            devstats.finish_cuda(self._acc, self._out, self.words, r, c, self._per_sample_i32, self._width, clear,
                                 tail, pos, self.rows)
            if clear:
                self._dirty = False
            return self.stats[:r]
        assert not tail, "tail sites are folded on the GPU only"
        c = torch.from_numpy(np.ones((r, 2)) if counts is None else np.asarray(counts, dtype=np.float64))
        rows = torch.where(self._per_sample, c[:, 1:2], c[:, 0:1])  # (R, S): each site's rows per request
        return stats_table(self.moments[:r], self.keys[:r], self.bad[:r], rows * self._width, out=self.stats[:r])

    def snapshot(self, num_reqs: int, num_rows: int, counts: np.ndarray | None,
                 tail: list[tuple[torch.Tensor, int]] = (), pos: torch.Tensor | None = None) -> Snapshot:
        """Finish the step's statistics and copy its used tables to the host without blocking (into a
        slot of the ring, stamped behind the copies); ``counts``, ``tail`` and ``pos`` as ``finish``
        takes them."""
        self.finish(num_reqs, counts, tail=tail, pos=pos)
        if self.device.type != "cuda" and self.ring is None:  # no writer process to share a slot with
            return Snapshot(self, None, self.req[:num_reqs].clone(), self.rows[:num_rows].clone(), None)
        self.prepare_ring()
        ring = self.ring
        slot, use = ring.acquire()
        req, rows = ring.slots[slot]
        req, rows = req[:num_reqs], rows[:num_rows]
        req.copy_(self.finished[:num_reqs], non_blocking=True)  # (on the CPU, req itself)
        rows.copy_(self.rows[:num_rows], non_blocking=True)
        ring.stamp(slot, use)
        done = None
        if self.device.type == "cuda":
            done = torch.cuda.Event()
            done.record()
        snap = Snapshot(self, slot, req, rows, done, use)
        ring.hold(slot, snap)
        return snap

    def prepare_ring(self) -> None:
        """Make the GPU's ring of pinned host slots now (page-locking takes a while), not at the first step."""
        if self.ring is None and self.device.type == "cuda":
            self._make_ring()

    def share_ring(self) -> dict | None:
        """A ring a writer process can map (``HostRing.layout``), made now if need be; None where the
        memory cannot be shared (the tables then travel through its pipe)."""
        if self.ring is None:
            self._make_ring()
        return self.ring.layout()

    def _make_ring(self) -> None:
        with torch.inference_mode(False):  # made from graphs_captured too, inside the capture's inference mode
            self.ring = HostRing([(tuple(t.shape), t.dtype) for t in (self.req, self.rows)], self.device,
                                 shared=True)

    @property
    def evictions(self) -> int:
        """Snapshots copied out on the engine's thread to free a slot (the trace writer fell behind)."""
        return self.ring.evictions if self.ring is not None else 0


def key_floats(k: torch.Tensor) -> torch.Tensor:
    """The float32 values of order-preserving keys (``devstats.float_keys_np``); the tables' initial
    keys (no finite value seen) come back as NaN."""
    out = torch.where(k >= 0, k, k ^ 0x7FFFFFFF).view(torch.float32)
    return out.masked_fill((k == KEY_MIN_INIT) | (k == KEY_MAX_INIT), float("nan"))


def stats_table(moments: torch.Tensor, keys: torch.Tensor, bad: torch.Tensor, values: torch.Tensor,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Per request and site ``(R, S)``: mean, std, min and max of the finite values, float32 ``(R, S, 4)``.

    From the tables' sums (float64), order-preserving keys of min and max, NaN and Inf counts, and
    ``values``, how many values each request had at each site. std is the sample standard deviation
    (0 for one value, NaN for none); a request with no finite value at a site has NaN everywhere.
    """
    n = values - (bad[..., 0] + bad[..., 1])  # finite values
    s, ss = moments[..., 0], moments[..., 1]
    mean = s / n
    var = (ss - s * mean).clamp_(min=0.0) / (n - 1).clamp(min=1.0)
    std = torch.where(n > 1, var.sqrt(), torch.where(n == 1, 0.0, float("nan")))
    out = torch.empty(n.shape + (4,), dtype=torch.float32, device=n.device) if out is None else out
    out[..., 0], out[..., 1] = mean, std
    out[..., 2], out[..., 3] = key_floats(keys[..., 0]), key_floats(keys[..., 1])
    out[..., 2:].masked_fill_((n == 0)[..., None], float("nan"))
    return out
