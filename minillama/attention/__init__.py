"""Attention backends: the flash algorithm in plain PyTorch (runs anywhere), Triton kernels, and flash-attn.

All expose flash-attn 2.8's ``flash_attn_varlen_func`` / ``flash_attn_with_kvcache``
signatures; pick one with ``get_backend("torch" | "triton" | "flash-attn")``. Importing this
package imports neither ``flash_attn`` nor ``triton``.
"""

from minillama.attention.backend import AttentionBackend, BackendError
from minillama.attention.registry import available_backends, get_backend, register_backend

__all__ = ["AttentionBackend", "BackendError", "available_backends", "get_backend", "register_backend"]
