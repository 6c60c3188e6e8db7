"""Paged KV cache bookkeeping: fixed-size blocks, reference counts, prefix caching.

A full block is identified by a hash chain: ``hash(previous block's hash, its token ids)``, so two
prompts share a cached block only if everything before it matches too. A block's hash is
registered once its KV has actually been written (``commit``), never at allocation, so a
half-computed chunked prefill can never be served to another request. Freed blocks keep their
hash until they are handed out again, which is what makes a repeated prompt a cache hit.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from minillama.engine.sequence import Sequence


def chain_hash(prev: int, token_ids: list[int]) -> int:
    """Hash of one full block given the hash of the block before it (-1 for the first)."""
    return hash((prev, tuple(token_ids)))


class Block:
    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash = -1
        self.token_ids: list[int] = []  # kept to reject hash collisions


class BlockManager:
    """Hands out KV blocks to sequences and takes them back."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.hash_to_block: dict[int, int] = {}
        self.free_block_ids: deque[int] = deque(range(num_blocks))  # least recently freed first
        self.used_block_ids: set[int] = set()
        self.num_cache_hit_tokens = 0  # running totals, shown by the debugger
        # every block's reference count and whether it holds a hash, as arrays the debugger reads each
        # step in one call (mirrors of Block.ref_count and Block.hash != -1, kept at each change)
        self.ref_counts = np.zeros(num_blocks, dtype=np.int32)
        self.hashed = np.zeros(num_blocks, dtype=bool)
        self.num_computed_prompt_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def num_cached_free_blocks(self) -> int:
        """Free blocks that still hold a prefix-cache entry (a later prompt can revive them)."""
        return int(np.count_nonzero(self.hashed & (self.ref_counts == 0)))

    def _take(self, block_id: int) -> Block:
        block = self.blocks[block_id]
        assert block.ref_count == 0
        if block.hash != -1 and self.hash_to_block.get(block.hash) == block_id:
            del self.hash_to_block[block.hash]  # evict: its contents are about to be overwritten
        block.hash, block.token_ids, block.ref_count = -1, [], 1
        self.ref_counts[block_id], self.hashed[block_id] = 1, False
        self.free_block_ids.remove(block_id)
        self.used_block_ids.add(block_id)
        return block

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids of the longest cached prefix; the last prompt token is always left to compute."""
        if not self.enable_prefix_caching:
            return []
        hits, prev = [], -1
        for i in range((len(seq) - 1) // self.block_size):
            tokens = seq.block(i)
            h = chain_hash(prev, tokens)
            block_id = self.hash_to_block.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            hits.append(block_id)
            prev = h
        return hits

    def can_allocate(self, seq: Sequence) -> bool:
        hits = self._cached_prefix(seq)
        revived = sum(1 for b in hits if self.blocks[b].ref_count == 0)  # cached but sitting in the free list
        return self.num_free_blocks - revived >= seq.num_blocks - len(hits)

    def allocate(self, seq: Sequence) -> None:
        """Give a waiting sequence blocks for all its tokens, reusing cached prefix blocks."""
        assert not seq.block_table
        hits = self._cached_prefix(seq)
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                self.free_block_ids.remove(block_id)
                self.used_block_ids.add(block_id)
            block.ref_count += 1
            self.ref_counts[block_id] += 1
            seq.block_table.append(block_id)
        for _ in range(seq.num_blocks - len(hits)):
            seq.block_table.append(self._take(self.free_block_ids[0]).block_id)
        seq.num_computed_tokens = seq.num_cached_tokens = len(hits) * self.block_size
        seq.block_hashes = [self.blocks[b].hash for b in hits]
        self.num_cache_hit_tokens += seq.num_cached_tokens

    def deallocate(self, seq: Sequence) -> None:
        """Drop a sequence's references; blocks nobody uses go back to the free list (hash kept)."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            self.ref_counts[block_id] -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                self.used_block_ids.remove(block_id)
                self.free_block_ids.append(block_id)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra blocks a sequence needs so that its first ``num_tokens`` tokens have slots."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Append blocks so that ``num_tokens`` tokens fit (a decode step crossing a block boundary)."""
        for _ in range(self.blocks_needed(seq, num_tokens)):
            seq.block_table.append(self._take(self.free_block_ids[0]).block_id)

    def commit(self, seq: Sequence) -> None:
        """Register the hashes of blocks that became full of computed KV, making them shareable.

        Only blocks whose token ids are all known: with overlapped steps the last ids may still be
        placeholders for tokens being sampled.
        """
        if not self.enable_prefix_caching:
            return
        hashes = seq.block_hashes
        known = min(seq.num_computed_tokens, len(seq.token_ids) - seq.num_pending)
        for i in range(len(hashes), known // self.block_size):
            tokens = seq.block(i)
            h = chain_hash(hashes[-1] if hashes else -1, tokens)
            hashes.append(h)
            block = self.blocks[seq.block_table[i]]
            block.hash, block.token_ids = h, tokens
            self.hashed[block.block_id] = True
            self.hash_to_block.setdefault(h, block.block_id)

    def check_invariants(self, seqs: list[Sequence]) -> None:
        """Raise AssertionError if any block is leaked, double-owned or miscounted (for tests and debugging)."""
        refs = [0] * len(self.blocks)
        for seq in seqs:
            for block_id in seq.block_table:
                refs[block_id] += 1
        for block in self.blocks:
            assert block.ref_count == refs[block.block_id], f"block {block.block_id}: ref_count {block.ref_count} != {refs[block.block_id]} owners"
        free = set(self.free_block_ids)
        assert len(free) == len(self.free_block_ids), "a block is in the free list twice"
        assert not free & self.used_block_ids, "a block is both free and used"
        assert free | self.used_block_ids == set(range(len(self.blocks))), "a block is neither free nor used (leaked)"
        assert all((self.blocks[b].ref_count > 0) == (b in self.used_block_ids) for b in range(len(self.blocks)))
        assert [b.ref_count for b in self.blocks] == self.ref_counts.tolist(), "ref_counts out of step"
        assert [b.hash != -1 for b in self.blocks] == self.hashed.tolist(), "hashed out of step"
        for h, block_id in self.hash_to_block.items():
            assert self.blocks[block_id].hash == h, "hash table points at a block that was overwritten"
