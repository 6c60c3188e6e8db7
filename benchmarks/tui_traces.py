"""Large traces for bench_tui, recorded by the real engine on the CPU (no GPU, no download).

* ``1 GB``: a random 8-layer Llama of width 512 (``LLM(ModelConfig)``), 16 requests of 600 prompt tokens
  and 64 generated, every site kept in full.
* ``256 requests``: the tiny test model, 256 requests in one batch, shadow torch, attention kept in full.
* ``1,000 steps``: the tiny test model, two requests generating 1,000 tokens each, shadow torch.

Each is made once under the cache folder (``.done`` marks a finished one) and reused by later runs.
"""

from __future__ import annotations

import os
import shutil
import time


def _record(path: str, build) -> str:
    if os.path.isfile(os.path.join(path, ".done")):
        return path
    shutil.rmtree(path, ignore_errors=True)
    t0 = time.perf_counter()
    build(path)
    with open(os.path.join(path, ".done"), "w") as f:
        f.write(f"{time.perf_counter() - t0:.1f} s\n")
    print(f"recorded {path} in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


def _big(path: str) -> None:
    from minillama import LLM
    from minillama.models.config import ModelConfig
    from tests.traces import record_trace

    cfg = ModelConfig(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                      intermediate_size=1024, vocab_size=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                      rope_scaling=None, max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=1,
                      eos_token_ids=[2])
    llm = LLM(cfg, device="cpu", num_kvcache_blocks=1024, max_model_len=1024, max_num_batched_tokens=2048)
    prompts = [[(7 * i + j) % 4000 + 10 for j in range(600)] for i in range(16)]
    record_trace(path, None, prompts, full=("*",), max_tokens=64, llm=llm)


def _wide(path: str, model: str) -> None:
    from tests.traces import record_trace

    prompts = [[(5 * i + j) % 500 + 5 for j in range(24)] for i in range(256)]
    record_trace(path, model, prompts, shadow="torch", full=("layers.*.attn.*",), max_tokens=16, max_num_seqs=256,
                 max_num_batched_tokens=2048, num_kvcache_blocks=1024, max_model_len=256)


def _long(path: str, model: str) -> None:
    from tests.traces import record_trace

    record_trace(path, model, [[5, 6, 7, 8, 9, 10, 11], [40, 41, 42, 43]], shadow="torch", max_tokens=1000,
                 max_model_len=2048, num_kvcache_blocks=256)


def make_traces(cache: str) -> dict[str, str]:
    """Record (or reuse) the three traces under ``cache``; returns {description: path}."""
    import torch

    from tests.conftest import make_tiny_llama

    os.makedirs(cache, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small models: one thread is several times faster on a shared machine
    try:
        model = os.path.join(cache, "tiny-2k")
        if not os.path.isfile(os.path.join(model, "config.json")):
            make_tiny_llama(model, max_position_embeddings=2048)
        out = {"1 GB trace, every site in full": _record(os.path.join(cache, "big"), _big),
               "256-request recording": _record(os.path.join(cache, "wide"), lambda p: _wide(p, model)),
               "1,000-step recording": _record(os.path.join(cache, "long"), lambda p: _long(p, model))}
    finally:
        torch.set_num_threads(threads)
    return out
