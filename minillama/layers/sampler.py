"""Pick the next token of each sequence from its logits: greedy, temperature, top-k, top-p, seeds.

Sampling uses the exponential-race form of the Gumbel-max trick: ``argmax(p / E)`` with
``E ~ Exp(1)`` draws from ``p`` without a cumulative sum or host sync. A request with a seed
draws its noise from its own generator, so its samples do not depend on what else is batched.
"""

from __future__ import annotations

import torch
from torch import nn

from minillama.layers import triton_ops


class Sampler(nn.Module):
    def forward(self, logits: torch.Tensor, temperatures: torch.Tensor, top_ks: torch.Tensor,
                top_ps: torch.Tensor, generators: list[torch.Generator | None], all_greedy: bool = False,
                need_top_k_top_p: bool = True) -> torch.Tensor:
        """logits (batch, vocab) float32; per-row temperature (0 = greedy), top_k (0 = off), top_p.

        ``all_greedy`` and ``need_top_k_top_p`` are host-side shortcuts the caller knows for free.
        """
        # On the GPU a split argmax reads the (batch, vocab) logits about twice as fast.
        greedy = triton_ops.argmax(logits) if triton_ops.covers(logits) else logits.argmax(-1)
        if all_greedy:
            return greedy
        logits = logits / temperatures.clamp(min=1e-6).unsqueeze(1)
        if need_top_k_top_p:
            logits = apply_top_k_top_p(logits, top_ks, top_ps)
        probs = logits.softmax(-1)
        noise = torch.empty_like(probs).exponential_()
        for row, gen in enumerate(generators):
            if gen is not None:  # seeded requests: noise from their own stream
                noise[row].exponential_(generator=gen)
        sampled = (probs / noise).argmax(-1)
        return torch.where(temperatures > 0, sampled, greedy)


def apply_top_k_top_p(logits: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) everything outside each row's top-k and top-p nucleus."""
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device).expand_as(sorted_logits)
    k = torch.where(top_ks > 0, top_ks, vocab).unsqueeze(1)
    drop = ranks >= k
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
    # keep a token while the mass strictly before it is below top_p (the first token is always kept)
    mass_before = probs.cumsum(-1) - probs
    drop |= mass_before >= top_ps.unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)
