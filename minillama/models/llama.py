"""The Llama network (Llama-2/3, SmolLM2): embeddings, decoder layers, final norm, LM head.

Inputs are flat: one row per new token of the whole batch, with ``positions``; how tokens group
into sequences lives in the step context, read only by the attention layers.
"""

from __future__ import annotations

import torch
from torch import nn

from minillama import hooks
from minillama.layers.activation import SiluAndMul
from minillama.layers.attention import Attention
from minillama.layers.embedding import Embedding, LMHead
from minillama.layers.linear import Linear, MergedLinear, QKVLinear
from minillama.layers.norm import RMSNorm
from minillama.layers.rotary import RotaryEmbedding
from minillama.models.config import ModelConfig


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, max_position: int, backend,
                 rotary: RotaryEmbedding | None = None) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.qkv_proj = QKVLinear(cfg.hidden_size, self.head_dim, self.num_heads, self.num_kv_heads)
        self.o_proj = Linear(self.num_heads * self.head_dim, cfg.hidden_size)
        self.rotary_emb = rotary or RotaryEmbedding(self.head_dim, max_position, cfg.rope_theta, cfg.rope_scaling)
        self.attn = Attention(layer, self.num_heads, self.num_kv_heads, self.head_dim, backend)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        H, Hk, D = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)
        # q and k sit side by side in qkv's rows: rotate their heads in one call, then split.
        q, k = self.rotary_emb(positions, qkv[:, :(H + Hk) * D].view(-1, H + Hk, D)).split([H, Hk], 1)
        v = qkv[:, (H + Hk) * D:].view(-1, Hk, D)
        if hooks.enabled:
            for name, t in (("q", q), ("k", k), ("v", v)):
                hooks.emit(f"layers.{self.layer}.attn.{name}", t)
        out = self.attn(q, k, v)
        if hooks.enabled:
            hooks.emit(f"layers.{self.layer}.attn.out", out)
        return self.o_proj(out.flatten(1))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = MergedLinear(cfg.hidden_size, [cfg.intermediate_size] * 2)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, max_position: int, backend,
                 rotary: RotaryEmbedding | None = None) -> None:
        super().__init__()
        self.layer = layer
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, layer, max_position, backend, rotary)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, positions: torch.Tensor, x: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (MLP output, residual stream after attention); the layer's output is their sum.

        The sum is left to the next norm, which adds and normalises in one kernel on the GPU (as
        vLLM does), so ``x`` is the previous layer's MLP output and ``residual`` its stream (None
        for the first layer, whose ``x`` is the embeddings). The hook site ``layers.{i}.output`` is
        that sum too, emitted where it is made (by layer ``i + 1``, or the final norm), in the same
        order as if layer ``i`` emitted it last.
        """
        if residual is None:
            normed = self.input_layernorm(x)
        else:
            x, normed = self.input_layernorm.add_and_norm(x, residual)
            if hooks.enabled:  # that sum is the layer before's output: no add of its own for the hook
                hooks.emit(f"layers.{self.layer - 1}.output", x)
        if hooks.enabled:
            hooks.emit(f"layers.{self.layer}.input", x)
        h, normed = self.post_attention_layernorm.add_and_norm(x, self.self_attn(positions, normed))
        mlp_out = self.mlp(normed)
        if hooks.enabled:
            hooks.emit(f"layers.{self.layer}.mlp.out", mlp_out)
        return mlp_out, h


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, max_position: int, backend) -> None:
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        # one cos/sin table for every layer (it is the same table: 1 MB a layer at 4096 positions)
        rotary = RotaryEmbedding(cfg.head_dim, max_position, cfg.rope_theta, cfg.rope_scaling)
        self.layers = nn.ModuleList(
            [LlamaDecoderLayer(cfg, i, max_position, backend, rotary) for i in range(cfg.num_hidden_layers)]
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        if hooks.enabled:
            hooks.emit("embed", x)
        residual = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual)
        h, x = self.norm.add_and_norm(x, residual)
        if hooks.enabled:
            hooks.emit(f"layers.{len(self.layers) - 1}.output", h)
            hooks.emit("final_norm", x)
        return x


class LlamaForCausalLM(nn.Module):
    # checkpoint name fragment -> (our fused parameter, shard id)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: ModelConfig, max_position: int, backend) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg, max_position, backend)
        self.lm_head = LMHead(cfg.vocab_size, cfg.hidden_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if hooks.enabled:
            hooks.emit("logits", logits)
        return logits
