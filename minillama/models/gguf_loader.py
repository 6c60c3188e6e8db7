"""Load a Llama model from a GGUF file (llama.cpp's format) into Hugging Face names and shapes.

The work is split by stage: ``gguf_file`` parses and bounds-checks the header, ``gguf_metadata``
turns the metadata into a ``ModelConfig`` and tokenizer data, ``gguf_tensors`` dequantizes the
tensors under their Hugging Face names. This module is the public entry point.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch

from minillama.models.config import ModelConfig
from minillama.models.gguf_file import _open_gguf
from minillama.models.gguf_metadata import GGUFTokenizerData, _build, _check_holds
from minillama.models.gguf_tensors import GGUFWeights, _iter_tensors, gguf_to_hf_name

__all__ = [
    "GGUFTokenizerData",
    "load_gguf",
    "load_gguf_metadata",
    "open_gguf",
    "GGUFWeights",
    "iter_gguf_tensors",
    "gguf_to_hf_name",
]


def load_gguf_metadata(path: str | os.PathLike) -> tuple[ModelConfig, GGUFTokenizerData]:
    """Config and tokenizer data only, without dequantizing any weights (fast)."""
    gf, buf = _open_gguf(path)
    return _build(gf, buf)


def open_gguf(path: str | os.PathLike) -> tuple[ModelConfig, GGUFWeights, GGUFTokenizerData]:
    """Like :func:`load_gguf`, but the weights are read lazily (iterate them once, in file order)."""
    gf, buf = _open_gguf(path)
    config, tok = _build(gf, buf)
    _check_holds(gf, config)
    return config, GGUFWeights(gf, buf, config), tok


def iter_gguf_tensors(path: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, float32 tensor)`` one at a time, so a caller copying each into its model
    (and casting to bf16, moving to GPU...) never holds a second full copy of the weights.

    The whole file is validated (header, truncation, architecture) before the first tensor.
    """
    gf, buf = _open_gguf(path)
    config, _ = _build(gf, buf)
    _check_holds(gf, config)
    return _iter_tensors(gf, buf, config)


def load_gguf(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor], GGUFTokenizerData]:
    """Read a Llama GGUF: its config, a float32 state dict with Hugging Face names and shapes (q/k
    rows un-permuted; ``lm_head.weight`` only when the file has ``output.weight``), and the raw
    tokenizer metadata for :meth:`minillama.models.tokenizer.Tokenizer.from_gguf`.

    Raises :class:`ModelLoadError` with a one-line message for a missing, truncated, non-GGUF or
    non-Llama file.
    """
    gf, buf = _open_gguf(path)
    config, tok = _build(gf, buf)
    _check_holds(gf, config)
    state = dict(_iter_tensors(gf, buf, config))
    return config, state, tok
