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
``enforce_eager`` turns graphs off; so does an attached hook listener (hook sites are Python calls).
"""

from __future__ import annotations

import torch

from minillama.engine.context import Context, get_context, set_context


class DecodeGraphs:
    def __init__(self, runner) -> None:
        cfg = runner.config
        self.model = runner.model
        self.forward_scope = runner.backend.forward_scope
        max_blocks = -(-cfg.max_model_len // cfg.kvcache_block_size)
        max_bs = min(cfg.max_num_seqs, 512, runner.backend.graph_decode_max_batch(max_blocks * cfg.kvcache_block_size))
        self.sizes = [s for s in (1, 2, 4, 8) if s < max_bs] + list(range(16, max_bs, 16)) + [max_bs]
        self.sizes = sorted(set(self.sizes))
        dev = runner.device
        self.input_ids = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((max_bs,), -1, dtype=torch.int64, device=dev)
        self.context_lens = torch.zeros(max_bs, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(max_bs, max_blocks, dtype=torch.int32, device=dev)
        self.outputs = torch.zeros(max_bs, runner.model_config.hidden_size, dtype=runner.dtype, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None
        self.num_replays = 0  # decode steps served by a graph (tests and benchmarks read it)
        self._capture()

    def _context(self, bs: int) -> Context:
        return Context(is_prefill=False, slot_mapping=self.slot_mapping[:bs], context_lens=self.context_lens[:bs],
                       block_tables=self.block_tables[:bs], max_seqlen_q=1)

    @torch.inference_mode()
    def _capture(self) -> None:
        for bs in reversed(self.sizes):  # largest first so smaller graphs reuse its memory pool
            set_context(self._context(bs))
            with self.forward_scope():
                self.outputs[:bs] = self.model(self.input_ids[:bs], self.positions[:bs])  # warm up
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, self.pool), self.forward_scope():
                self.outputs[:bs] = self.model(self.input_ids[:bs], self.positions[:bs])
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[bs] = graph
            torch.cuda.synchronize()
        set_context(Context())

    def can_run(self, bs: int) -> bool:
        return bs <= self.sizes[-1]

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Replay the graph for this decode step (context already set by ``prepare``)."""
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
        self.graphs[bs].replay()
        self.num_replays += 1
        return self.outputs[:n]
