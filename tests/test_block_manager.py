"""Block-manager invariants under random streams of add, grow, finish and preempt."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from minillama.engine.block_manager import BlockManager
from minillama.engine.sequence import Sequence
from minillama.sampling_params import SamplingParams

BS = 4


def _seq(tokens: list[int]) -> Sequence:
    return Sequence(tokens, SamplingParams(max_tokens=8), BS)


ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.lists(st.integers(0, 3), min_size=1, max_size=14)),
        st.tuples(st.just("compute"), st.integers(0, 50)),
        st.tuples(st.just("decode"), st.integers(0, 50)),
        st.tuples(st.just("finish"), st.integers(0, 50)),
        st.tuples(st.just("preempt"), st.integers(0, 50)),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_random_stream_keeps_invariants(stream):
    bm = BlockManager(num_blocks=12, block_size=BS)
    running: list[Sequence] = []
    for op, arg in stream:
        if op == "add":
            seq = _seq(arg)
            if bm.can_allocate(seq):
                free_before = bm.num_free_blocks
                bm.allocate(seq)
                assert seq.num_computed_tokens < len(seq), "the last prompt token must always be computed"
                assert seq.num_computed_tokens % BS == 0
                assert len(seq.block_table) == seq.num_blocks
                assert bm.num_free_blocks <= free_before
                running.append(seq)
        elif running:
            seq = running[arg % len(running)]
            if op == "compute":  # the model wrote KV for all but the last token
                seq.num_computed_tokens = len(seq) - 1
                bm.commit(seq)
            elif op == "decode":
                seq.num_computed_tokens = len(seq)
                bm.commit(seq)
                seq.append_token(arg % 4)
                if bm.blocks_needed(seq, len(seq)) <= bm.num_free_blocks:
                    bm.grow(seq, len(seq))
                else:
                    bm.deallocate(seq)
                    running.remove(seq)
            else:  # finish and preempt both hand every block back
                bm.deallocate(seq)
                assert seq.block_table == [] and seq.num_computed_tokens == 0
                running.remove(seq)
        bm.check_invariants(running)
        assert bm.num_cached_free_blocks == sum(1 for b in bm.free_block_ids if bm.blocks[b].hash != -1)
    for seq in running:
        bm.deallocate(seq)
    bm.check_invariants([])
    assert bm.num_free_blocks == 12


def test_prefix_hit_shares_blocks_and_counts_refs():
    bm = BlockManager(num_blocks=10, block_size=BS)
    a = _seq(list(range(10)))  # blocks [0..3] [4..7] [8, 9]
    bm.allocate(a)
    a.num_computed_tokens = 10
    bm.commit(a)
    b = _seq(list(range(9)) + [99])
    bm.allocate(b)
    assert b.num_cached_tokens == 8 and b.block_table[:2] == a.block_table[:2]
    assert [bm.blocks[i].ref_count for i in a.block_table[:2]] == [2, 2]
    bm.check_invariants([a, b])
    bm.deallocate(a)
    bm.deallocate(b)
    # freed but still cached: a third request revives the blocks from the free list
    c = _seq(list(range(8)) + [5])
    assert bm.can_allocate(c)
    bm.allocate(c)
    assert c.num_cached_tokens == 8
    bm.check_invariants([c])


def test_exact_block_multiple_never_fully_cached():
    bm = BlockManager(num_blocks=10, block_size=BS)
    a = _seq(list(range(8)))  # exactly two blocks
    bm.allocate(a)
    a.num_computed_tokens = 8
    bm.commit(a)
    bm.deallocate(a)
    b = _seq(list(range(8)))
    bm.allocate(b)
    assert b.num_cached_tokens == 4, "the block holding the last prompt token must be recomputed"


def test_hash_chain_depends_on_prefix():
    bm = BlockManager(num_blocks=10, block_size=BS)
    a = _seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    bm.allocate(a)
    a.num_computed_tokens = 9
    bm.commit(a)
    b = _seq([0, 0, 0, 0, 5, 6, 7, 8, 9])  # same second block, different first
    bm.allocate(b)
    assert b.num_cached_tokens == 0
