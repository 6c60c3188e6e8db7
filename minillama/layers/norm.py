"""RMSNorm, computed in float32 like the reference implementation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minillama.layers import triton_ops


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if triton_ops.covers(x):
            return triton_ops.rms_norm(x, self.weight, self.eps)[0]
        return self._forward(x)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``h = x + residual`` and ``self(h)``, one kernel on the GPU; returns (h, normed h)."""
        if triton_ops.covers(x):
            out, h = triton_ops.rms_norm(residual, self.weight, self.eps, residual=x)
            return h, out
        h = x + residual
        return h, self._forward(h)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        # x * rsqrt(mean(x^2) + eps) in float32, back to x's dtype, then the weight (as Hugging Face
        # does); F.rms_norm computes the first part in fewer kernels than spelling it out.
        dtype = x.dtype
        if dtype == torch.float32 and self.weight.dtype == torch.float32:
            # the same products in the same order, in one call
            return F.rms_norm(x, (x.shape[-1],), self.weight, eps=self.eps)
        x = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * x.to(dtype)
