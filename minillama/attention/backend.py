"""The attention-backend interface and its registry.

A backend is two functions with exactly the signatures of flash-attn 2.8's
``flash_attn_varlen_func`` (prefill: ragged batches of queries, keys flat or in a paged cache)
and ``flash_attn_with_kvcache`` (decode: fixed ``seqlen_q`` per sequence, optional in-place
append of the new keys/values), plus what the engine must know to use them: the paged-KV block
size granularity, a ``check`` of head size / dtype / device, whether its prefill pads queries,
and how large a decode batch it replays CUDA graphs for. The engine reads these attributes and
never a backend's name.

Built-in: ``torch`` (the flash algorithm in plain PyTorch, runs anywhere), ``triton`` (Triton
prefill and decode kernels, CUDA) and ``flash-attn`` (the real package, CUDA).

Built-in backends are loaded on first use, so importing this module never imports
``flash_attn`` (which is slow to import and absent on CPU machines).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch


class BackendError(ValueError):
    """A backend cannot be used as asked. The message names the problem and the fix on one line."""


@dataclass(frozen=True)
class AttentionBackend:
    """One attention implementation with flash-attn's calling convention."""

    name: str
    varlen: Callable  # same signature as flash_attn.flash_attn_varlen_func
    with_kvcache: Callable  # same signature as flash_attn.flash_attn_with_kvcache
    block_size_multiple: int  # paged-KV block size must be a multiple of this
    # Entered by the model runner around each forward pass (all layers see the same step metadata).
    forward_scope: Callable[[], AbstractContextManager[None]] = contextlib.nullcontext
    # The prefill pads every sequence's queries to the batch's longest: an engine on a GPU then
    # runs the decodes of a batch that mixes them with prompt chunks as a pass of their own.
    pads_queries: bool = False
    # Decode graphs read block tables at full width. A backend whose decode work grows with that
    # width (not with the keys each sequence has) caps batch size x width keys here; None: no cap.
    graph_keys: int | None = None

    def graph_decode_max_batch(self, max_keys: int) -> int:
        """The largest decode batch to replay CUDA graphs for, when the graphs' block tables hold
        ``max_keys`` keys per sequence (at least 1)."""
        if self.graph_keys is None:
            return 1 << 30
        return max(1, self.graph_keys // max(1, max_keys))

    def check(self, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        """Raise ``BackendError`` if this backend cannot run heads of ``head_dim`` in ``dtype`` on ``device``.

        The base check only rejects what no attention can do; backends with narrower
        support (flash-attn) override it.
        """
        if head_dim <= 0:
            raise BackendError(f"attention backend '{self.name}': head_dim must be positive, got {head_dim}")
        if not dtype.is_floating_point:
            raise BackendError(
                f"attention backend '{self.name}' needs a floating-point dtype, got {dtype}: "
                "use --dtype float32 or bfloat16"
            )


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
