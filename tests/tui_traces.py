"""Fixture traces for the TUI tests, recorded by the real engine on the tiny random Llama (3 layers).

* ``planted``: two requests, shadow ``torch``, the active backend off by ``DELTA`` at one element
  (layer ``LAYER``, head ``HEAD``, dimension ``DIM`` of the batch's last row) through a registered
  wrapper backend; every attention tensor and the logits kept in full.
* ``clean``: the same prompts on the plain torch backend (B of the A/B pair).
* ``preempted``: three requests in a cache too small for all of them (a preemption, then a recompute).

``tests/data/tui-planted`` and ``tests/data/tui-clean`` are committed copies (fixed content for the SVG
snapshots on every machine); regenerate them with ``python -m tests.tui_traces`` after a format change.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator

import torch

from minillama.attention import AttentionBackend

LAYER, HEAD, DIM, DELTA = 1, 3, 5, 0.25
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23], [40, 41, 42, 43, 44]]
FULL = ("layers.*.attn.q", "layers.*.attn.k", "layers.*.attn.out", "layers.*.attn.out@*", "logits")
DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def spot_backend(name: str, layer: int = LAYER, head: int = HEAD, dim: int = DIM, delta: float = DELTA,
                 num_layers: int = 3, base: str = "torch") -> AttentionBackend:
    """Register (and return) ``base`` with ``delta`` added at one element of layer ``layer``'s output: head
    ``head``, dimension ``dim`` of the last row of the batch (layers counted per forward pass)."""
    from tests.traces import layer_backend

    def plant(t: torch.Tensor) -> torch.Tensor:
        t.reshape(-1, t.shape[-2], t.shape[-1])[-1, head, dim] += delta
        return t

    return layer_backend(name, layer, num_layers, plant, base)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Tiny models run many times faster on one thread on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def record(path: str, model: str, kind: str) -> str:
    """Record fixture ``kind`` (planted, clean, preempted) of the tiny model folder ``model`` into ``path``."""
    from tests.traces import record_trace

    with one_thread():
        if kind == "planted":
            spot_backend("spot")
            return record_trace(path, model, PROMPTS, shadow="torch", full=FULL, backend="spot", max_tokens=4)
        if kind == "clean":
            return record_trace(path, model, PROMPTS, shadow="torch", full=FULL, backend="torch", max_tokens=4)
        if kind == "preempted":
            prompts = [[10 + i + j for j in range(30)] for i in range(3)]
            return record_trace(path, model, prompts, full=(), max_tokens=24, num_kvcache_blocks=8,
                                max_num_batched_tokens=64)
    raise ValueError(f"unknown fixture {kind!r}")


if __name__ == "__main__":  # regenerate the committed copy
    import tempfile

    from tests.conftest import make_tiny_llama

    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_llama(os.path.join(tmp, "tiny"))
        for kind in ("planted", "clean"):
            out = os.path.join(DATA, f"tui-{kind}")
            shutil.rmtree(out, ignore_errors=True)
            record(out, model, kind)
            print(f"wrote {out}")
