"""One dataclass of engine settings."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Config:
    """Engine settings. ``model=None`` means the built-in SmolLM2-135M-Instruct."""

    model: str | None = None
    backend: str = "torch"
    device: str = "auto"  # "auto" = cuda when available, else cpu
    dtype: str = "auto"  # "auto" = float32 on cpu, bfloat16 on cuda
    max_model_len: int = 4096
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 4096
    kvcache_block_size: int = 0  # 0 = 256 on cuda or with flash-attn, else 16
    num_kvcache_blocks: int = 0  # 0 = sized from memory
    cpu_kvcache_bytes: int = 512 << 20  # KV budget on cpu when num_kvcache_blocks == 0
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = False
    async_scheduling: bool | None = None  # overlap host work with the GPU's step; None = on for CUDA
    enable_prefix_caching: bool = True
    # each request's rows independent of the rest of the batch and of chunking (slower; layers/batch_invariant.py)
    batch_invariant: bool = False
