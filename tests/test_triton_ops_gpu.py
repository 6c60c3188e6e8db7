"""The fused GPU kernels of ``minillama.layers.triton_ops`` against the PyTorch layers they replace.

Each kernel does the PyTorch layer's arithmetic in the same order, so in bf16 the two agree to
within one rounding step; the engine's logits with and without them agree far inside the
bf16 error budget. Skips without CUDA or Triton.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]
triton = pytest.importorskip("triton", reason="Triton is not installed: the layers run plain PyTorch")

from minillama.layers import triton_ops  # noqa: E402
from minillama.layers.activation import SiluAndMul  # noqa: E402
from minillama.layers.norm import RMSNorm  # noqa: E402
from minillama.layers.rotary import RotaryEmbedding  # noqa: E402

ULP = dict(rtol=2**-7, atol=1e-5)  # one bf16 rounding step


def both(monkeypatch, fn):
    """``fn()`` through the fused kernels and through plain PyTorch (MINILLAMA_TRITON_OPS=0)."""
    monkeypatch.delenv("MINILLAMA_TRITON_OPS", raising=False)
    fused = fn()
    monkeypatch.setenv("MINILLAMA_TRITON_OPS", "0")
    plain = fn()
    monkeypatch.delenv("MINILLAMA_TRITON_OPS")
    return fused, plain


@pytest.mark.parametrize("rows", [1, 7, 256])
@pytest.mark.parametrize("hidden", [576, 2048, 3072])
def test_rms_norm_and_residual_add(monkeypatch, rows, hidden):
    gen = torch.Generator(device="cuda").manual_seed(rows + hidden)
    norm = RMSNorm(hidden, 1e-5).cuda().to(torch.bfloat16)
    norm.weight.data = torch.rand(hidden, generator=gen, device="cuda").to(torch.bfloat16) + 0.5
    x = torch.randn(rows, hidden, generator=gen, device="cuda").to(torch.bfloat16)
    r = torch.randn(rows, hidden, generator=gen, device="cuda").to(torch.bfloat16)
    assert triton_ops.covers(x)
    fused, plain = both(monkeypatch, lambda: (norm(x), *norm.add_and_norm(x, r)))
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b, **ULP)
    assert torch.equal(fused[1], plain[1]), "the residual sum is one bf16 add in both"


@pytest.mark.parametrize("rows", [1, 33])
def test_silu_and_mul(monkeypatch, rows):
    gen = torch.Generator(device="cuda").manual_seed(rows)
    x = torch.randn(rows, 2 * 8192, generator=gen, device="cuda").to(torch.bfloat16) * 4
    fused, plain = both(monkeypatch, lambda: SiluAndMul()(x))
    torch.testing.assert_close(fused, plain, **ULP)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_rotary_on_a_strided_view(monkeypatch, head_dim):
    """q and k heads side by side in the rows of a qkv projection, as the attention layer passes them."""
    gen = torch.Generator(device="cuda").manual_seed(head_dim)
    H, Hk, T = 24, 8, 37
    qkv = torch.randn(T, (H + 2 * Hk) * head_dim, generator=gen, device="cuda").to(torch.bfloat16)
    qk = qkv[:, :(H + Hk) * head_dim].view(T, H + Hk, head_dim)
    rope = RotaryEmbedding(head_dim, 4096, 500000.0, None).cuda()
    positions = torch.randint(0, 4096, (T,), generator=gen, device="cuda")
    fused, plain = both(monkeypatch, lambda: rope(positions, qk))
    torch.testing.assert_close(fused, plain, **ULP)


@pytest.mark.parametrize("head_dim,kv_heads,page", [(64, 8, 16), (128, 8, 256), (64, 3, 256)])
def test_store_kv_matches_index_copy(monkeypatch, head_dim, kv_heads, page):
    """K/V rows land at their slots, v read from its strided place in qkv, slot -1 rows write nothing."""
    from minillama.layers.attention import store_kvcache

    gen = torch.Generator(device="cuda").manual_seed(head_dim + kv_heads + page)
    T, blocks = 41, 9
    qkv = torch.randn(T, 3 * kv_heads * head_dim, generator=gen, device="cuda").to(torch.bfloat16)
    k = qkv[:, : kv_heads * head_dim].view(T, kv_heads, head_dim).contiguous()
    v = qkv[:, 2 * kv_heads * head_dim :].view(T, kv_heads, head_dim)
    slots = torch.randperm(blocks * page, generator=gen, device="cuda")[:T]
    slots[::5] = -1
    assert triton_ops.store_kv_covers(k, torch.empty(1, 1, kv_heads, head_dim, dtype=torch.bfloat16, device="cuda"))

    def run():
        kc = torch.zeros(blocks + 1, page, kv_heads, head_dim, dtype=torch.bfloat16, device="cuda")
        vc = torch.zeros_like(kc)
        store_kvcache(k, v, kc, vc, slots)
        return kc[:blocks], vc[:blocks]  # the plain path sends -1 rows to the spare last block

    fused, plain = both(monkeypatch, run)
    for a, b in zip(fused, plain, strict=True):
        assert torch.equal(a, b)
    flat = fused[0].reshape(-1, kv_heads, head_dim)
    ok = slots >= 0
    assert torch.equal(flat[slots[ok]], k[ok]) and int((fused[0] != 0).any(-1).any(-1).sum()) == int(ok.sum())


@pytest.mark.parametrize("rows,vocab", [(1, 49152), (256, 128256), (3, 5000)])
def test_argmax_picks_the_first_maximum(rows, vocab):
    """Equal maxima planted in different parts of a row: the first one wins, as with torch.argmax."""
    gen = torch.Generator(device="cuda").manual_seed(rows + vocab)
    x = torch.randn(rows, vocab, generator=gen, device="cuda").to(torch.bfloat16)
    top = x.max() + 1
    x[:, vocab - 1] = top  # last column, last part
    x[: rows // 2 + 1, vocab // 2] = top  # middle: first for the upper rows
    x[0, 3] = top  # very first part for row 0
    x[-1, :] = x[-1, :].clamp(max=0)  # last row: its own maximum
    assert torch.equal(triton_ops.argmax(x), x.argmax(-1))
    assert torch.equal(triton_ops.argmax(x.float()), x.float().argmax(-1))
