"""Attention backends by name: the built-ins, loaded on first use, and any registered later.

Built-in: ``torch`` (the flash algorithm in plain PyTorch, runs anywhere), ``triton`` (Triton
prefill and decode kernels, CUDA) and ``flash-attn`` (the real package, CUDA). Loading on first
use means importing this module never imports ``flash_attn`` (slow to import, absent on CPU
machines) or ``triton``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from minillama.attention.backend import AttentionBackend, BackendError


def _load_torch() -> AttentionBackend:
    from minillama.attention import torch_ref

    return torch_ref.BACKEND


def _load_triton() -> AttentionBackend:
    from minillama.attention import triton_backend

    return triton_backend.load()


def _load_flash() -> AttentionBackend:
    from minillama.attention import flash

    return flash.load()


# Backends already built, by canonical name.
_registry: dict[str, AttentionBackend] = {}
# Built-in backends that are only built when first asked for (importing them may be slow or fail).
_lazy: dict[str, Callable[[], AttentionBackend]] = {"torch": _load_torch, "triton": _load_triton,
                                                    "flash-attn": _load_flash}


def _canonical(name: str) -> str:
    # "flash_attn", "Flash-Attn" and "flash-attn" all mean the same backend.
    return name.strip().lower().replace("_", "-")


def _known_names() -> list[str]:
    # Built-ins first, in their fixed order, then anything registered later.
    return list(_lazy) + [n for n in _registry if n not in _lazy]


def register_backend(backend: AttentionBackend) -> None:
    """Make ``backend`` available to ``get_backend`` under its name (replacing one of the same name)."""
    key = _canonical(backend.name)
    _registry[key] = backend
    # A registered backend wins over a built-in loader of the same name.
    _lazy.pop(key, None)


def get_backend(name: str) -> AttentionBackend:
    """The backend called ``name`` ("torch", "triton" or "flash-attn"), loading it on first use."""
    key = _canonical(name)
    if key in _registry:
        return _registry[key]
    if key in _lazy:
        backend = _lazy[key]()  # raises BackendError if it cannot be loaded here; nothing is cached then
        _registry[key] = backend
        return backend
    raise BackendError(f"unknown attention backend '{name}': choose one of {', '.join(_known_names())}")


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def available_backends() -> dict[str, str | None]:
    """Every known backend name -> ``None`` if it can run here, else the one-line reason why not.

    "Here" means: the backend loads, and it accepts bfloat16 heads of size 64 on this machine's
    default device (CUDA if present, else CPU).
    """
    device = _default_device()
    result: dict[str, str | None] = {}
    for name in _known_names():
        try:
            get_backend(name).check(64, torch.bfloat16, device)
        except BackendError as e:
            result[name] = str(e)
        else:
            result[name] = None
    return result
