"""Overlapped steps (``async_scheduling``): launch a batch, read its tokens one step later.

On by default only on CUDA, but the bookkeeping (placeholders, EOS found one step late,
preemption of a sequence in flight) is the same on CPU, so it is forced on here and compared
token for token with the synchronous engine.
"""

from __future__ import annotations

import pytest

from minillama import LLM, SamplingParams, hooks

STOPPING = [  # chat questions the built-in model answers briefly, ending with EOS
    "What is 2 + 2? Answer with the number only.",
    "Say hello.",
    "Name one colour.",
    "Write one long paragraph about the history of tea.",
]


def chat_prompts(llm: LLM, questions: list[str]) -> list[list[int]]:
    return [llm.tokenizer.encode_chat([{"role": "user", "content": q}]) for q in questions]


def outputs(llm: LLM, prompts, params) -> list[tuple[list[int], str, str]]:
    return [(o.token_ids, o.finish_reason, o.text) for o in llm.generate(prompts, params)]


@pytest.fixture(scope="module")
def async_llm():
    return LLM(None, device="cpu", max_model_len=1024, num_kvcache_blocks=256, async_scheduling=True)


def test_eos_lengths_and_seeds_match_the_synchronous_engine(builtin_llm, async_llm):
    prompts = chat_prompts(builtin_llm, STOPPING)
    params = [SamplingParams(temperature=0, max_tokens=48), SamplingParams(temperature=0, max_tokens=5),
              SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=40),
              SamplingParams(temperature=0, max_tokens=30)]
    ref = outputs(builtin_llm, prompts, params)
    assert {r[1] for r in ref} == {"stop", "length"}, "the prompts were meant to end both ways"
    assert outputs(async_llm, prompts, params) == ref
    assert not async_llm.has_unfinished() and async_llm._pending is None, "no sequence or step left behind"


def test_steps_really_overlap(async_llm):
    seq = async_llm.add_request([5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    async_llm.step()  # prefill launched, its token not read yet
    assert async_llm._pending is not None and seq.num_pending == 1 and seq.completion_token_ids == []
    async_llm.step()  # the first decode launched; the prefill's token read meanwhile
    assert seq.num_pending == 1 and len(seq.completion_token_ids) == 1
    while async_llm.has_unfinished():
        async_llm.step()
    assert len(seq.completion_token_ids) == 6 and seq.num_pending == 0 and seq.is_finished


def test_preemption_and_chunked_prefill_with_overlap(builtin_llm):
    prompts = chat_prompts(builtin_llm, [f"Count {'slowly ' * i}from {i} to {i + 5}." for i in range(6)])
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    ref = outputs(builtin_llm, prompts, params)
    small = LLM(None, device="cpu", num_kvcache_blocks=14, kvcache_block_size=16, max_model_len=200,
                async_scheduling=True)
    assert outputs(small, prompts, params) == ref
    assert small.scheduler.num_preemptions > 0, "the cache was meant to be too small"
    small.block_manager.check_invariants([])
    chunked = LLM(None, device="cpu", max_num_batched_tokens=24, num_kvcache_blocks=128, max_model_len=512,
                  async_scheduling=True)
    assert outputs(chunked, prompts, params) == ref


def test_prefix_cache_and_stream_with_overlap(builtin_llm, async_llm):
    prompt = builtin_llm.tokenizer.encode("Steam engines drove the mills of the industrial age. " * 8)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    first = async_llm.generate([prompt], params)[0]
    second = async_llm.generate([prompt], params)[0]
    assert second.num_cached_tokens > 0 and second.token_ids == first.token_ids
    assert first.token_ids == builtin_llm.generate([prompt], params)[0].token_ids
    text = "".join(async_llm.stream("Name three fruits.", SamplingParams(temperature=0, max_tokens=24), chat=True))
    assert text == builtin_llm.generate(chat_prompts(builtin_llm, ["Name three fruits."]),
                                        SamplingParams(temperature=0, max_tokens=24))[0].text


def test_listener_attached_mid_run_finishes_the_step_in_flight(builtin_llm, async_llm):
    prompts = chat_prompts(builtin_llm, STOPPING[:2])
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    ref = outputs(builtin_llm, prompts, params)
    seqs = [async_llm.add_request(p, params) for p in prompts]
    for _ in range(3):
        async_llm.step()
    sites: list[str] = []

    def listen(site, tensor, info):
        sites.append(site)

    hooks.attach(listen)
    try:
        batch, _ = async_llm.step()  # only collects the step in flight: no forward pass
        assert not batch.seqs and async_llm._pending is None and not sites
        async_llm.step()  # now a synchronous step, seen by the listener
        assert "step.begin" in sites and all(s.num_pending == 0 for s in seqs)
    finally:
        hooks.detach(listen)
    while async_llm.has_unfinished():
        async_llm.step()
    assert [s.completion_token_ids for s in seqs] == [r[0] for r in ref]


def test_chunked_prompt_blocks_are_shared_as_in_synchronous_steps(tiny_llama_dir):
    """Blocks of a prompt split over several steps become shareable when launched, not only once a
    token is read back: a second copy admitted while the first is still in prefill reuses them."""
    prompt = [(7 * i) % 500 + 4 for i in range(66)]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    reused = {}
    for overlap in (False, True):
        llm = LLM(tiny_llama_dir, device="cpu", kvcache_block_size=8, max_num_batched_tokens=24,
                  num_kvcache_blocks=64, max_model_len=256, async_scheduling=overlap)
        first, second = llm.generate([prompt, prompt], params)
        assert second.token_ids == first.token_ids
        reused[overlap] = second.num_cached_tokens
        llm.block_manager.check_invariants([])
    assert reused[True] == reused[False] > 0
