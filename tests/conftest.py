"""Shared fixtures: the built-in model (loaded once), its transformers twin, tiny random models."""

from __future__ import annotations

import json
import os

import pytest
import torch

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

from tests.tui_alias import ensure_minillama_tui  # noqa: E402

ensure_minillama_tui()  # the debugger installs as minillama_tui; a bare checkout run loads tui/ under that name


@pytest.fixture(scope="session")
def builtin_path() -> str:
    from minillama.models.loader import builtin_model_path

    return builtin_model_path()


@pytest.fixture(scope="session")
def builtin_llm():
    """The built-in model on CPU, float32, torch backend (shared: tests must leave it idle)."""
    from minillama import LLM

    return LLM(None, device="cpu", max_model_len=2048, num_kvcache_blocks=1024)


@pytest.fixture(scope="session")
def hf_builtin_tokenizer(builtin_path):
    """transformers' tokenizer read from the built-in GGUF (seconds, where the model twin takes a minute)."""
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    folder, name = os.path.split(builtin_path)
    return AutoTokenizer.from_pretrained(folder, gguf_file=name)


@pytest.fixture(scope="session")
def hf_builtin(builtin_path, hf_builtin_tokenizer):
    """transformers' LlamaForCausalLM and tokenizer loaded from the same GGUF (the independent reference)."""
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    folder, name = os.path.split(builtin_path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return model, hf_builtin_tokenizer


def make_tiny_llama(path: str, *, seed: int = 0, tie: bool = False, **overrides) -> str:
    """Save a random Llama-3-style model (GQA, llama3 rope scaling) with transformers; returns the folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    cfg = dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=8,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32},
        tie_word_embeddings=tie, bos_token_id=1, eos_token_id=[2, 3],
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).float().eval()
    model.save_pretrained(path, safe_serialization=True)
    # a word-level tokenizer over a made-up vocabulary keeps the folder complete and offline
    vocab = {f"w{i}": i for i in range(cfg["vocab_size"])}
    vocab.update({"<unk>": 0, "<s>": 1, "</s>": 2})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
    fast.save_pretrained(path)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": [2, 3]}, f)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> str:
    return make_tiny_llama(str(tmp_path_factory.mktemp("tiny_llama")))
