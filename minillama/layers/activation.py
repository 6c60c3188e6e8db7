"""SwiGLU activation on a fused gate/up projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minillama.context import get_context
from minillama.layers import batch_invariant, triton_ops


class SiluAndMul(nn.Module):
    """``silu(gate) * up`` where the input is ``cat([gate, up], -1)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if get_context().batch_invariant and not x.is_cuda:
            return batch_invariant.silu_and_mul(x)  # F.silu's vector body and scalar tail round differently
        if triton_ops.covers(x):
            return triton_ops.silu_and_mul(x)
        gate, up = x.chunk(2, -1)
        return F.silu(gate) * up
