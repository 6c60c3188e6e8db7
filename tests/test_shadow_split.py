"""A shadow backend that pads queries runs a mixed call's decodes and prompt chunks as two calls (as
the engine splits such batches when no debugger listens); the two must give the one call's output."""

from __future__ import annotations

import pytest
import torch

from minillama import LLM, SamplingParams, hooks
from minillama.context import get_context
from minillama.debug.shadow import Shadow
from minillama.layers.attention import run_attention


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(tiny_llama_dir, device="cpu", kvcache_block_size=8, num_kvcache_blocks=128, max_model_len=256,
               max_num_batched_tokens=64)


def test_split_mixed_call_equals_the_whole_call(llm):
    cfg = llm.model_config
    shadow = Shadow("torch", torch.device("cpu"), torch.float32, cfg.head_dim, active="flash-attn")
    assert not shadow.split_mixed  # only on a GPU, where the queries are padded
    shadow.split_mixed = True
    checked = []

    def listener(site, tensor, info):
        ctx = get_context()
        if not site.endswith("attn.call") or not ctx.is_prefill:
            return
        call = info["call"]
        split = shadow._split(call)
        if 1 in ctx.query_lens and max(ctx.query_lens) > 1:
            assert split is not None
            whole = run_attention(shadow.backend, call.q, call.k, call.v, call.k_cache, call.v_cache, ctx, call.scale)
            torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(split, tensor, rtol=1e-5, atol=1e-6)  # and the active call's
            checked.append(ctx.query_lens)
        else:
            assert split is None  # not mixed: one call

    listener.hook_mode = "eager"
    hooks.attach(listener)
    try:
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        llm.add_request(list(range(5, 25)), params)
        llm.step()
        for n in (30, 41):  # two prompts join the decoding one: a mixed step, with a chunk (64-token budget)
            llm.add_request([(7 * i) % 300 + 4 for i in range(n)], params)
        while llm.has_unfinished():
            llm.step()
    finally:
        hooks.detach(listener)
    assert checked and all(1 in q for q in checked), checked


def test_no_split_when_the_shadow_is_the_active_backend():
    """The same backend as shadow must redo the very same call (a bit-for-bit check of the engine)."""
    s = Shadow("torch", torch.device("cuda"), torch.float32, 64, active="torch") if torch.cuda.is_available() \
        else Shadow("torch", torch.device("cpu"), torch.float32, 64, active="torch")
    assert not s.split_mixed
