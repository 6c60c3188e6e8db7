"""Bad requests and settings: refused when built, or failing alone inside a step, never poisoning an LLM."""

from __future__ import annotations

import math

import pytest

from minillama import LLM, SamplingParams
from minillama.config import Config
from minillama.engine.llm_engine import RequestError
from minillama.models.errors import ChatFormatError
from minillama.options import OptionError
from minillama.sampling_params import SamplingParamsError

GOOD = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


@pytest.mark.parametrize("kw", [
    {"seed": 2**63}, {"seed": "abc"}, {"seed": -1}, {"seed": 1.5}, {"top_k": 2**63}, {"top_k": -1},
    {"top_k": "5"}, {"temperature": math.nan}, {"temperature": math.inf}, {"temperature": -0.1},
    {"temperature": "0.7"}, {"top_p": 0}, {"top_p": 1.5}, {"top_p": math.nan}, {"max_tokens": 0},
    {"max_tokens": True}, {"max_tokens": 2.5}, {"ignore_eos": "yes"},
])
def test_sampling_params_refuse_bad_values(kw):
    with pytest.raises(SamplingParamsError) as err:
        SamplingParams(**kw)
    assert "\n" not in str(err.value) and next(iter(kw)) in str(err.value)


def test_sampling_params_accept_and_normalise_good_values():
    import numpy as np

    p = SamplingParams(temperature=np.float32(0.5), top_k=np.int64(5), seed=2**63 - 1, top_p=1)
    assert (type(p.temperature), type(p.top_k), type(p.top_p), p.seed) == (float, int, float, 2**63 - 1)


@pytest.mark.parametrize("kw", [
    {"max_num_batched_tokens": 0}, {"max_model_len": -5}, {"device": "gpu"}, {"dtype": "float8"},
    {"gpu_memory_utilization": 0}, {"num_kvcache_blocks": -1}, {"max_num_seqs": 0}, {"enforce_eager": "no"},
    {"model": 3}, {"backend": None}, {"async_scheduling": 1},
])
def test_engine_settings_refused_before_loading(kw):
    with pytest.raises(OptionError):
        Config(**kw)


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return LLM(tiny_llama_dir, device="cpu", kvcache_block_size=8, num_kvcache_blocks=32, max_model_len=128)


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("field,value", [("seed", 2**64), ("seed", "abc"), ("top_k", 2**63), ("top_k", "5")])
def test_request_broken_after_queueing_fails_alone(tiny_llama_dir, overlap, field, value):
    """A request whose params are broken after ``add_request`` fails in the step: alone, with its blocks freed."""
    llm = LLM(tiny_llama_dir, device="cpu", kvcache_block_size=8, num_kvcache_blocks=32, max_model_len=128,
              async_scheduling=overlap)
    clean = llm.generate([[5, 6, 7], [8, 9, 10, 11]], GOOD)
    free = llm.block_manager.num_free_blocks
    bad = SamplingParams(temperature=0.7, seed=1, max_tokens=4)
    seqs = [llm.add_request([5, 6, 7], GOOD), llm.add_request([1, 2, 3], bad), llm.add_request([8, 9, 10, 11], GOOD)]
    setattr(bad, field, value)
    while llm.has_unfinished():
        llm.step()
    assert seqs[1].finish_reason == "error" and field in seqs[1].error
    assert [s.completion_token_ids for s in (seqs[0], seqs[2])] == [o.token_ids for o in clean]
    assert not llm.scheduler.running and llm.block_manager.num_free_blocks == free
    llm.block_manager.check_invariants([])
    again = llm.generate([[5, 6, 7], [8, 9, 10, 11]], GOOD)  # the engine is still usable
    assert [o.token_ids for o in again] == [o.token_ids for o in clean]


def test_step_error_no_check_explains_fails_only_its_request(tiny, monkeypatch):
    """A failure validation cannot attribute: each request runs alone, and only the one that raises fails."""
    clean = tiny.generate([[5, 6, 7], [8, 9, 10, 11]], GOOD)
    seqs = [tiny.add_request([5, 6, 7], GOOD), tiny.add_request([1, 2, 3], GOOD),
            tiny.add_request([8, 9, 10, 11], GOOD)]
    real = tiny.runner.sample

    def sample(logits, batch_seqs):
        if any(s is seqs[1] for s in batch_seqs):
            raise RuntimeError("CUDA error: an illegal memory access\nstack trace follows")
        return real(logits, batch_seqs)

    monkeypatch.setattr(tiny.runner, "sample", sample)
    while tiny.has_unfinished():
        tiny.step()
    assert seqs[1].finish_reason == "error" and seqs[1].error == "RuntimeError: CUDA error: an illegal memory access"
    assert [s.completion_token_ids for s in (seqs[0], seqs[2])] == [o.token_ids for o in clean]
    out = tiny._output(seqs[1])
    assert out.finish_reason == "error" and out.error == seqs[1].error
    monkeypatch.setattr(tiny.runner, "sample", real)
    tiny.block_manager.check_invariants([])
    with pytest.raises(RequestError, match="the request failed"):  # a stream of a failed request says so
        monkeypatch.setattr(tiny.runner, "sample", lambda logits, s: (_ for _ in ()).throw(ValueError("boom")))
        list(tiny.stream([5, 6, 7], GOOD))
    monkeypatch.setattr(tiny.runner, "sample", real)
    assert tiny.generate([[5, 6, 7]], GOOD)[0].token_ids == clean[0].token_ids


@pytest.mark.parametrize("params", [{"temperature": 0}, "greedy", [GOOD, GOOD]])
def test_sampling_params_of_the_wrong_kind_are_refused(tiny, params):
    with pytest.raises(RequestError):
        tiny.generate([[5, 6, 7]], params)
    assert tiny.scheduler.is_finished()  # nothing was queued


@pytest.mark.parametrize("prompt", ["caf\udce9", b"w1 w2", [1, "2"], [1.5], 7])
def test_prompts_that_are_neither_text_nor_ids_are_refused(tiny, prompt):
    with pytest.raises(RequestError):
        tiny.add_request(prompt, GOOD)


def test_request_larger_than_the_whole_cache_is_refused_up_front(tiny_llama_dir):
    llm = LLM(tiny_llama_dir, device="cpu", kvcache_block_size=8, num_kvcache_blocks=8, max_model_len=256)
    with pytest.raises(RequestError, match="needs 13 KV blocks"):  # 8 blocks of 8 tokens < 4 + 100
        llm.add_request([5, 6, 7, 8], SamplingParams(max_tokens=100, temperature=0))
    assert llm.scheduler.is_finished() and llm.generate([[5, 6]], GOOD)[0].finish_reason == "length"


@pytest.mark.parametrize("messages", [[{"role": "wizard", "content": "hi"}], [{"role": "user"}], ["hi"], []])
def test_chat_messages_are_checked(tiny, messages):
    with pytest.raises(ChatFormatError) as err:
        tiny.tokenizer.encode_chat(messages)
    assert "\n" not in str(err.value)
