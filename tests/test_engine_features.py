"""Prefix caching, preemption, chunked prefill and sampling on the built-in model (CPU)."""

from __future__ import annotations

import pytest

from minillama import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def run_counting(llm: LLM, prompts, params) -> tuple[list[list[int]], int, list]:
    """Generate while counting the tokens the model actually computed; returns (tokens, computed, batches)."""
    seqs = [llm.add_request(p, params) for p in prompts]
    computed, batches = 0, []
    while llm.has_unfinished():
        batch, _ = llm.step()
        computed += batch.num_tokens
        batches.append((batch.phase, list(batch.num_new_tokens), len(batch.preempted)))
    return [s.completion_token_ids for s in seqs], computed, batches


@pytest.fixture(scope="module")
def long_prompt(builtin_llm) -> list[int]:
    text = "The history of the printing press begins in the fifteenth century. " * 12
    return builtin_llm.tokenizer.encode(text)[:150]


def test_prefix_cache_computes_only_the_tail(builtin_llm, long_prompt):
    llm = builtin_llm
    bs = llm.config.kvcache_block_size
    first, computed1, _ = run_counting(llm, [long_prompt], GREEDY)
    second, computed2, _ = run_counting(llm, [long_prompt], GREEDY)
    assert first == second
    n, new = len(long_prompt), GREEDY.max_tokens - 1  # decode steps after the first token
    assert computed1 == n + new
    cached = (n - 1) // bs * bs
    assert computed2 == n - cached + new, "the second run must compute only the uncached tail"


@pytest.mark.parametrize("num_blocks", [1, 3])
def test_prompt_of_exact_blocks_decodes(builtin_llm, num_blocks):
    bs = builtin_llm.config.kvcache_block_size
    ids = [(i * 7) % 1000 + 100 for i in range(num_blocks * bs)]
    a = builtin_llm.generate([ids], GREEDY)[0]
    b = builtin_llm.generate([ids], GREEDY)[0]  # second time through the prefix cache
    assert len(a.token_ids) == GREEDY.max_tokens and a.token_ids == b.token_ids
    assert b.num_cached_tokens == (num_blocks - 1) * bs


def _prompts(llm: LLM, n: int) -> list[list[int]]:
    tok = llm.tokenizer
    return [tok.encode_chat([{"role": "user", "content": f"Count {'slowly ' * i}from {i} to {i + 5}."}])
            for i in range(n)]


@pytest.fixture(scope="module")
def reference_tokens(builtin_llm):
    prompts = _prompts(builtin_llm, 6)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    return prompts, params, [o.token_ids for o in builtin_llm.generate(prompts, params)]


@pytest.mark.slow
def test_preemption_gives_same_tokens(reference_tokens):
    prompts, params, ref = reference_tokens
    # 6 sequences of ~30-60 tokens need ~30 blocks of 16 at the end; give 14
    small = LLM(None, device="cpu", num_kvcache_blocks=14, kvcache_block_size=16, max_model_len=200)
    tokens, _, batches = run_counting(small, prompts, params)
    assert tokens == ref
    assert small.scheduler.num_preemptions > 0, "the cache was meant to be too small"
    small.block_manager.check_invariants([])


@pytest.mark.slow
def test_chunked_prefill_gives_same_tokens(reference_tokens):
    prompts, params, ref = reference_tokens
    chunked = LLM(None, device="cpu", max_num_batched_tokens=24, num_kvcache_blocks=128, max_model_len=512)
    tokens, _, batches = run_counting(chunked, prompts, params)
    assert tokens == ref
    assert any(phase == "mixed" for phase, _, _ in batches)
    assert max(sum(n) for _, n, _ in batches) <= 24
    # some prompt really was split across steps
    assert any(max(n) == 24 for phase, n, _ in batches if phase != "decode")


@pytest.mark.slow
def test_seed_reproducible_and_batch_independent(builtin_llm):
    prompts = _prompts(builtin_llm, 3)
    p = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, max_tokens=16, seed=1234, ignore_eos=True)
    alone = builtin_llm.generate([prompts[1]], p)[0].token_ids
    again = builtin_llm.generate([prompts[1]], p)[0].token_ids
    batched = builtin_llm.generate(prompts, p)[1].token_ids
    assert alone == again == batched
    other = builtin_llm.generate([prompts[1]], SamplingParams(temperature=0.9, top_p=0.95, top_k=50,
                                                              max_tokens=16, seed=99, ignore_eos=True))[0]
    assert other.token_ids != alone


def test_top_k_1_is_greedy(builtin_llm):
    prompt = _prompts(builtin_llm, 1)[0]
    greedy = builtin_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
    k1 = builtin_llm.generate([prompt], SamplingParams(temperature=1.5, top_k=1, max_tokens=10, ignore_eos=True,
                                                       seed=5))[0]
    assert k1.token_ids == greedy.token_ids


def test_stream_yields_the_same_text(builtin_llm):
    prompt = _prompts(builtin_llm, 1)[0]
    params = SamplingParams(temperature=0, max_tokens=20)
    pieces = list(builtin_llm.stream(prompt, params))
    assert len(pieces) > 3
    assert "".join(pieces) == builtin_llm.generate([prompt], params)[0].text
