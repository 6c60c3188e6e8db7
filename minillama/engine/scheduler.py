"""Decides which tokens run in the next step.

Policy (continuous batching with chunked prefill): running sequences go first, oldest first, each
asking for all its uncomputed tokens (1 for a decode) within the step's token budget; then waiting
sequences are admitted while the budget, ``max_num_seqs`` and free blocks allow. A prompt that
does not fit the budget is prefilled in chunks over several steps. When a running sequence needs
a new block and none is free, the newest running sequence is preempted: its blocks are freed and
it goes back to the front of the queue to be recomputed later (its prefix may still be cached).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from minillama.config import Config
from minillama.engine.block_manager import BlockManager
from minillama.engine.sequence import PENDING, Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """One step's work: ``num_new_tokens[i]`` tokens of ``seqs[i]`` starting at its ``num_computed_tokens``."""

    seqs: list[Sequence]
    num_new_tokens: list[int]
    preempted: list[Sequence] = field(default_factory=list)
    _phase: str | None = field(default=None, repr=False)

    @property
    def phase(self) -> str:
        """'decode' (every sequence adds one token after its cached ones), 'prefill', or 'mixed'.

        Worked out on first use (the model runner's, before the step runs) and kept: running the
        step moves the sequences on.
        """
        if self._phase is None:
            decode = [s.num_computed_tokens == len(s.token_ids) - 1 for s in self.seqs]
            self._phase = "decode" if all(decode) else "prefill" if not any(decode) else "mixed"
        return self._phase

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(self, config: Config, block_manager: BlockManager, eos_token_ids: list[int]) -> None:
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_model_len = config.max_model_len
        self.block_manager = block_manager
        self.eos_token_ids = set(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def is_finished(self) -> bool:
        return not self.waiting and not self.running

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.deallocate(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> ScheduledBatch:
        bm = self.block_manager
        budget = self.max_num_batched_tokens
        batch = ScheduledBatch([], [])
        # 1. sequences already running: decodes and unfinished chunked prefills
        i, running, block_size = 0, self.running, bm.block_size
        while i < len(running) and budget > 0:
            seq = running[i]
            num_tokens = len(seq.token_ids)
            if seq.num_pending and self._reaches_length(seq, num_tokens):
                i += 1  # its last token is in flight and ends it: nothing more to compute
                continue
            n = min(num_tokens - seq.num_computed_tokens, budget)
            end = seq.num_computed_tokens + n
            if -(-end // block_size) > len(seq.block_table):  # needs a new block (most steps do not)
                while bm.blocks_needed(seq, end) > bm.num_free_blocks:
                    victim = running[-1]
                    self._preempt(victim)
                    batch.preempted.append(victim)
                    if victim is seq:
                        break
                if seq.status != SequenceStatus.RUNNING:
                    break  # it preempted itself: everyone after it is gone too
                bm.grow(seq, end)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
            i += 1
        # 2. admit waiting sequences (not in a step that had to preempt: memory is tight)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not batch.preempted:
            seq = self.waiting[0]
            if not bm.can_allocate(seq):
                break
            self.waiting.popleft()
            bm.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            n = min(len(seq) - seq.num_computed_tokens, budget)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
        if not batch.seqs and self.waiting and not self.running:
            seq = self.waiting[0]
            raise RuntimeError(
                f"request {seq.seq_id} needs {seq.num_blocks} KV blocks but the cache has only "
                f"{len(bm.blocks)}: lower max_model_len or give the KV cache more memory"
            )
        return batch

    def postprocess(self, batch: ScheduledBatch, sampled: list[int | None]) -> list[Sequence]:
        """Account the computed tokens, append sampled ones, and retire finished sequences."""
        finished = []
        for seq, n, token_id in zip(batch.seqs, batch.num_new_tokens, sampled, strict=True):
            seq.num_computed_tokens += n
            self.block_manager.commit(seq)
            if token_id is None:
                continue  # a prefill chunk that did not reach the end of the sequence
            seq.append_token(token_id)
            if self._finish_if_done(seq, len(seq) - 1):
                finished.append(seq)
        return finished

    def fail(self, seq: Sequence, message: str) -> None:
        """Retire ``seq`` with finish reason "error" and ``message``; its blocks go back to the cache."""
        del seq.token_ids[len(seq.token_ids) - seq.num_pending:]  # placeholders of steps in flight
        seq.num_pending = 0
        seq.finish_reason, seq.error = "error", message
        seq.status = SequenceStatus.FINISHED
        self.block_manager.deallocate(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    # ---- overlapped steps: launch now, learn the sampled tokens one step later ------------------
    def launched(self, batch: ScheduledBatch) -> list[tuple[Sequence, int]]:
        """A batch went to the GPU: account its tokens and give each sampling sequence a placeholder.

        Returns (sequence, index of its placeholder) for the rows that sample, in batch order.
        """
        rows, bm = [], self.block_manager
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            seq.num_computed_tokens += n
            bm.commit(seq)  # prompt chunks become shareable now, as in synchronous steps
            tokens = seq.token_ids
            if seq.num_computed_tokens == len(tokens):
                rows.append((seq, len(tokens)))
                tokens.append(PENDING)
                seq.num_pending += 1
        return rows

    def confirm(self, rows: list[tuple[Sequence, int]], tokens: list[int]) -> list[Sequence]:
        """The tokens of a launched batch arrived: fill the placeholders, retire finished sequences.

        A sequence may already sit in the next batch (in flight); if this token ends it, the
        placeholder of that step is dropped and its row's result is ignored when it arrives.
        """
        finished = []
        bm, done = self.block_manager, SequenceStatus.FINISHED
        for (seq, index), token_id in zip(rows, tokens, strict=True):
            if seq.status is done:
                continue
            seq.token_ids[index] = token_id
            seq.num_pending -= 1
            bm.commit(seq)  # blocks whose tokens are now all known become shareable
            if self._finish_if_done(seq, index):
                finished.append(seq)
        return finished

    def _reaches_length(self, seq: Sequence, num_tokens: int) -> bool:
        return (num_tokens - seq.num_prompt_tokens >= seq.sampling_params.max_tokens
                or num_tokens >= self.max_model_len)

    def _finish_if_done(self, seq: Sequence, index: int) -> bool:
        """Retire ``seq`` if its token at ``index`` (just sampled) ends it: EOS, max_tokens or max_model_len."""
        token_id = seq.token_ids[index]
        if not seq.sampling_params.ignore_eos and token_id in self.eos_token_ids:
            seq.finish_reason = "stop"
        elif self._reaches_length(seq, index + 1):
            seq.finish_reason = "length"
        else:
            return False
        del seq.token_ids[index + 1:]  # a placeholder of a step in flight, if any
        seq.num_pending = 0
        seq.status = SequenceStatus.FINISHED
        self.block_manager.deallocate(seq)
        if seq in self.running:
            self.running.remove(seq)
        else:  # preempted while its last step was in flight
            self.waiting.remove(seq)
        return True
