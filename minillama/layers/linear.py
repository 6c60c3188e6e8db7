"""Linear layers whose weights may be packed from several checkpoint tensors.

``QKVLinear`` holds q_proj, k_proj and v_proj stacked by rows; ``MergedLinear`` holds gate_proj and
up_proj. Each parameter carries a ``weight_loader(param, tensor, shard_id)`` that the model loader
calls, following ``packed_modules_mapping``.
"""

from __future__ import annotations

import torch
from torch import nn


class Linear(nn.Linear):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.weight.weight_loader = self.weight_loader

    def reset_parameters(self) -> None:
        """No random init: every weight comes from a checkpoint (or ``init_random_weights``). Leaving
        the memory untouched until then keeps loading to one copy of the weights in RSS and saves
        drawing ~10^8 random numbers for a model that is about to be overwritten."""

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if param.shape != loaded.shape:
            raise ValueError(f"weight shape {tuple(loaded.shape)} does not match the model's {tuple(param.shape)}")
        param.data.copy_(loaded)


class MergedLinear(Linear):
    """Several projections of the same input stacked by rows; shard ``i`` has ``out_sizes[i]`` rows."""

    def __init__(self, in_features: int, out_sizes: list[int]) -> None:
        super().__init__(in_features, sum(out_sizes))
        self.out_sizes = out_sizes

    def shard_rows(self, shard_id: int) -> slice:
        start = sum(self.out_sizes[:shard_id])
        return slice(start, start + self.out_sizes[shard_id])

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        target = param.data[self.shard_rows(int(shard_id))]
        if target.shape != loaded.shape:
            raise ValueError(f"weight shard shape {tuple(loaded.shape)} does not match the model's {tuple(target.shape)}")
        target.copy_(loaded)


class QKVLinear(MergedLinear):
    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int) -> None:
        super().__init__(hidden_size, [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim])

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        super().weight_loader(param, loaded, "qkv".index(str(shard_id)))
