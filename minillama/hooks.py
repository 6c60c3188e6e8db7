"""Named hook sites along the data flow, TransformerLens style.

The engine calls ``emit(site, tensor, **info)`` at fixed sites. Until a listener is attached
(``attach``), ``enabled`` is False and the hot paths skip even building the site name, so the
engine runs the same with or without a debugger.

Site names (dotted, stable, used as keys on disk):

* per scheduler step: ``step.begin`` (info: the batch), ``step.end`` (info: sampled tokens)
* per forward pass: ``embed``, ``final_norm``, ``logits``, ``sampled``
* per layer ``i``: ``layers.{i}.input``, ``layers.{i}.attn.q``, ``layers.{i}.attn.k``,
  ``layers.{i}.attn.v``, ``layers.{i}.attn.out``, ``layers.{i}.mlp.out``, ``layers.{i}.output``
* per layer, the attention call itself: ``layers.{i}.attn.call`` (info: ``call``, an
  ``AttentionCall`` holding the exact inputs and the paged cache, so a shadow backend can
  recompute it)

Flat tensors (one row per token of the batch) can be split per request with the step context's
``cu_seqlens_q`` and ``seq_ids`` (``minillama.engine.context.get_context``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Listener = Callable[[str, "torch.Tensor | None", dict[str, Any]], None]

#: Read by the hot paths; True only while at least one listener is attached.
enabled: bool = False
_listeners: list[Listener] = []

LAYER_SITES = ("input", "attn.q", "attn.k", "attn.v", "attn.out", "mlp.out", "output")
MODEL_SITES = ("embed", "final_norm", "logits", "sampled")


def layer_site(layer: int, name: str) -> str:
    """The dotted name of a per-layer site, e.g. ``layer_site(3, "attn.out") == "layers.3.attn.out"``."""
    return f"layers.{layer}.{name}"


def expected_sites(num_layers: int) -> list[str]:
    """Every tensor site one forward pass must fire, in order (used to report missed hooks)."""
    sites = ["embed"]
    for i in range(num_layers):
        sites += [layer_site(i, s) for s in LAYER_SITES]
    return sites + ["final_norm", "logits"]


def emit(site: str, tensor: torch.Tensor | None = None, **info: Any) -> None:
    """Hand ``tensor`` at ``site`` to every listener. Call only behind ``if hooks.enabled``."""
    for fn in tuple(_listeners):
        fn(site, tensor, info)


def attach(fn: Listener) -> None:
    """Start calling ``fn(site, tensor, info)`` at every site."""
    global enabled
    _listeners.append(fn)
    enabled = True


def detach(fn: Listener) -> None:
    """Stop calling ``fn``; hooks cost nothing again once no listener is left."""
    global enabled
    if fn in _listeners:
        _listeners.remove(fn)
    enabled = bool(_listeners)
