"""One dataclass of engine settings, checked when it is built (before any model is loaded)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from minillama.models.config import ModelConfig
from minillama.options import OptionError, check_backend, check_device, check_dtype


def _check_int(name: str, value: object, low: int, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionError(f"{name} must be an integer, got {value!r}: {hint}")
    if value < low:
        raise OptionError(f"{name} must be >= {low}, got {value}: {hint}")


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

    def __post_init__(self) -> None:
        if not (self.model is None or isinstance(self.model, str | os.PathLike | ModelConfig)):
            raise OptionError(f"model must be a path, None (the built-in model) or a ModelConfig, got {self.model!r}")
        check_backend(self.backend, builtin_only=False)  # the registry may hold more; get_backend decides
        if type(self.device).__name__ == "device":  # a torch.device: its name says the same
            self.device = str(self.device)
        self.device = check_device(self.device)
        check_dtype(self.dtype)
        _check_int("max_model_len", self.max_model_len, 1, "give the longest prompt + answer in tokens, e.g. 4096")
        _check_int("max_num_seqs", self.max_num_seqs, 1, "allow at least one sequence per step")
        _check_int("max_num_batched_tokens", self.max_num_batched_tokens, 1,
                   "a step needs a budget of at least one token, e.g. 4096")
        _check_int("kvcache_block_size", self.kvcache_block_size, 0, "use 0 for the default, or e.g. 16")
        _check_int("num_kvcache_blocks", self.num_kvcache_blocks, 0, "use 0 to size the cache from memory")
        _check_int("cpu_kvcache_bytes", self.cpu_kvcache_bytes, 1, "give the CPU KV cache a budget in bytes")
        u = self.gpu_memory_utilization
        if isinstance(u, bool) or not isinstance(u, int | float) or not 0 < u <= 1:
            raise OptionError(f"gpu_memory_utilization must be in (0, 1], got {u!r}: e.g. 0.9")
        for name in ("enforce_eager", "enable_prefix_caching"):
            if not isinstance(getattr(self, name), bool):
                raise OptionError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not (self.async_scheduling is None or isinstance(self.async_scheduling, bool)):
            raise OptionError(f"async_scheduling must be None, True or False, got {self.async_scheduling!r}")
