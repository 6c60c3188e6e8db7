"""Overlapped steps (``async_scheduling``): launch a batch, read its tokens one step later.

On by default only on CUDA, but the bookkeeping (placeholders, EOS found one step late,
preemption of a sequence in flight, chunked prefill, prefix caching) is the same on CPU, so it is
forced on here and compared token for token with the synchronous engine. The tiny random Llama
keeps this cheap; its "EOS" is set to a token the greedy answers really produce, so requests end
both ways (stop and length) exactly as with a real model. One slow test repeats the comparison
on the built-in model, whose answers end on their own.
"""

from __future__ import annotations

import pytest

from minillama import LLM, SamplingParams, hooks

PROMPTS = [[(7 * i + 13 * k) % 500 + 4 for i in range(5 + 9 * k)] for k in range(6)]  # 5 to 50 tokens


def tiny_engine(path: str, overlap: bool, **kw) -> LLM:
    kw = {"kvcache_block_size": 8, "num_kvcache_blocks": 128, "max_model_len": 256, **kw}
    return LLM(path, device="cpu", async_scheduling=overlap, **kw)


def outputs(llm: LLM, prompts, params) -> list[tuple[list[int], str]]:
    return [(o.token_ids, o.finish_reason) for o in llm.generate(prompts, params)]


@pytest.fixture(scope="module")
def pair(tiny_llama_dir):
    """A synchronous and an overlapped engine on the tiny model, with an EOS the answers reach."""
    sync, overlapped = tiny_engine(tiny_llama_dir, False), tiny_engine(tiny_llama_dir, True)
    probe = sync.generate(PROMPTS[:4], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    eos = probe[0].token_ids[3]  # the 4th answer token of the first prompt: it stops there (or earlier)
    for llm in (sync, overlapped):
        llm.scheduler.eos_token_ids = {eos}
    return sync, overlapped


def test_eos_lengths_and_seeds_match_the_synchronous_engine(pair):
    sync, overlapped = pair
    params = [SamplingParams(temperature=0, max_tokens=12), SamplingParams(temperature=0, max_tokens=2),
              SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=10),
              SamplingParams(temperature=0, max_tokens=9)]
    ref = outputs(sync, PROMPTS[:4], params)
    assert {r[1] for r in ref} == {"stop", "length"}, "the requests were meant to end both ways"
    assert outputs(overlapped, PROMPTS[:4], params) == ref
    assert not overlapped.has_unfinished() and overlapped._pending is None, "no sequence or step left behind"


def test_steps_really_overlap(pair):
    _, overlapped = pair
    seq = overlapped.add_request([5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    overlapped.step()  # prefill launched, its token not read yet
    assert overlapped._pending is not None and seq.num_pending == 1 and seq.completion_token_ids == []
    overlapped.step()  # the first decode launched; the prefill's token read meanwhile
    assert seq.num_pending == 1 and len(seq.completion_token_ids) == 1
    while overlapped.has_unfinished():
        overlapped.step()
    assert len(seq.completion_token_ids) == 6 and seq.num_pending == 0 and seq.is_finished


def test_preemption_and_chunked_prefill_with_overlap(tiny_llama_dir, pair):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    ref = outputs(pair[0], PROMPTS, params)
    small = tiny_engine(tiny_llama_dir, True, num_kvcache_blocks=12, max_model_len=96)
    assert outputs(small, PROMPTS, params) == ref
    assert small.scheduler.num_preemptions > 0, "the cache was meant to be too small"
    small.block_manager.check_invariants([])
    chunked = tiny_engine(tiny_llama_dir, True, max_num_batched_tokens=12)
    assert outputs(chunked, PROMPTS, params) == ref


def test_prefix_cache_and_stream_with_overlap(pair):
    sync, overlapped = pair
    prompt = PROMPTS[5]  # 50 tokens: several full blocks of 8
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    first = overlapped.generate([prompt], params)[0]
    second = overlapped.generate([prompt], params)[0]
    assert second.num_cached_tokens >= 40 and second.token_ids == first.token_ids
    assert first.token_ids == sync.generate([prompt], params)[0].token_ids
    text = "".join(overlapped.stream(PROMPTS[2], params))
    assert text and text == sync.generate([PROMPTS[2]], params)[0].text


def test_listener_attached_mid_run_finishes_the_step_in_flight(pair):
    sync, overlapped = pair
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    ref = outputs(sync, PROMPTS[:2], params)
    seqs = [overlapped.add_request(p, params) for p in PROMPTS[:2]]
    for _ in range(3):
        overlapped.step()
    sites: list[str] = []

    def listen(site, tensor, info):
        sites.append(site)

    hooks.attach(listen)
    try:
        batch, _ = overlapped.step()  # only collects the step in flight: no forward pass
        assert not batch.seqs and overlapped._pending is None and not sites
        overlapped.step()  # now a synchronous step, seen by the listener
        assert "step.begin" in sites and all(s.num_pending == 0 for s in seqs)
    finally:
        hooks.detach(listen)
    while overlapped.has_unfinished():
        overlapped.step()
    assert [s.completion_token_ids for s in seqs] == [r[0] for r in ref]


def test_chunked_prompt_blocks_are_shared_as_in_synchronous_steps(tiny_llama_dir):
    """Blocks of a prompt split over several steps become shareable when launched, not only once a
    token is read back: a second copy admitted while the first is still in prefill reuses them."""
    prompt = [(7 * i) % 500 + 4 for i in range(66)]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    reused = {}
    for overlap in (False, True):
        llm = tiny_engine(tiny_llama_dir, overlap, max_num_batched_tokens=24, num_kvcache_blocks=64)
        first, second = llm.generate([prompt, prompt], params)
        assert second.token_ids == first.token_ids
        reused[overlap] = second.num_cached_tokens
        llm.block_manager.check_invariants([])
    assert reused[True] == reused[False] > 0


@pytest.mark.slow
def test_builtin_model_answers_end_the_same_with_overlap(builtin_llm):
    """The real model stops on its own EOS; overlapped steps find it one step late and drop the extra token."""
    prompts = [builtin_llm.tokenizer.encode_chat([{"role": "user", "content": q}])
               for q in ("What is 2 + 2? Answer with the number only.", "Name one colour.")]
    params = [SamplingParams(temperature=0, max_tokens=12), SamplingParams(temperature=0, max_tokens=3)]
    ref = outputs(builtin_llm, prompts, params)
    assert [r[1] for r in ref] == ["stop", "length"], "the answers were meant to end both ways"
    overlapped = LLM(None, device="cpu", max_model_len=256, num_kvcache_blocks=64, async_scheduling=True)
    assert outputs(overlapped, prompts, params) == ref


@pytest.mark.parametrize("overlap", [False, True])
def test_a_step_on_an_idle_engine_runs_nothing(pair, overlap):
    """``step()`` with no request (a loop that steps once too often, a UI's "step" on an idle engine)
    returns an empty batch: no forward pass, no step counted, no hook event (it used to raise
    ValueError from the decode preparation in the synchronous engine)."""
    sync, overlapped = pair
    llm = overlapped if overlap else sync
    llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert not llm.has_unfinished()
    seen = []
    listener = lambda site, tensor, info: seen.append(site)  # noqa: E731
    listener.hook_mode = "device"
    steps = llm.num_steps
    hooks.attach(listener)
    try:
        for _ in range(3):
            batch, finished = llm.step()
            assert not batch.seqs and finished == []
    finally:
        hooks.detach(listener)
    assert llm.num_steps == steps and seen == []
    out = llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert len(out[0].token_ids) == 3


class _StepEvents:
    """A device listener that notes the step events and the batch each step began with."""

    hook_mode = "device"

    def __init__(self) -> None:
        self.events: dict[str, list[int]] = {hooks.STEP_BEGIN: [], hooks.STEP_LAUNCHED: [], hooks.STEP_END: []}
        self.begun: dict[int, tuple[int, int]] = {}  # step -> (seqs, preempted)

    def __call__(self, site, tensor, info) -> None:
        if site in self.events:
            self.events[site].append(info["step"])
        if site == hooks.STEP_BEGIN:
            self.begun[info["step"]] = (len(info["batch"].seqs), len(info["batch"].preempted))


@pytest.mark.parametrize("overlap", [False, True])
def test_every_announced_step_ends(tiny_llama_dir, pair, overlap):
    """Each step.begin gets its step.launched and step.end, once, in order; a step is announced only
    if it computes something or preempts. Overlapped steps end with a call whose batch is empty
    (the last tokens are in flight): that call finishes them and announces nothing. Memory is tight
    here, so requests are preempted too; the tokens equal the roomy synchronous engine's."""
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    ref = outputs(pair[0], PROMPTS, params)
    small = tiny_engine(tiny_llama_dir, overlap, num_kvcache_blocks=12, max_model_len=96)
    spy = _StepEvents()
    hooks.attach(spy)
    try:
        got = outputs(small, PROMPTS, params)
    finally:
        hooks.detach(spy)
    assert got == ref and small.scheduler.num_preemptions > 0
    began, launched, ended = (spy.events[k] for k in (hooks.STEP_BEGIN, hooks.STEP_LAUNCHED, hooks.STEP_END))
    assert began == sorted(set(began)) and sorted(launched) == began and sorted(ended) == began
    assert len(began) == small.num_steps
    assert all(seqs or preempted for seqs, preempted in spy.begun.values())
