"""Named hook sites along the data flow, TransformerLens style, defined here once.

The engine calls ``emit(site, tensor, **info)`` at fixed sites. Until a listener is attached
(``attach``), ``enabled`` is False and the hot paths skip even building the site name, so the
engine runs the same with or without a debugger.

Site names (dotted, stable, used as keys on disk):

* per scheduler step (host events, no tensor): ``step.begin`` (info: the batch, before it runs),
  ``step.launched`` (its forward pass and sampling are enqueued), ``step.end`` (its tokens are known)
* per forward pass: ``embed``, ``final_norm``, ``logits``, ``sampled``
* per layer ``i``: ``layers.{i}.input``, ``layers.{i}.attn.q``, ``layers.{i}.attn.k``,
  ``layers.{i}.attn.v``, ``layers.{i}.attn.out``, ``layers.{i}.mlp.out``, ``layers.{i}.output`` (the
  residual stream after layer ``i``, which the next norm adds up, so it equals ``layers.{i+1}.input``)
* per layer, the attention call itself: ``layers.{i}.attn.call`` (info: ``call``, an
  ``AttentionCall`` holding the exact inputs and the paged cache, so a shadow backend can redo it)

Flat tensors have one row per new token of the batch (requests in batch order); ``logits`` and
``sampled`` one row per request that samples. The step context (``minillama.context``) says which
request and token position each row has.

A tensor handed to a site is not changed afterwards within its forward pass: listeners may read it
at the pass's last site (the recorder batches its statistics there: in CUDA graphs, eager CUDA steps, CPU).
Listeners read; one that writes into a site tensor changes the forward pass from there on (tests plant
a NaN that way), and ``layers.{i}.output`` is the live residual stream, not a copy.

Listeners say how they listen (``mode``): ``"eager"`` listeners run Python on each tensor at each
site (the engine then runs eagerly and step by step); ``"step"`` listeners only enqueue device work
at sites, so decode steps may replay CUDA graphs with that work captured inside, but need each step
finished before the next is scheduled; ``"device"`` listeners also allow overlapped steps.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch

Listener = Callable[[str, "torch.Tensor | None", dict[str, Any]], None]

STEP_BEGIN, STEP_LAUNCHED, STEP_END = "step.begin", "step.launched", "step.end"
STEP_EVENTS = (STEP_BEGIN, STEP_LAUNCHED, STEP_END)
LAYER_SITES = ("input", "attn.q", "attn.k", "attn.v", "attn.out", "mlp.out", "output")
MODEL_SITES = ("embed", "final_norm", "logits", "sampled")
#: Sites with one row per sampling request (the others: one row per new token).
SAMPLE_SITES = ("logits", "sampled")
ATTN_CALL = "attn.call"
#: Each site's trailing shape, in model-config terms (``site_shape`` fills them in).
SHAPES = {"embed": ("hidden",), "input": ("hidden",), "attn.q": ("heads", "head_dim"),
          "attn.k": ("kv_heads", "head_dim"), "attn.v": ("kv_heads", "head_dim"),
          "attn.out": ("heads", "head_dim"), "mlp.out": ("hidden",), "output": ("hidden",),
          "final_norm": ("hidden",), "logits": ("vocab",), "sampled": ()}
MODES = ("device", "step", "eager")

_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")

#: Read by the hot paths; True only while at least one listener is attached.
enabled: bool = False
#: True while some listener needs Python at each site: no CUDA graphs, no overlapped steps.
eager: bool = False
#: True while every listener allows overlapped steps.
overlap: bool = True
#: Changes whenever the set of listeners doing device work at sites changes (graphs must be recaptured).
generation: int = 0
#: True while the engine captures a CUDA graph (listeners must only enqueue device work then).
capturing: bool = False
_listeners: list[Listener] = []


def layer_site(layer: int, name: str) -> str:
    """The dotted name of a per-layer site, e.g. ``layer_site(3, "attn.out") == "layers.3.attn.out"``."""
    return f"layers.{layer}.{name}"


def site_layer(site: str) -> int | None:
    """Layer index of a per-layer site name (``layers.3.attn.q`` -> 3), else None."""
    m = _LAYER_RE.match(site)
    return int(m.group(1)) if m else None


def site_part(site: str) -> str:
    """The site without its layer: ``layers.3.attn.q`` -> ``attn.q``; ``logits`` -> ``logits``."""
    m = _LAYER_RE.match(site)
    return m.group(2) if m else site


def expected_sites(num_layers: int) -> list[str]:
    """Every tensor site of one forward pass with sampling, in the order they fire."""
    sites = ["embed"]
    for i in range(num_layers):
        sites += [layer_site(i, s) for s in LAYER_SITES]
    return sites + ["final_norm", "logits", "sampled"]


def site_shape(site: str, dims: dict[str, int]) -> tuple[int, ...]:
    """Trailing shape (after the row dimension) of ``site`` for a model's ``dims``."""
    return tuple(dims[d] for d in SHAPES[site_part(site)])


def emit(site: str, tensor: torch.Tensor | None = None, **info: Any) -> None:
    """Hand ``tensor`` at ``site`` to every listener. Call only behind ``if hooks.enabled``."""
    for fn in tuple(_listeners):
        fn(site, tensor, info)


def graphs_captured() -> None:
    """Tell listeners that CUDA graphs were just captured: host work they deferred during the capture
    (``graphs_captured()`` on the listener, when it has one) must run before the first replay."""
    for fn in tuple(_listeners):
        done = getattr(fn, "graphs_captured", None)
        if done is not None:
            done()


def _mode(fn: Listener) -> str:
    mode = getattr(fn, "hook_mode", "eager")
    if mode not in MODES:
        raise ValueError(f"hook listener mode {mode!r} unknown: use one of {', '.join(MODES)}")
    return mode


def refresh() -> None:
    """Recompute the flags from the listeners' current modes (call after a listener changes its mode)."""
    global enabled, eager, overlap
    modes = [_mode(fn) for fn in _listeners]
    enabled = bool(modes)
    eager = "eager" in modes
    overlap = all(m == "device" for m in modes)


def attach(fn: Listener) -> None:
    """Start calling ``fn(site, tensor, info)`` at every site (``fn.hook_mode``: see the module docstring)."""
    global generation
    _mode(fn)
    _listeners.append(fn)
    generation += 1
    refresh()


def detach(fn: Listener) -> None:
    """Stop calling ``fn``; hooks cost nothing again once no listener is left."""
    global generation
    if fn in _listeners:
        _listeners.remove(fn)
        generation += 1
    refresh()
