"""Attention backends: a pure-PyTorch one that runs anywhere and an adapter for flash-attn.

Both expose flash-attn 2.8's ``flash_attn_varlen_func`` / ``flash_attn_with_kvcache``
signatures; pick one with ``get_backend("torch" | "flash-attn")``. Importing this package does
not import ``flash_attn``.
"""

from minillama.attention.backend import (
    AttentionBackend,
    BackendError,
    available_backends,
    get_backend,
    register_backend,
)

__all__ = ["AttentionBackend", "BackendError", "available_backends", "get_backend", "register_backend"]
