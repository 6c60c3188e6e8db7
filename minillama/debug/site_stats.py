"""Where a site's statistics are computed, by device and mode, into the step's tables (``stepbuf``).

* CUDA, eager, at speed (no listener pauses inside the step): token sites are held (a reference
  keeps their memory from being reused) and done by one kernel per dtype when the pass's last
  token site comes or the held tensors pass ``HOLD_BYTES``: a 135M prefill step has ~210 sites,
  and a launch costs ~40 us of host time, more than its GPU work. The kernel's address table
  is copied up from pinned memory without waiting.
* CUDA, eager, where a listener may pause inside the step (``hooks.eager``): one kernel per site,
  launched at the site, so a pause sees every site before it.
* CUDA, inside a graph capture: the pass's token sites are gathered and done by one kernel per
  dtype at its last token site; the kernel reads the sites' addresses from a device table that is
  filled in after the capture (``graphs_captured``), since only then may host data be copied.
  The tables are rows of an arena made before any capture (``reserve``): memory allocated during
  a capture comes from the graphs' pool, where the kernels of a replay, this graph's or another
  sharing the pool, write their intermediates over anything the host put there.
* CPU: small token sites (a decode step's) wait for the pass's last token site and are done in
  groups of equal shape; others at once. Site tensors are not changed after their site within a
  forward pass (``hooks.py``), so waiting is safe.
"""

from __future__ import annotations

import torch

from minillama import hooks
from minillama.debug import devstats
from minillama.debug.stepbuf import StatsBuffer

#: CPU token sites up to this many elements wait for the pass's last token site, then go in groups.
CPU_DEFER_ELEMENTS = 1 << 16
#: Bytes of eager CUDA token sites held for one launch; more is launched at once (memory the
#: allocator could otherwise reuse: a 1B-shaped layer's sites at 8,192 tokens are ~180 MiB).
HOLD_BYTES = 128 << 20


class SiteStats:
    """Statistics of tensor sites into ``buffer``; ``last_token_site`` ends a forward pass's token sites."""

    def __init__(self, buffer: StatsBuffer, last_token_site: int) -> None:
        self.buffer = buffer
        self.last_token_site = last_token_site
        self._batched: list[tuple[torch.Tensor, int]] = []  # token sites of the graph being captured
        self._cpu_deferred: dict[tuple, list[tuple[torch.Tensor, int]]] = {}  # small CPU sites of this pass
        self._held: list[tuple[torch.Tensor, int]] = []  # eager CUDA token sites not yet launched
        self._held_bytes = 0  # of the storages they keep alive, each counted once
        self._held_storage: set[int] = set()
        self._held_rows: tuple[torch.Tensor, torch.Tensor] | None = None  # their (seq, pos)
        self._to_fill: list[tuple[int, list[list[int]]]] = []  # arena row and rows of new graphs' tables
        self._arena: torch.Tensor | None = None  # (rows, 4) int64: every table of the live recorded graphs
        self._used = 0  # arena rows taken by the graphs being captured

    def reserve(self, num_graphs: int, sites_per_pass: int) -> None:
        """Make the address arena for ``num_graphs`` graphs of up to ``sites_per_pass`` sites each.

        Call before capturing (outside any capture). Only one set of recorded graphs lives at a
        time (``DecodeGraphs.capture`` drops the others first), so each capture reuses the arena.
        """
        rows = num_graphs * sites_per_pass
        self._to_fill, self._used = [], 0
        if self._arena is None or self._arena.shape[0] < rows:
            self._arena = torch.empty((rows, 4), dtype=torch.int64, device=self.buffer.device)

    def begin_pass(self) -> None:
        """Forget sites left by a forward pass that failed before its last site."""
        self._cpu_deferred = {}
        self._drop_held()

    def add(self, x: torch.Tensor, slot: int, token_rows: bool, seq: torch.Tensor, pos: torch.Tensor) -> None:
        """Statistics of ``x`` (rows of requests ``seq`` at positions ``pos``) into the tables' ``slot``."""
        last = slot == self.last_token_site
        if x.is_cuda and self._batching(x, token_rows):
            self._batched.append((devstats.rows_view(x), slot))  # launched with the others at the graph's end
            if last:
                self._flush_batched(seq, pos)
        elif (x.is_cuda and token_rows and not hooks.eager and x.dtype in devstats.BATCHED_DTYPES
              and not torch.cuda.is_current_stream_capturing()):  # (a capture not ours: per site, as before)
            if self._held_rows is not None and self._held_rows[0] is not seq:
                self.flush()  # another forward pass of the step (its own rows)
            x2 = devstats.rows_view(x)
            self._held.append((x2, slot))
            storage = x2.untyped_storage()  # a view (q of the fused qkv) keeps its whole block alive
            if storage.data_ptr() not in self._held_storage:
                self._held_storage.add(storage.data_ptr())
                self._held_bytes += storage.nbytes()
            self._held_rows = (seq, pos)
            if last or self._held_bytes > HOLD_BYTES:
                self.flush()
        elif x.is_cuda:
            self.flush()  # a listener that may pause came in mid-step: the sites held so far first
            b = self.buffer
            devstats.site_stats_cuda(x, slot, seq, pos, b.moments, b.keys, b.bad, b.rows)
        else:
            if token_rows and x.numel() <= CPU_DEFER_ELEMENTS and not hooks.eager:
                self._cpu_deferred.setdefault((tuple(x.shape), x.dtype), []).append((x, slot))
            else:
                t = self.buffer.numpy_tables()
                devstats.site_stats_cpu(x, slot, seq.numpy(), pos.numpy(), t["moments"], t["keys"], t["bad"],
                                        t["lanes"])
            if last and self._cpu_deferred:
                self._flush_cpu(seq, pos)

    def flush(self) -> None:
        """Launch the held eager CUDA sites: one kernel per dtype and row count (call before reading the
        step's tables; the pass's last token site does it)."""
        if not self._held:
            return
        if torch.cuda.is_current_stream_capturing():  # left by a warm-up pass that failed: nothing to capture
            self._drop_held()
            return
        b = self.buffer
        seq, pos = self._held_rows
        for (dtype, rows), entries in _launches(self._held).items():
            table = devstats.to_device(entries, torch.int64, b.device)  # (its pinned block outlives the copy)
            devstats.sites_stats_cuda(table, len(entries), rows, dtype, seq, pos, b.moments, b.keys, b.bad, b.rows)
        self._drop_held()  # launched: their memory may be reused

    def _drop_held(self) -> None:
        self._held, self._held_bytes, self._held_rows = [], 0, None
        self._held_storage = set()

    def _flush_cpu(self, seq: torch.Tensor, pos: torch.Tensor) -> None:
        t = self.buffer.numpy_tables()
        seq_np, pos_np = seq.numpy(), pos.numpy()
        for items in self._cpu_deferred.values():
            devstats.sites_stats_cpu(items, seq_np, pos_np, t["moments"], t["keys"], t["bad"], t["lanes"])
        self._cpu_deferred = {}

    @staticmethod
    def _batching(x: torch.Tensor, token_rows: bool) -> bool:
        return (hooks.capturing and x.dtype in devstats.BATCHED_DTYPES and token_rows
                and torch.cuda.is_current_stream_capturing())

    def _flush_batched(self, seq: torch.Tensor, pos: torch.Tensor) -> None:
        """One launch per dtype for every site gathered in this graph."""
        b = self.buffer
        for (dtype, rows), entries in _launches(self._batched).items():
            if self._arena is None or self._used + len(entries) > self._arena.shape[0]:
                raise RuntimeError("recording under CUDA graphs: the address arena is too small (reserve() "
                                   "must be called before capturing, for every graph size)")
            table = self._arena[self._used: self._used + len(entries)]
            devstats.sites_stats_cuda(table, len(entries), rows, dtype, seq, pos, b.moments, b.keys, b.bad, b.rows)
            self._to_fill.append((self._used, entries))
            self._used += len(entries)
        self._batched = []

    def graphs_captured(self) -> None:
        """Fill the address tables of the graphs just captured (``hooks.graphs_captured``)."""
        # the views are made here, not kept from the capture: views made under inference mode are read-only
        for start, data in self._to_fill:
            self._arena[start: start + len(data)].copy_(torch.tensor(data, dtype=torch.int64))
        self._to_fill = []
        self._used = 0  # a later capture first drops these graphs, so it may take the arena again


def _launches(sites: list[tuple[torch.Tensor, int]]) -> dict[tuple[torch.dtype, int], list[list[int]]]:
    """``(rows view, slot)`` sites as ``devstats.sites_stats_cuda`` launches: one per dtype and row count,
    each with its table's rows (address, row stride, width, slot)."""
    out: dict[tuple[torch.dtype, int], list[list[int]]] = {}
    for x, slot in sites:
        out.setdefault((x.dtype, x.shape[0]), []).append([x.data_ptr(), x.stride(0), x.shape[1], slot])
    return out
