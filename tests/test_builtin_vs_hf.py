"""The built-in model answers token for token like transformers' LlamaForCausalLM on the same GGUF."""

from __future__ import annotations

import pytest
import torch

from minillama import SamplingParams

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a KV cache is in one paragraph.",
    "List three prime numbers and say why they are prime.",
]
NEW_TOKENS = 64


def _hf_greedy(hf, prompt_ids: list[int], n: int) -> list[int]:
    model, _ = hf
    ids = torch.tensor([prompt_ids])
    # attention_mask explicitly: id 2 (<|im_end|>) is also the GGUF's pad id and would be masked
    # eos_token_id=None: keep going past <|im_end|> like ignore_eos (min_new_tokens would instead forbid EOS)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    tokens = out[0, len(prompt_ids):].tolist()
    assert len(tokens) == n
    return tokens


@pytest.fixture(scope="module")
def chat_prompts(builtin_llm):
    return [builtin_llm.tokenizer.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]


@pytest.fixture(scope="module")
def hf_tokens(hf_builtin, chat_prompts):
    return [_hf_greedy(hf_builtin, p, NEW_TOKENS) for p in chat_prompts]


def test_chat_prompt_matches_hf_template(builtin_llm, hf_builtin_tokenizer, chat_prompts):
    tok = hf_builtin_tokenizer
    for q, ids in zip(QUESTIONS, chat_prompts, strict=True):
        ref = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
        ref = ref["input_ids"] if isinstance(ref, dict) or hasattr(ref, "keys") else ref
        assert ids == list(ref)


@pytest.mark.slow
def test_greedy_tokens_equal_transformers(builtin_llm, chat_prompts, hf_tokens):
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = builtin_llm.generate(chat_prompts, params)
    for out, ref in zip(outs, hf_tokens, strict=True):
        assert out.token_ids == ref
        assert out.finish_reason == "length"


@pytest.mark.slow
def test_first_logits_close_to_transformers(builtin_llm, hf_builtin, chat_prompts):
    model, _ = hf_builtin
    ids = chat_prompts[0]
    ours = builtin_llm.prompt_logits(ids)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].float()
    assert (ours - ref).abs().max().item() < 1e-3


@pytest.mark.slow
def test_batch_of_16_equals_each_alone(builtin_llm):
    tok = builtin_llm.tokenizer
    topics = ["cats", "rain", "Rome", "music", "trees", "rivers", "bread", "chess", "the moon", "glass",
              "salt", "clocks", "bees", "winter", "maps", "paper"]
    prompts = [tok.encode_chat([{"role": "user", "content": f"Tell me {'a lot ' * (i % 5)}about {t}."}])
               for i, t in enumerate(topics)]
    assert len({len(p) for p in prompts}) >= 5
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    together = builtin_llm.generate(prompts, params)
    for p, out in zip(prompts, together, strict=True):
        alone = builtin_llm.generate([p], params)[0]
        assert out.token_ids == alone.token_ids


def test_chat_answer_is_sensible(builtin_llm):
    out = builtin_llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                           SamplingParams(temperature=0, max_tokens=32))[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop" and out.token_ids[-1] in builtin_llm.model_config.eos_token_ids
