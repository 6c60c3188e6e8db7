"""Test data: traces recorded by the real engine on a tiny random Llama, with errors planted on purpose.

``record_trace`` runs ``minillama``'s own ``Recorder`` and ``TraceWriter`` (what ``minillama record``
does), so fixtures carry exactly what a user's recording carries. A planted attention error goes
through a registered wrapper backend (``planted_backend``): the engine and the recorder see an
ordinary backend whose output at one layer is off by ``delta``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence

import torch

from minillama import LLM, SamplingParams
from minillama.attention import AttentionBackend, get_backend, register_backend


def layer_backend(name: str, layer: int, num_layers: int, change: Callable[[torch.Tensor], torch.Tensor],
                  base: str = "torch") -> AttentionBackend:
    """Register (and return) a backend ``name`` that is ``base`` except that layer ``layer``'s output goes
    through ``change`` (layers counted per forward pass; for a tuple result, its first tensor)."""
    inner = get_backend(base)
    count = {"n": 0}

    def wrap(fn):
        def call(*args, **kwargs):
            out = fn(*args, **kwargs)
            k = count["n"] % num_layers
            count["n"] += 1
            if k == layer:
                out = (change(out[0]), *out[1:]) if isinstance(out, tuple) else change(out)
            return out
        return call

    @contextlib.contextmanager
    def scope() -> Iterator[None]:
        count["n"] = 0
        with inner.forward_scope():
            yield

    backend = dataclasses.replace(inner, name=name, varlen=wrap(inner.varlen), with_kvcache=wrap(inner.with_kvcache),
                                  forward_scope=scope)
    register_backend(backend)
    return backend


def planted_backend(name: str, layer: int, delta: float, num_layers: int, base: str = "torch") -> AttentionBackend:
    """``base`` with layer ``layer``'s whole output shifted by ``delta``."""
    return layer_backend(name, layer, num_layers, lambda t: t + delta, base)


def record_trace(path: str | os.PathLike, model: str, prompts: Sequence[str | list[int]], *, shadow: str | None = None,
                 full: Sequence[str] = (), backend: str = "torch", max_tokens: int = 4, chat: bool = False,
                 llm: LLM | None = None, writer: str = "thread", **engine: object) -> str:
    """Record ``prompts`` on ``model`` (a folder or GGUF) into a new trace folder; returns its path.
    ``writer``: the trace writer's kind, "thread" or "process" (``writer_process.trace_sink``)."""
    from minillama.debug.manifest import build_manifest
    from minillama.debug.recorder import Recorder
    from minillama.debug.writer_process import trace_sink
    from minillama.trace.writer import TraceWriter

    if llm is None:
        engine.setdefault("num_kvcache_blocks", 64)
        engine.setdefault("max_model_len", 256)
        llm = LLM(model, backend=backend, device="cpu", **engine)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    tok = llm.tokenizer
    ids = [p if isinstance(p, list) else (tok.encode_chat([{"role": "user", "content": p}]) if chat else tok.encode(p))
           for p in prompts]
    rec = Recorder(llm, shadow=shadow, full_sites=full)
    seqs = [llm.add_request(x, params) for x in ids]
    manifest = build_manifest(llm, rec, prompts=list(prompts), params=params, seqs=seqs, chat=chat)
    rec.set_sink(trace_sink(TraceWriter(path, manifest), rec, writer))
    rec.attach()
    try:
        while llm.has_unfinished():
            llm.step()
    finally:
        rec.detach()
    return os.fspath(path)
