"""Shadow attention: redo each layer's attention with another backend, and a float64 reference.

The active backend's output continues the forward pass; the shadow's output and the reference
are only compared with it. Because every layer redoes the very same call (same q, same cache),
the difference at layer ``i`` is the error that layer's kernel adds, not error inherited from
earlier layers.

The error budget is that of plain attention in the active dtype: ``|plain - ref|`` where
``plain`` is the readable torch algorithm run on the same inputs in the active dtype (float32
accumulation, output rounded to the active dtype), floored at one rounding unit of the output.
``budget_ratio`` near 1 means a kernel is as accurate as plain attention at that precision;
well above 2 means it adds error that low precision alone does not explain (flash-attention
issue 410).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from minillama.attention import AttentionBackend, get_backend
from minillama.layers.attention import AttentionCall, run_attention


def _compact(call: AttentionCall, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """The call's inputs in ``dtype``; for paged calls only the blocks its block table names are copied."""
    ctx = call.context
    q, k, v = (t.to(dtype) for t in (call.q, call.k, call.v))
    if ctx.block_tables is None:
        return q, k, v, call.k_cache[:0].to(dtype), call.v_cache[:0].to(dtype), ctx
    bt = ctx.block_tables.long()
    b, w = bt.shape
    kc = call.k_cache[bt.flatten()].to(dtype)
    vc = call.v_cache[bt.flatten()].to(dtype)
    table = torch.arange(b * w, dtype=torch.int32, device=bt.device).view(b, w)
    return q, k, v, kc, vc, dataclasses.replace(ctx, block_tables=table)


def reference_attention(call: AttentionCall, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The call redone by the torch backend in ``dtype`` (float64: the reference)."""
    q, k, v, kc, vc, ctx = _compact(call, dtype)
    return run_attention(get_backend("torch"), q, k, v, kc, vc, ctx, call.scale)


def compare(active: torch.Tensor, shadow: torch.Tensor | None, ref: torch.Tensor | None,
            plain: torch.Tensor | None = None) -> dict[str, Any]:
    """Per-layer metrics: max |active - shadow|, its relative size, each one's error vs the reference."""
    a = active.double()
    out: dict[str, Any] = {}
    if shadow is not None:
        s = shadow.double()
        d = (a - s).abs()
        out["max_abs"] = float(d.max()) if d.numel() else 0.0
        out["rel"] = float(d.norm() / s.norm().clamp(min=1e-30)) if d.numel() else 0.0
    if ref is not None and a.numel():
        r = ref.double()
        out["err_active"] = float((a - r).abs().max())
        if shadow is not None:
            out["err_shadow"] = float((shadow.double() - r).abs().max())
        unit = torch.finfo(active.dtype).eps * float(r.abs().max())  # one rounding of the output
        plain_err = float((plain.double() - r).abs().max()) if plain is not None else 0.0
        out["budget"] = max(plain_err, unit, 1e-30)
        out["budget_ratio"] = out["err_active"] / out["budget"]
        if shadow is not None:
            out["budget_ratio_shadow"] = out["err_shadow"] / out["budget"]
    return out


class Shadow:
    """Runs ``backend`` (and optionally the float64 reference) beside the active one at every layer."""

    def __init__(self, backend: str | AttentionBackend | None, device: torch.device, dtype: torch.dtype,
                 head_dim: int, reference: bool = True) -> None:
        self.backend = get_backend(backend) if isinstance(backend, str) else backend
        if self.backend is not None:
            self.backend.check(head_dim, dtype, device)
        self.reference = reference

    @property
    def name(self) -> str:
        return self.backend.name if self.backend is not None else "reference"

    @torch.inference_mode()
    def run(self, call: AttentionCall, active_out: torch.Tensor) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Metrics and the shadow/reference outputs for one attention call."""
        shadow = ref = None
        if self.backend is not None:
            shadow = run_attention(self.backend, call.q, call.k, call.v, call.k_cache, call.v_cache,
                                   call.context, call.scale)
        plain = None
        if self.reference:
            ref = reference_attention(call)
            plain = reference_attention(call, active_out.dtype)
        metrics = {"backend": self.name, **compare(active_out, shadow, ref, plain)}
        tensors = {}
        if shadow is not None:
            tensors["shadow"] = shadow
        if ref is not None:
            tensors["ref"] = ref.to(torch.float32)
        return metrics, tensors
