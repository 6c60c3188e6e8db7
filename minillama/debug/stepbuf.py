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
``rows[:n]`` without blocking into pinned host memory, with an event to wait on. Nothing else
crosses to the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from minillama.debug.devstats import KEY_MAX_INIT, KEY_MIN_INIT


@dataclass
class Snapshot:
    """A step's tables on the host (valid once ``ready()``)."""

    req: torch.Tensor  # (R, words) int64
    rows: torch.Tensor  # (n, S, 2) int32
    done: torch.cuda.Event | None
    num_sites: int
    shadow_shape: tuple[int, int]

    def ready(self) -> None:
        """Wait for the copies (a no-op on the CPU)."""
        if self.done is not None:
            self.done.synchronize()

    def tables(self) -> dict[str, np.ndarray]:
        """The raw tables as numpy views: moments, keys, bad, shadow, lanes."""
        self.ready()
        return views(self.req.numpy(), self.rows.numpy(), self.num_sites, self.shadow_shape)


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
        """Copy the step's used tables to the host without blocking."""
        if self.device.type != "cuda":
            return Snapshot(self.req[:num_reqs].clone(), self.rows[:num_rows].clone(), None, self.num_sites,
                            self.shadow_shape)
        req = torch.empty((num_reqs, self.words), dtype=torch.int64, pin_memory=True)
        rows = torch.empty((num_rows, self.num_sites, 2), dtype=torch.int32, pin_memory=True)
        req.copy_(self.req[:num_reqs], non_blocking=True)
        rows.copy_(self.rows[:num_rows], non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return Snapshot(req, rows, done, self.num_sites, self.shadow_shape)
