"""CUDA graphs for decode steps.

A decode step launches hundreds of small kernels; replaying a captured graph removes the launch
gaps. One graph is captured per batch size in ``sizes`` over static input buffers; a step with
``n`` sequences replays the smallest graph with at least ``n`` rows, its padding rows writing to
the spare KV slot (slot -1) and reading no keys (context length 0).

The graphs read the block table at its full width (``max_model_len`` worth of blocks). That is
free for a backend whose kernels stop at each sequence's length; one whose decode work grows with
the table width says how large a batch it still wants graphs for
(``backend.graph_decode_max_batch``), and larger decode steps run eagerly, with tables only as
wide as the batch's longest sequence needs.

Hook listeners that only enqueue device work at sites (``hooks.eager`` False: the debugger's
statistics, copies of full tensors, the shadow attention) are captured inside the graphs: a second
set of graphs is captured for each ``hooks.generation`` while such listeners are attached, so a
recorded run still replays graphs. ``enforce_eager`` or an eager listener turns graphs off.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

import torch

from minillama import hooks
from minillama.context import Context, get_context, set_context


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No garbage collection inside: a cycle freed there could destroy another CUDA graph (a freed
    recorder's), which CUDA forbids while a stream captures, and the capture would fail."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


class DecodeGraphs:
    def __init__(self, runner) -> None:
        cfg = runner.config
        self.model = runner.model
        self.forward_scope = runner.backend.forward_scope
        max_blocks = -(-cfg.max_model_len // cfg.kvcache_block_size)
        max_bs = min(cfg.max_num_seqs, 512, runner.backend.graph_decode_max_batch(max_blocks * cfg.kvcache_block_size))
        self.sizes = [s for s in (1, 2, 4, 8) if s < max_bs] + list(range(16, max_bs, 16)) + [max_bs]
        self.sizes = sorted(set(self.sizes))
        self.max_blocks = max_blocks
        self.batch_invariant = cfg.batch_invariant
        dev = runner.device
        self.input_ids = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.seq_index = torch.arange(max_bs, dtype=torch.int32, device=dev)  # decode: row i is request i
        self.slot_mapping = torch.full((max_bs,), -1, dtype=torch.int64, device=dev)
        self.context_lens = torch.zeros(max_bs, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(max_bs, self.max_blocks, dtype=torch.int32, device=dev)
        self.outputs = torch.zeros(max_bs, runner.model_config.hidden_size, dtype=runner.dtype, device=dev)
        self.sets: dict[int, dict[int, torch.cuda.CUDAGraph]] = {}  # hooks generation (-1: none) -> bs -> graph
        self.pool = None
        self.num_replays = 0  # decode steps served by a graph (tests and benchmarks read it)
        self.capture()

    def _context(self, bs: int) -> Context:
        return Context(is_prefill=False, slot_mapping=self.slot_mapping[:bs], context_lens=self.context_lens[:bs],
                       block_tables=self.block_tables[:bs], max_seqlen_q=1, positions=self.positions[:bs],
                       seq_index=self.seq_index[:bs], batch_invariant=self.batch_invariant)

    @staticmethod
    def _key() -> int:
        return hooks.generation if hooks.enabled else -1

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture graphs for every size with the hook listeners attached now (a no-op if done already).

        Sets of graphs for listeners no longer attached are dropped; they share one memory pool.
        """
        key = self._key()
        if key in self.sets or hooks.eager:  # an eager listener keeps steps out of graphs anyway
            return
        for old in [k for k in self.sets if k not in (-1, key)]:
            del self.sets[old]
        if not self.sets:  # the pool died with its last graphs; capturing into it again trips the allocator
            self.pool = None
        graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # The warm-up forward below really runs, on the static buffers: after a replay they hold that
        # step's slots, so it would write K/V over live and prefix-cached blocks. Padding rows only.
        self.slot_mapping.fill_(-1)
        self.context_lens.zero_()
        self.block_tables.zero_()
        self.input_ids.zero_()
        self.positions.zero_()
        hooks.capturing = True
        try:
            with gc_paused():  # the loop allocates; a collection inside could end the capture
                for bs in reversed(self.sizes):  # largest first so smaller graphs reuse its memory pool
                    set_context(self._context(bs))
                    with self.forward_scope():
                        self.outputs[:bs] = self.model(self.input_ids[:bs], self.positions[:bs])  # warm up
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, self.pool), self.forward_scope():
                        self.outputs[:bs] = self.model(self.input_ids[:bs], self.positions[:bs])
                    if self.pool is None:
                        self.pool = graph.pool()
                    graphs[bs] = graph
                    torch.cuda.synchronize()
        finally:
            hooks.capturing = False
            set_context(Context())
        self.sets[key] = graphs
        if hooks.enabled:
            hooks.graphs_captured()

    def can_run(self, bs: int) -> bool:
        """True when a decode step of ``bs`` sequences may replay a graph now."""
        return bs <= self.sizes[-1] and not hooks.eager

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Replay the graph for this decode step (context already set by ``prepare``)."""
        self.capture()
        ctx = get_context()
        n = input_ids.shape[0]
        bs = next(s for s in self.sizes if s >= n)
        width = ctx.block_tables.shape[1]
        self.input_ids[:n] = input_ids
        self.positions[:n] = positions
        self.slot_mapping.fill_(-1)
        self.slot_mapping[:n] = ctx.slot_mapping
        self.context_lens.zero_()
        self.context_lens[:n] = ctx.context_lens
        self.block_tables[:n, :width] = ctx.block_tables
        self.sets[self._key()][bs].replay()
        self.num_replays += 1
        return self.outputs[:n]
