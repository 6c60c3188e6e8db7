"""A tiny random Llama-3-style model (GQA, llama3 rope scaling, untied) against transformers."""

from __future__ import annotations

import pytest
import torch

from minillama import LLM, SamplingParams


@pytest.fixture(scope="module")
def hf_tiny(tiny_llama_dir):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return LLM(tiny_llama_dir, device="cpu", kvcache_block_size=16, num_kvcache_blocks=64, max_model_len=512)


def test_config_read(tiny):
    c = tiny.model_config
    assert c.rope_scaling["rope_type"] == "llama3" and c.rope_scaling["original_max_position_embeddings"] == 32
    assert c.num_key_value_heads == 2 and not c.tie_word_embeddings
    assert set(c.eos_token_ids) == {2, 3}


def test_logits_match_transformers_past_original_context(tiny, hf_tiny):
    torch.manual_seed(1)
    ids = torch.randint(4, 512, (200,)).tolist()  # 200 positions >> original_max_position_embeddings = 32
    ours = tiny.prompt_logits(ids)
    with torch.no_grad():
        ref = hf_tiny(torch.tensor([ids])).logits[0]
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() < 1e-4


def test_scaling_matters(tiny_llama_dir, tmp_path):
    """The same weights without rope scaling give different logits: the test above really checks scaling."""
    import json
    import shutil

    other = tmp_path / "noscale"
    shutil.copytree(tiny_llama_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg.pop("rope_scaling", None)
    if isinstance(cfg.get("rope_parameters"), dict):
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg["rope_parameters"].get("rope_theta", 10000.0)}
    (other / "config.json").write_text(json.dumps(cfg))
    plain = LLM(str(other), device="cpu", num_kvcache_blocks=64, max_model_len=512)
    scaled = LLM(tiny_llama_dir, device="cpu", num_kvcache_blocks=64, max_model_len=512)
    ids = list(range(4, 204))
    assert (plain.prompt_logits(ids) - scaled.prompt_logits(ids)).abs().max().item() > 1e-3


def test_greedy_decode_matches_transformers(tiny, hf_tiny):
    ids = list(range(10, 60))
    out = tiny.generate([ids], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0]
    with torch.no_grad():
        t = torch.tensor([ids])
        ref = hf_tiny.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=40, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    assert out.token_ids == ref


def test_tied_embeddings(tmp_path):
    from transformers import LlamaForCausalLM

    from tests.conftest import make_tiny_llama

    path = make_tiny_llama(str(tmp_path / "tied"), tie=True, seed=3)
    ours = LLM(path, device="cpu", num_kvcache_blocks=32, max_model_len=512)
    ref = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = list(range(5, 70))
    with torch.no_grad():
        r = ref(torch.tensor([ids])).logits[0]
    assert (ours.prompt_logits(ids) - r).abs().max().item() < 1e-4


def test_several_eos_ids_stop(tiny):
    # force an EOS: whichever id greedy picks first becomes an EOS of a copy of the params
    ids = list(range(100, 120))
    first = tiny.generate([ids], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))[0].token_ids[0]
    old = tiny.scheduler.eos_token_ids
    tiny.scheduler.eos_token_ids = {2, first}
    try:
        out = tiny.generate([ids], SamplingParams(temperature=0, max_tokens=10))[0]
    finally:
        tiny.scheduler.eos_token_ids = old
    assert out.finish_reason == "stop" and out.token_ids == [first]
