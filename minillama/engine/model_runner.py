"""Turns a scheduled batch into tensors, runs the network, samples.

``prepare`` builds vLLM's per-step inputs (``input_ids``, ``positions``, ``cu_seqlens_q/k``,
``max_seqlen_q/k``, ``slot_mapping``, ``context_lens``, ``block_tables``) and puts them in the
step context; ``run`` does one forward pass (a decode step on a GPU replays a CUDA graph, see
``cuda_graph.py``) and returns one sampled token per sequence whose new tokens reach its end
(None for a prefill chunk that stops short).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minillama import hooks
from minillama.attention import get_backend
from minillama.config import Config
from minillama.context import Context, get_context, reset_context, set_context
from minillama.engine.scheduler import ScheduledBatch
from minillama.engine.sequence import Sequence
from minillama.layers.sampler import Sampler
from minillama.models.config import ModelConfig


@dataclass
class PendingTokens:
    """The sampled tokens of a step still in flight (overlapped steps, see ``LLMEngine.step``)."""

    tokens: torch.Tensor  # (rows,) int64 on the device, -1 where a row samples nothing
    row_of: dict[int, int]  # seq_id -> its row


class ModelRunner:
    def __init__(self, config: Config, model_config: ModelConfig, model: torch.nn.Module,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.config = config
        self.model_config = model_config
        self.model = model
        self.device = device
        self.dtype = dtype
        self.block_size = config.kvcache_block_size
        self.sampler = Sampler()
        self.kv_cache = torch.empty(0)
        self.graphs = None  # CUDA graphs for decode, see cuda_graph.py
        self.graphed = False  # whether the last forward pass replayed a graph
        self._iotas: dict[torch.dtype, torch.Tensor] = {}
        # A backend that pads every sequence's queries to the longest one: on a GPU, run the
        # decodes and the prompt chunks of a mixed batch as two forward passes (see ``run``).
        self.backend = get_backend(config.backend)
        self.split_mixed_batches = device.type == "cuda" and self.backend.pads_queries

    # ---- KV cache -------------------------------------------------------------------------------
    def bytes_per_block(self) -> int:
        c = self.model_config
        return 2 * c.num_hidden_layers * self.block_size * c.num_key_value_heads * c.head_dim * self.dtype.itemsize

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """One tensor (2, layers, num_blocks + 1, block_size, kv_heads, head_dim); the extra block is the
        spare that skipped slots (-1) are written to. Each layer gets views of its K and V slices."""
        c = self.model_config
        shape = (2, c.num_hidden_layers, num_blocks + 1, self.block_size, c.num_key_value_heads, c.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        for i, layer in enumerate(self.model.model.layers):
            layer.self_attn.attn.k_cache = self.kv_cache[0, i]
            layer.self_attn.attn.v_cache = self.kv_cache[1, i]

    # ---- inputs ---------------------------------------------------------------------------------
    def _tensor(self, data: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, pin_memory=self.device.type == "cuda").to(self.device, non_blocking=True)

    def prepare(self, batch: ScheduledBatch, step: int = -1) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Build the step's tensors and context; returns input_ids, positions and the logit rows to sample."""
        if batch.phase == "decode":
            return self._prepare_decode(batch, step)
        bs = self.block_size
        input_ids, positions, slot_mapping = [], [], []
        cu_q, cu_k, logit_rows, key_lens = [0], [0], [], []
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            key_lens.append(end)
            input_ids += seq.token_ids[start:end]
            positions += range(start, end)
            slot_mapping += [seq.block_table[p // bs] * bs + p % bs for p in range(start, end)]
            cu_q.append(cu_q[-1] + n)
            cu_k.append(cu_k[-1] + end)
            if end == len(seq):
                logit_rows.append(cu_q[-1] - 1)
        need_tables = any(s.num_computed_tokens > 0 for s in batch.seqs)
        ctx = Context(
            is_prefill=True,
            cu_seqlens_q=self._tensor(cu_q, torch.int32),
            cu_seqlens_k=self._tensor(cu_k, torch.int32),
            max_seqlen_q=max(batch.num_new_tokens),
            max_seqlen_k=max(key_lens),
            slot_mapping=self._tensor(slot_mapping, torch.int64),
            block_tables=self._block_tables(batch.seqs) if need_tables else None,
            seq_ids=[s.seq_id for s in batch.seqs],
            query_lens=list(batch.num_new_tokens),
            key_lens=key_lens,
            step=step,
            batch_invariant=self.config.batch_invariant,
        )
        set_context(ctx)
        return self._tensor(input_ids, torch.int64), self._tensor(positions, torch.int64), logit_rows

    def _prepare_decode(self, batch: ScheduledBatch, step: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Decode: one new token per sequence, the last of its token ids, at position len - 1.

        This runs every step for every running sequence, so it builds each list in one pass and
        sends the integers in two host-to-device copies; cumulative lengths are made on the device.
        """
        bs, seqs = self.block_size, batch.seqs
        n = len(seqs)
        lens = [len(s.token_ids) for s in seqs]  # keys per sequence, the new token included
        ids_pos_slots = [s.token_ids[-1] for s in seqs] + [m - 1 for m in lens] + [
            s.block_table[(m - 1) // bs] * bs + (m - 1) % bs for s, m in zip(seqs, lens, strict=True)]
        width = max(len(s.block_table) for s in seqs)
        lens_tables = lens + [b for s in seqs for b in s.block_table + [0] * (width - len(s.block_table))]
        longs = self._tensor(ids_pos_slots, torch.int64)
        ints = self._tensor(lens_tables, torch.int32)
        context_lens = ints[:n]
        zero = torch.zeros(1, dtype=torch.int32, device=self.device)
        ctx = Context(
            is_prefill=False,
            cu_seqlens_q=torch.arange(n + 1, dtype=torch.int32, device=self.device),
            cu_seqlens_k=torch.cat([zero, context_lens.cumsum(0, dtype=torch.int32)]),
            max_seqlen_q=1,
            max_seqlen_k=max(lens),
            slot_mapping=longs[2 * n:],
            context_lens=context_lens,
            block_tables=ints[n:].view(n, width),
            seq_ids=[s.seq_id for s in seqs],
            query_lens=[1] * n,
            step=step,
            batch_invariant=self.config.batch_invariant,
        )
        set_context(ctx)
        return longs[:n], longs[n:2 * n], list(range(n))

    def _block_tables(self, seqs: list[Sequence]) -> torch.Tensor:
        width = max(len(s.block_table) for s in seqs)
        return self._tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs], torch.int32)

    # ---- one step -------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, step: int = -1) -> list[int | None]:
        """One forward pass and sampling; the sampled token of each row (None for a prefill chunk
        that stops short of its sequence's end)."""
        return [t if t >= 0 else None for t in self.launch(batch, step).tolist()]

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, step: int = -1, prev: PendingTokens | None = None) -> torch.Tensor:
        """Like ``run`` without waiting: ``(len(batch.seqs),)`` int64 tokens on the device, -1 where a
        row samples nothing. ``PENDING`` input ids are taken from ``prev`` (the step before, still in flight)."""
        if not self._split_mixed(batch):
            return self._run(batch, step, prev)
        # With a backend that pads queries, a batch that mixes decodes (1 query) with prompt
        # chunks (hundreds) would be nearly all padding: run the two parts as separate passes.
        tokens = torch.full((len(batch.seqs),), -1, dtype=torch.int64, device=self.device)
        decode = [s.num_computed_tokens == len(s) - 1 for s in batch.seqs]
        for part in (True, False):
            rows = [i for i, d in enumerate(decode) if d == part]
            sub = ScheduledBatch([batch.seqs[i] for i in rows], [batch.num_new_tokens[i] for i in rows])
            tokens[self._tensor(rows, torch.int64)] = self._run(sub, step, prev)
        return tokens

    def _split_mixed(self, batch: ScheduledBatch) -> bool:
        return self.split_mixed_batches and not hooks.enabled and batch.phase == "mixed"

    def _run(self, batch: ScheduledBatch, step: int, prev: PendingTokens | None) -> torch.Tensor:
        input_ids, positions, logit_rows = self.prepare(batch, step)
        if prev is not None:
            self._fill_pending(input_ids, batch, prev)
        if batch.phase == "decode":  # every row ends its sequence
            ends = list(range(len(batch.seqs)))
        else:
            ends = [i for i, (s, n) in enumerate(zip(batch.seqs, batch.num_new_tokens, strict=True))
                    if s.num_computed_tokens + n == len(s)]
        if hooks.enabled:
            self._describe_rows(batch, positions, logit_rows, ends)
        self.graphed = (self.graphs is not None and not get_context().is_prefill
                        and self.graphs.can_run(len(batch.seqs)))
        if self.graphed:
            hidden = self.graphs.run(input_ids, positions)
        else:
            with self.backend.forward_scope():
                hidden = self.model(input_ids, positions)
        tokens = torch.full((len(batch.seqs),), -1, dtype=torch.int64, device=self.device)
        if logit_rows:
            if len(logit_rows) < hidden.shape[0]:
                hidden = hidden[self._tensor(logit_rows, torch.int64)]
            logits = self.model.compute_logits(hidden)
            sampled = self.sample(logits, [batch.seqs[i] for i in ends])
            if hooks.enabled:
                hooks.emit("sampled", sampled, seq_ids=[batch.seqs[i].seq_id for i in ends])
            if len(ends) == len(batch.seqs):
                tokens = sampled
            else:
                tokens[self._tensor(ends, torch.int64)] = sampled
        reset_context()
        return tokens

    def _describe_rows(self, batch: ScheduledBatch, positions: torch.Tensor, logit_rows: list[int],
                       ends: list[int]) -> None:
        """For hook listeners: each row's request and position, and the sampled rows, on the device."""
        ctx = get_context()
        ctx.positions = positions
        rows = positions.shape[0]
        if batch.phase == "decode":  # row i is request i, and every row samples: no copies
            ctx.seq_index = ctx.sample_index = self._iota(rows, torch.int32)
            ctx.sample_rows, ctx.sample_positions = self._iota(rows, torch.int64), positions
            return
        seq_index = [i for i, n in enumerate(batch.num_new_tokens) for _ in range(n)]
        ints = self._tensor(seq_index + ends, torch.int32)
        ctx.seq_index, ctx.sample_index = ints[:len(seq_index)], ints[len(seq_index):]
        ctx.sample_rows = self._tensor(logit_rows, torch.int64)
        ctx.sample_positions = positions[ctx.sample_rows]

    def _iota(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        """``arange(n)`` on the device, from a cached one (grown when too short)."""
        have = self._iotas.get(dtype)
        if have is None or have.shape[0] < n:
            have = self._iotas[dtype] = torch.arange(max(n, 256), dtype=dtype, device=self.device)
        return have[:n]

    def _fill_pending(self, input_ids: torch.Tensor, batch: ScheduledBatch, prev: PendingTokens) -> None:
        """Put the tokens of the step in flight where this step's input has ``PENDING`` placeholders.

        A placeholder is always a sequence's last token, so it is the last input row of its chunk.
        """
        at, src, row, row_of = [], [], 0, prev.row_of
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            row += n
            if seq.num_pending and seq.num_computed_tokens + n == len(seq.token_ids):
                at.append(row - 1)
                src.append(row_of[seq.seq_id])
        if at:
            input_ids[self._tensor(at, torch.int64)] = prev.tokens[self._tensor(src, torch.int64)]

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        params = [s.sampling_params for s in seqs]
        if all(p.temperature == 0 for p in params):
            return self.sampler(logits, None, None, None, [], all_greedy=True)  # argmax on the device
        generators = []
        for s in seqs:
            if s.sampling_params.seed is not None and s.sampling_params.temperature > 0:
                if getattr(s, "generator", None) is None:
                    s.generator = torch.Generator(device=self.device).manual_seed(s.sampling_params.seed)
                generators.append(s.generator)
            else:
                generators.append(None)
        return self.sampler(
            logits,
            self._tensor([p.temperature for p in params], torch.float32),
            self._tensor([p.top_k for p in params], torch.int64),
            self._tensor([p.top_p for p in params], torch.float32),
            generators,
            all_greedy=False,
            need_top_k_top_p=any(p.top_k > 0 or p.top_p < 1 for p in params),
        )
