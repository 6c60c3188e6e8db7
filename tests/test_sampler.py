"""The sampler's distributions: top-k, top-p and temperature against direct computation."""

from __future__ import annotations

import torch

from minillama.layers.sampler import Sampler, apply_top_k_top_p


def test_top_k_top_p_masks():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    kept = lambda k, p: torch.isfinite(apply_top_k_top_p(logits, torch.tensor([k]), torch.tensor([p])))[0].tolist()
    assert kept(0, 1.0) == [True] * 5
    assert kept(2, 1.0) == [True, True, False, False, False]
    assert kept(0, 0.6) == [True, True, False, False, False]  # 0.5 < 0.6, then 0.7 >= 0.6 stops
    assert kept(0, 0.5) == [True, False, False, False, False]
    assert kept(0, 0.01) == [True, False, False, False, False]  # the top token always survives


def test_sampling_frequencies_follow_probabilities():
    probs = torch.tensor([0.6, 0.3, 0.1])
    n = 20000
    logits = probs.log().expand(n, 3).clone()
    s = Sampler()(logits, torch.ones(n), torch.zeros(n, dtype=torch.long), torch.ones(n), [None] * n)
    freq = torch.bincount(s, minlength=3).float() / n
    assert torch.allclose(freq, probs, atol=0.02)


def test_temperature_zero_rows_are_greedy_in_a_mixed_batch():
    logits = torch.randn(8, 100)
    temps = torch.tensor([0.0, 1.0] * 4)
    s = Sampler()(logits, temps, torch.zeros(8, dtype=torch.long), torch.ones(8), [None] * 8)
    greedy = logits.argmax(-1)
    assert torch.equal(s[::2], greedy[::2])
