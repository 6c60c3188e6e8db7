"""Token embedding and the LM head (which may share the embedding's weight)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Embedding(nn.Embedding):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__(vocab_size, hidden_size)
        self.weight.weight_loader = lambda p, t, shard_id=None: p.data.copy_(t)

    def reset_parameters(self) -> None:
        """No random init: the weights are loaded next (untouched memory until then, see ``Linear``)."""


class LMHead(nn.Module):
    """Projects hidden states to vocabulary logits, always in float32."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))
        self.weight.weight_loader = lambda p, t, shard_id=None: p.data.copy_(t)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.is_cuda and hidden.dim() == 2 and hidden.dtype in (torch.float16, torch.bfloat16):
            # float32 results straight from the matrix units: one pass, and logits not rounded to
            # bf16 first (whose ties at 1/8 steps would make greedy picks flip on noise)
            return torch.mm(hidden, self.weight.t(), out_dtype=torch.float32)
        return F.linear(hidden, self.weight).float()
