"""The attention backends on CPU against a plain float64 reference, plus the backend registry.

The reference (``ref_attention``) is deliberately naive: one sequence at a time, explicit keys,
explicit bottom-right causal mask and GQA head mapping, in float64.

The backend cases run for ``torch`` (the flash algorithm in plain PyTorch) with tile budgets
shrunk so that every shape takes several query and key tiles (the online-softmax rescaling is
what is under test), and for ``triton`` when ``TRITON_INTERPRET=1`` and Triton imports: the
interpreter runs its kernels on CPU tensors, in float32 and float16 (its bfloat16 dot is
unreliable), slowly. Without it those cases skip.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from minillama.attention import (
    AttentionBackend,
    BackendError,
    available_backends,
    flash_loop,
    get_backend,
    register_backend,
    torch_ref,
)
from minillama.attention.flash import FlashAttnBackend
from minillama.attention.torch_ref import flash_attn_varlen_func, flash_attn_with_kvcache

REPO = Path(__file__).resolve().parents[1]

# (absolute, relative) tolerances against the float64 reference, by input dtype.
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 1e-2), torch.float16: (4e-3, 4e-3)}
GQA = [(4, 1), (2, 3), (2, 4)]  # (nheads_k, query heads per kv head)


def _interpreting_triton() -> str | None:
    """None if the triton backend can run here (Triton's interpreter), else why not."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "set TRITON_INTERPRET=1 (with triton installed) to run the triton backend's kernels on CPU"
    reason = available_backends()["triton"]
    if reason is None:
        _patch_interpreter_loop_bounds()
    return reason


def _patch_interpreter_loop_bounds() -> None:
    # Triton 3.6's interpreter turns a loaded scalar into a loop bound with int(array), which
    # NumPy 2.3+ refuses for its 1-element arrays: take the element instead.
    from triton.runtime import interpreter

    if getattr(interpreter, "_minillama_patched", False):
        return
    original = interpreter._patch_lang_tensor

    def patched(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched
    interpreter._minillama_patched = True


TRITON_REASON = _interpreting_triton()
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(TRITON_REASON is not None,
                                                                     reason=str(TRITON_REASON)))]
# Half precision per backend: bfloat16 for torch; float16 for the interpreter (see the docstring).
HALF = {"torch": torch.bfloat16, "triton": torch.float16}


def three_tiles(batch: int, n_q: int, n_keys: int, heads: int, kv_heads: int, head_dim: int, itemsize: int,
                page: int, device: str) -> flash_loop.Plan:
    """A plan that cuts queries and keys (in whole pages) into about three tiles each."""
    pages = max(1, -(-n_keys // page))
    return flash_loop.Plan(q_tile=max(1, -(-n_q // 3)), k_tile=max(1, -(-pages // 3)) * page)


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """About three query and three key tiles per call, so the online-softmax rescaling and the
    causal skip are exercised (``test_plan_tiles`` checks the real plan), and the batched loop
    (the GPU's) instead of the CPU's sequence-by-sequence prefill."""
    monkeypatch.setattr(torch_ref, "plan", three_tiles)
    monkeypatch.setattr(torch_ref, "CPU_BY_SEQUENCE", False)


def dtype_of(backend: str, name: str) -> torch.dtype:
    return torch.float32 if name == "fp32" else HALF[backend]


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------


def ref_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence: q (sq, H, D), k/v (sk, Hk, D) -> out (sq, H, D) float64, lse (H, sq) float64.

    Rows that see no key output 0 and have lse -inf.
    """
    sq, H, D = q.shape
    sk, Hk, _ = k.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if sq == 0 or sk == 0:
        return torch.zeros(sq, H, D, dtype=torch.float64), torch.full((H, sq), float("-inf"), dtype=torch.float64)
    # GQA: query head h reads kv head h // group, so repeat each kv head `group` times.
    group = H // Hk
    kd = k.double().repeat_interleave(group, dim=1)  # (sk, H, D)
    vd = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), kd) * scale  # (H, sq, sk)
    if causal:
        # Bottom-right alignment: the queries are the last sq of the sk positions.
        i = torch.arange(sq)[:, None]
        j = torch.arange(sk)[None, :]
        scores = scores.masked_fill(j > i + sk - sq, float("-inf"))
    # A row with every key masked has softmax NaN (0/0); attention defines it as 0.
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = torch.einsum("hqk,khd->qhd", probs, vd)
    return out, torch.logsumexp(scores, dim=-1)


# ---------------------------------------------------------------------------------------------
# Input builders
# ---------------------------------------------------------------------------------------------


def rand_lengths(gen: torch.Generator, n: int, lo: int, hi: int) -> list[int]:
    return torch.randint(lo, hi + 1, (n,), generator=gen).tolist()


def cu(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)


def randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(dtype)


def build_paged(
    gen: torch.Generator,
    ks: list[torch.Tensor],
    vs: list[torch.Tensor],
    block_size: int,
    pad_entry: int,
    capacity: list[int] | None = None,
    spare: int = 3,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scatter each sequence's rows (n_b, Hk, D) into NaN-filled paged caches through a random block permutation.

    Sequence b gets blocks for ``capacity[b]`` tokens (default: its length). Returns
    (k_cache, v_cache (num_blocks, block_size, Hk, D), block_table (B, max_blocks + 1) int32).
    Unused table entries hold ``pad_entry`` and unused slots hold NaN, so reading either would show.
    """
    Hk, D = ks[0].shape[1:]
    capacity = capacity or [x.shape[0] for x in ks]
    need = [-(-c // block_size) for c in capacity]
    num_blocks = sum(need) + spare
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    k_cache = torch.full((num_blocks, block_size, Hk, D), float("nan"), dtype=ks[0].dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    table = torch.full((len(ks), max(need) + 1), pad_entry, dtype=torch.int32)
    for b in range(len(ks)):
        for i in range(need[b]):
            table[b, i] = blk = perm.pop()
            rows = slice(i * block_size, (i + 1) * block_size)
            n = ks[b][rows].shape[0]
            k_cache[blk, :n] = ks[b][rows]
            v_cache[blk, :n] = vs[b][rows]
    return k_cache, v_cache, table


def check_varlen(
    out: torch.Tensor,
    q: torch.Tensor,
    ks: list[torch.Tensor],
    vs: list[torch.Tensor],
    q_lens: list[int],
    causal: bool,
    scale: float | None,
    lse: torch.Tensor | None = None,
) -> None:
    """Compare flat output (and lse (H, total_q)) with the reference, sequence by sequence."""
    atol, rtol = TOL[q.dtype]
    assert out.shape == q.shape and out.dtype == q.dtype
    start = 0
    for b, n in enumerate(q_lens):
        ref_out, ref_lse = ref_attention(q[start:start + n], ks[b], vs[b], causal, scale)
        torch.testing.assert_close(out[start:start + n].double(), ref_out, atol=atol, rtol=rtol,
                                   msg=lambda m, b=b: f"sequence {b}: {m}")
        if lse is not None:
            got = lse[:, start:start + n].double()
            finite = torch.isfinite(ref_lse)
            torch.testing.assert_close(got[finite], ref_lse[finite], atol=1e-4, rtol=1e-5)
            assert torch.all(got[~finite] == float("inf"))  # flash-attn: +inf for rows with no key
        start += n


# ---------------------------------------------------------------------------------------------
# flash_attn_varlen_func, flat keys
# ---------------------------------------------------------------------------------------------

# name -> (batch, (min, max) query length, (min, max) cached prefix length)
VARLEN_SHAPES = {
    "one-long": (1, (300, 300), (0, 0)),
    "few-mixed": (3, (1, 300), (0, 40)),
    "eight": (8, (1, 64), (0, 64)),
    "thirty-two": (32, (1, 24), (0, 40)),
}


@pytest.mark.parametrize("precision", ["fp32", "half"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("gqa", GQA, ids=lambda g: f"hk{g[0]}x{g[1]}")
@pytest.mark.parametrize("shape", list(VARLEN_SHAPES), ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_flat(backend: str, shape: str, gqa: tuple[int, int], causal: bool, precision: str) -> None:
    dtype = dtype_of(backend, precision)
    batch, (qlo, qhi), (plo, phi) = VARLEN_SHAPES[shape]
    Hk, group = gqa
    H, D = Hk * group, 64
    gen = torch.Generator().manual_seed(sum(map(ord, shape)) * 100 + Hk * 10 + group + causal)
    q_lens = rand_lengths(gen, batch, qlo, qhi)
    k_lens = [n + p for n, p in zip(q_lens, rand_lengths(gen, batch, plo, phi), strict=True)]
    q = randn(gen, sum(q_lens), H, D, dtype=dtype)
    k = randn(gen, sum(k_lens), Hk, D, dtype=dtype)
    v = randn(gen, sum(k_lens), Hk, D, dtype=dtype)
    out, lse, _ = get_backend(backend).varlen(q, k, v, cu(q_lens), cu(k_lens), max(q_lens), max(k_lens),
                                              causal=causal, return_attn_probs=True)
    assert lse.shape == (H, sum(q_lens)) and lse.dtype == torch.float32
    ks, vs = k.split(k_lens), v.split(k_lens)
    check_varlen(out, q, list(ks), list(vs), q_lens, causal, None, lse)


@pytest.mark.parametrize(
    ("head_dim", "scale", "precision"),
    [(128, None, "fp32"), (128, 0.3, "half"), (64, 0.05, "fp32"), (64, 1.0, "half"), (16, None, "fp32")],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_head_dim_and_scale(backend: str, head_dim: int, scale: float | None, precision: str) -> None:
    dtype = dtype_of(backend, precision)
    gen = torch.Generator().manual_seed(7)
    Hk, group = 2, 4
    q_lens = [17, 1, 130, 5]
    k_lens = [17, 40, 130, 9]
    q = randn(gen, sum(q_lens), Hk * group, head_dim, dtype=dtype)
    k = randn(gen, sum(k_lens), Hk, head_dim, dtype=dtype)
    v = randn(gen, sum(k_lens), Hk, head_dim, dtype=dtype)
    for causal in (True, False):
        out = get_backend(backend).varlen(q, k, v, cu(q_lens), cu(k_lens), max(q_lens), max(k_lens),
                                          softmax_scale=scale, causal=causal)
        check_varlen(out, q, list(k.split(k_lens)), list(v.split(k_lens)), q_lens, causal, scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_max_seqlen_larger_than_needed(backend: str) -> None:
    # max_seqlen_* are only bounds: padding further must not change anything.
    fn = get_backend(backend).varlen
    gen = torch.Generator().manual_seed(3)
    q_lens, k_lens = [4, 9], [10, 9]
    q, k, v = randn(gen, 13, 4, 64), randn(gen, 19, 2, 64), randn(gen, 19, 2, 64)
    tight = fn(q, k, v, cu(q_lens), cu(k_lens), 9, 10, causal=True)
    loose = fn(q, k, v, cu(q_lens), cu(k_lens), 50, 70, causal=True)
    torch.testing.assert_close(tight, loose, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_empty_sequences(backend: str) -> None:
    gen = torch.Generator().manual_seed(11)
    q_lens = [3, 0, 5, 0]
    k_lens = [7, 4, 5, 0]  # one empty sequence with cached keys, one with nothing at all
    q = randn(gen, sum(q_lens), 6, 64)
    k, v = randn(gen, sum(k_lens), 2, 64), randn(gen, sum(k_lens), 2, 64)
    out = get_backend(backend).varlen(q, k, v, cu(q_lens), cu(k_lens), max(q_lens), max(k_lens), causal=True)
    assert out.shape == (8, 6, 64)
    check_varlen(out, q, list(k.split(k_lens)), list(v.split(k_lens)), q_lens, True, None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_no_tokens_at_all(backend: str) -> None:
    q = torch.zeros(0, 4, 64)
    k = v = torch.zeros(0, 4, 64)
    zeros = torch.zeros(3, dtype=torch.int32)
    out, lse, _ = get_backend(backend).varlen(q, k, v, zeros, zeros, 0, 0, causal=True, return_attn_probs=True)
    assert out.shape == (0, 4, 64) and lse.shape == (4, 0)


# ---------------------------------------------------------------------------------------------
# flash_attn_varlen_func through a block table (paged prefill, prefix caching)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pad_entry", [-1, 10**6], ids=["pad-minus1", "pad-huge"])
@pytest.mark.parametrize("precision", ["fp32", "half"])
@pytest.mark.parametrize("gqa", GQA, ids=lambda g: f"hk{g[0]}x{g[1]}")
@pytest.mark.parametrize("block_size", [16, 256])
@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_paged(backend: str, block_size: int, gqa: tuple[int, int], precision: str, pad_entry: int) -> None:
    dtype = dtype_of(backend, precision)
    Hk, group = gqa
    H, D = Hk * group, 64
    gen = torch.Generator().manual_seed(block_size * 100 + Hk * 10 + group)
    # Fresh prompts, prompts with a cached prefix, decode-like single tokens, and an empty one.
    q_lens = [37, 1, 120, 1, 0, 9, 1, 260]
    prefix = [0, 57, 300, 0, 12, 256, 511, 16]
    k_lens = [n + p for n, p in zip(q_lens, prefix, strict=True)]
    q = randn(gen, sum(q_lens), H, D, dtype=dtype)
    ks = [randn(gen, n, Hk, D, dtype=dtype) for n in k_lens]
    vs = [randn(gen, n, Hk, D, dtype=dtype) for n in k_lens]
    k_cache, v_cache, table = build_paged(gen, ks, vs, block_size, pad_entry)
    for causal in (True, False):
        out, lse, _ = get_backend(backend).varlen(q, k_cache, v_cache, cu(q_lens), cu(k_lens), max(q_lens),
                                                  max(k_lens), causal=causal, return_attn_probs=True,
                                                  block_table=table)
        assert not out.isnan().any()
        check_varlen(out, q, ks, vs, q_lens, causal, None, lse)


# ---------------------------------------------------------------------------------------------
# flash_attn_with_kvcache
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "half"])
@pytest.mark.parametrize("gqa", GQA, ids=lambda g: f"hk{g[0]}x{g[1]}")
@pytest.mark.parametrize(("batch", "seqlen_q"), [(1, 1), (7, 1), (32, 1), (5, 4)])
@pytest.mark.parametrize("block_size", [16, 256])
@pytest.mark.parametrize("backend", BACKENDS)
def test_kvcache_paged_append(
    backend: str, block_size: int, batch: int, seqlen_q: int, gqa: tuple[int, int], precision: str
) -> None:
    dtype = dtype_of(backend, precision)
    Hk, group = gqa
    H, D = Hk * group, 64
    gen = torch.Generator().manual_seed(block_size + batch * 7 + seqlen_q * 131 + Hk * 3 + group)
    cached = rand_lengths(gen, batch, 0, 300)
    cached[0] = 0  # a sequence with nothing cached yet
    total = [c + seqlen_q for c in cached]
    # Full key/value histories; the first `cached` rows go in the cache, the rest are appended.
    ks = [randn(gen, n, Hk, D, dtype=dtype) for n in total]
    vs = [randn(gen, n, Hk, D, dtype=dtype) for n in total]
    k_cache, v_cache, table = build_paged(gen, [x[:c] for x, c in zip(ks, cached, strict=True)],
                                          [x[:c] for x, c in zip(vs, cached, strict=True)],
                                          block_size, -1, capacity=total)
    q = randn(gen, batch, seqlen_q, H, D, dtype=dtype)
    k_new = torch.stack([x[c:] for x, c in zip(ks, cached, strict=True)])
    v_new = torch.stack([x[c:] for x, c in zip(vs, cached, strict=True)])
    k_before, v_before = k_cache.clone(), v_cache.clone()
    out, lse = get_backend(backend).with_kvcache(q, k_cache, v_cache, k_new, v_new,
                                                 cache_seqlens=torch.tensor(cached, dtype=torch.int32),
                                                 block_table=table, causal=True, return_softmax_lse=True)
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (batch, H, seqlen_q)

    # The cache now holds the new rows at positions cached..cached+seqlen_q-1, and nothing else changed.
    k_expect, v_expect = k_before.clone(), v_before.clone()
    for b in range(batch):
        for p in range(cached[b], total[b]):
            blk, slot = int(table[b, p // block_size]), p % block_size
            k_expect[blk, slot] = ks[b][p]
            v_expect[blk, slot] = vs[b][p]
    torch.testing.assert_close(k_cache, k_expect, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, v_expect, atol=0, rtol=0, equal_nan=True)

    atol, rtol = TOL[dtype]
    for b in range(batch):
        ref_out, ref_lse = ref_attention(q[b], ks[b], vs[b], causal=True)
        torch.testing.assert_close(out[b].double(), ref_out, atol=atol, rtol=rtol)
        torch.testing.assert_close(lse[b].double(), ref_lse, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("seqlen_q", [1, 3])
def test_kvcache_contiguous_append(seqlen_q: int, causal: bool) -> None:
    gen = torch.Generator().manual_seed(seqlen_q)
    batch, seqlen_cache, Hk, group, D = 6, 80, 2, 3, 64
    k_cache = randn(gen, batch + 2, seqlen_cache, Hk, D)  # more cache rows than sequences is allowed
    v_cache = randn(gen, batch + 2, seqlen_cache, Hk, D)
    cached = torch.tensor([0, 5, 77 - seqlen_q, 33, 1, 60], dtype=torch.int32)
    q = randn(gen, batch, seqlen_q, Hk * group, D)
    k_new, v_new = randn(gen, batch, seqlen_q, Hk, D), randn(gen, batch, seqlen_q, Hk, D)
    k_expect, v_expect = k_cache.clone(), v_cache.clone()
    for b in range(batch):
        c = int(cached[b])
        k_expect[b, c:c + seqlen_q] = k_new[b]
        v_expect[b, c:c + seqlen_q] = v_new[b]
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=cached, causal=causal,
                                       return_softmax_lse=True, num_splits=4)
    torch.testing.assert_close(k_cache, k_expect, atol=0, rtol=0)
    torch.testing.assert_close(v_cache, v_expect, atol=0, rtol=0)
    for b in range(batch):
        n = int(cached[b]) + seqlen_q
        ref_out, ref_lse = ref_attention(q[b], k_expect[b, :n], v_expect[b, :n], causal)
        torch.testing.assert_close(out[b].double(), ref_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse[b].double(), ref_lse, atol=1e-4, rtol=1e-5)


def test_kvcache_int_and_default_seqlens() -> None:
    gen = torch.Generator().manual_seed(5)
    batch, seqlen_cache, Hk, H, D = 3, 40, 2, 8, 64
    k_cache, v_cache = randn(gen, batch, seqlen_cache, Hk, D), randn(gen, batch, seqlen_cache, Hk, D)
    q = randn(gen, batch, 2, H, D)
    # No cache_seqlens: every sequence sees the whole cache.
    out = flash_attn_with_kvcache(q, k_cache, v_cache, causal=True)
    for b in range(batch):
        torch.testing.assert_close(out[b].double(), ref_attention(q[b], k_cache[b], v_cache[b], True)[0],
                                   atol=1e-5, rtol=1e-5)
    # An int cache_seqlens applies to every sequence.
    out = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=17, softmax_scale=0.2)
    for b in range(batch):
        ref = ref_attention(q[b], k_cache[b, :17], v_cache[b, :17], False, 0.2)[0]
        torch.testing.assert_close(out[b].double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kvcache_paged_without_append_reads_only_cached_slots(backend: str) -> None:
    gen = torch.Generator().manual_seed(9)
    block_size, Hk, H, D = 16, 1, 4, 64
    cached = [1, 16, 45, 0]
    ks = [randn(gen, n, Hk, D) for n in cached]
    vs = [randn(gen, n, Hk, D) for n in cached]
    k_cache, v_cache, table = build_paged(gen, ks, vs, block_size, -1)
    q = randn(gen, len(cached), 1, H, D)
    out, lse = get_backend(backend).with_kvcache(q, k_cache, v_cache,
                                                 cache_seqlens=torch.tensor(cached, dtype=torch.int32),
                                                 block_table=table, causal=True, return_softmax_lse=True)
    for b in range(len(cached)):
        ref_out, _ = ref_attention(q[b], ks[b], vs[b], True)
        torch.testing.assert_close(out[b].double(), ref_out, atol=1e-5, rtol=1e-5)
    assert torch.all(out[3] == 0) and torch.all(lse[3] == float("inf"))  # no keys at all


# ---------------------------------------------------------------------------------------------
# Query chunking, and shapes known without reading tensor values
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("by_sequence", [False, True], ids=["batched", "by-sequence"])
def test_tiles_match_one_tile(monkeypatch: pytest.MonkeyPatch, by_sequence: bool) -> None:
    """Many query and key tiles (the autouse budgets), CPU sequence by sequence or not, and one tile
    for everything compute the same attention (and the reference's)."""
    gen = torch.Generator().manual_seed(21)
    q_lens, prefix = [70, 1, 33, 0, 5, 130], [0, 40, 16, 3, 100, 7]
    k_lens = [n + p for n, p in zip(q_lens, prefix, strict=True)]
    Hk, H, D = 2, 6, 64
    q = randn(gen, sum(q_lens), H, D)
    ks = [randn(gen, n, Hk, D) for n in k_lens]
    vs = [randn(gen, n, Hk, D) for n in k_lens]
    k_cache, v_cache, table = build_paged(gen, ks, vs, 16, -1)
    args = (q, k_cache, v_cache, cu(q_lens), cu(k_lens), max(q_lens), max(k_lens))
    monkeypatch.setattr(torch_ref, "CPU_BY_SEQUENCE", by_sequence)
    tiled, tiled_lse, _ = flash_attn_varlen_func(*args, causal=True, return_attn_probs=True, block_table=table)
    monkeypatch.setattr(torch_ref, "plan", lambda *a: flash_loop.Plan(1 << 20, 1 << 20))
    whole, whole_lse, _ = flash_attn_varlen_func(*args, causal=True, return_attn_probs=True, block_table=table)
    torch.testing.assert_close(tiled, whole, atol=1e-6, rtol=0)
    torch.testing.assert_close(tiled_lse, whole_lse, atol=1e-6, rtol=0)
    check_varlen(tiled, q, ks, vs, q_lens, True, None, tiled_lse)


def test_causal_tiles_no_query_sees_are_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    """Counted back from each end, query r sees key u iff u >= r: key tiles wholly below a query
    tile's first r are never gathered, whatever the lengths."""
    gathered = []
    real = flash_loop.gather_heads
    monkeypatch.setattr(flash_loop, "gather_heads", lambda rows, idx: gathered.append(idx.shape[-1]) or real(rows, idx))
    gen = torch.Generator().manual_seed(5)
    n, H, Hk, D = 96, 4, 2, 64
    q, k, v = randn(gen, 2 * n, H, D), randn(gen, 2 * n, Hk, D), randn(gen, 2 * n, Hk, D)
    plan = three_tiles(2, n, n, H, Hk, D, 4, 1, "cpu")
    nq, nk = -(-n // plan.q_tile), -(-n // plan.k_tile)
    out = flash_attn_varlen_func(q, k, v, cu([n, n]), cu([n, n]), n, n, causal=True)
    check_varlen(out, q, list(k.split([n, n])), list(v.split([n, n])), [n, n], True, None)
    seen = sum(nk - (r0 // plan.k_tile) for r0 in range(0, n, plan.q_tile))  # tiles from the one holding u = r0
    assert len(gathered) == 2 * seen < 2 * nq * nk  # keys and values
    gathered.clear()
    flash_attn_varlen_func(q, k, v, cu([n, n]), cu([n, n]), n, n, causal=False)
    assert len(gathered) == 2 * nq * nk


def test_decode_over_many_key_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """A decode call whose keys span many tiles and a table with padding entries; ragged lengths."""
    gen = torch.Generator().manual_seed(8)
    cached = [0, 1, 15, 16, 17, 200, 333]
    H, Hk, D = 8, 2, 64
    ks = [randn(gen, c + 1, Hk, D) for c in cached]
    vs = [randn(gen, c + 1, Hk, D) for c in cached]
    k_cache, v_cache, table = build_paged(gen, [x[:c] for x, c in zip(ks, cached, strict=True)],
                                          [x[:c] for x, c in zip(vs, cached, strict=True)], 16, 10**6,
                                          capacity=[c + 1 for c in cached])
    monkeypatch.setattr(torch_ref, "plan", lambda *a: flash_loop.Plan(1, 32))  # 11 key tiles of two pages
    q = randn(gen, len(cached), 1, H, D)
    new_k = torch.stack([x[c:] for x, c in zip(ks, cached, strict=True)])
    new_v = torch.stack([x[c:] for x, c in zip(vs, cached, strict=True)])
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, new_k, new_v,
                                       cache_seqlens=torch.tensor(cached, dtype=torch.int32), block_table=table,
                                       causal=True, return_softmax_lse=True)
    for b in range(len(cached)):
        ref_out, ref_lse = ref_attention(q[b], ks[b], vs[b], True)
        torch.testing.assert_close(out[b].double(), ref_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse[b].double(), ref_lse, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_plan_tiles(device: str) -> None:
    """Key tiles are whole pages within the budget (one page at least), query tiles keep the
    scores within theirs, and a decode has one query tile."""
    kv, sc = flash_loop.KV_TILE_BYTES[device], flash_loop.SCORE_TILE_BYTES[device]
    for batch, n_q, n_keys, page in [(256, 1, 4096, 256), (1, 1, 4096, 256), (4, 2048, 2048, 256), (16, 300, 300, 16),
                                     (2, 4096, 6144, 256), (300, 1, 1 << 16, 256)]:
        p = flash_loop.plan(batch, n_q, n_keys, 32, 8, 64, 2, page, device)
        assert p.k_tile % page == 0 and p.k_tile >= page and p.q_tile >= 1
        assert batch * p.k_tile * 8 * 64 * 2 <= max(kv, batch * page * 8 * 64 * 2)
        assert p.q_tile == 1 or batch * 32 * p.q_tile * p.k_tile * 4 <= sc
        if n_q == 1:
            assert p.q_tile == 1
    assert flash_loop.plan(1, 1, 4096, 32, 8, 64, 2, 256, device).k_tile == 4096  # a small batch: one tile


def test_torch_backend_is_plain_pytorch(monkeypatch: pytest.MonkeyPatch) -> None:
    """No fused SDPA and no Triton behind the torch backend."""
    import torch.nn.functional as F

    def banned(*a, **k):
        raise AssertionError("the torch backend called scaled_dot_product_attention")

    monkeypatch.setattr(F, "scaled_dot_product_attention", banned)
    monkeypatch.setattr(torch_ref, "CPU_BY_SEQUENCE", True)
    gen = torch.Generator().manual_seed(2)
    q, k, v = randn(gen, 9, 4, 64), randn(gen, 9, 2, 64), randn(gen, 9, 2, 64)
    out = flash_attn_varlen_func(q, k, v, cu([4, 5]), cu([4, 5]), 5, 5, causal=True)
    check_varlen(out, q, list(k.split([4, 5])), list(v.split([4, 5])), [4, 5], True, None)
    flash_attn_with_kvcache(q[:2, None], k[None].expand(2, 9, 2, 64).contiguous(),
                            v[None].expand(2, 9, 2, 64).contiguous(), cache_seqlens=5)


def test_no_data_dependent_ops() -> None:
    """Both calls run on the meta device, which has no data.

    Anything that reads tensor values on the host (``.item()``, ``.tolist()``, ``.cpu()``) or
    makes a shape depend on them (``nonzero``, boolean-mask indexing, ``repeat_interleave``
    without ``output_size``) raises there; on CUDA each of those would be a host sync and would
    break CUDA-graph capture of the decode call.
    """
    meta = {"device": "meta", "dtype": torch.bfloat16}
    q = torch.empty(10, 8, 64, **meta)
    flat_kv = torch.empty(30, 2, 64, **meta)
    paged_kv = torch.empty(20, 16, 2, 64, **meta)
    cu_seqlens = torch.empty(4, dtype=torch.int32, device="meta")
    table = torch.empty(3, 5, dtype=torch.int32, device="meta")
    out = flash_attn_varlen_func(q, flat_kv, flat_kv, cu_seqlens, cu_seqlens, 6, 20, causal=True)
    assert out.shape == (10, 8, 64)
    out, lse, _ = flash_attn_varlen_func(q, paged_kv, paged_kv, cu_seqlens, cu_seqlens, 6, 70, causal=True,
                                         block_table=table, return_attn_probs=True)
    assert out.shape == (10, 8, 64) and lse.shape == (8, 10)
    q_dec = torch.empty(3, 1, 8, 64, **meta)
    new = torch.empty(3, 1, 2, 64, **meta)
    seqlens = torch.empty(3, dtype=torch.int32, device="meta")
    out, lse = flash_attn_with_kvcache(q_dec, paged_kv, paged_kv, new, new, cache_seqlens=seqlens,
                                       block_table=table, causal=True, return_softmax_lse=True)
    assert out.shape == (3, 1, 8, 64) and lse.shape == (3, 8, 1)
    flat_cache = torch.empty(3, 40, 2, 64, **meta)
    out = flash_attn_with_kvcache(q_dec, flat_cache, flat_cache, new, new, cache_seqlens=seqlens, causal=True)
    assert out.shape == (3, 1, 8, 64)


# ---------------------------------------------------------------------------------------------
# Fully masked rows
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows_are_zero(backend: str) -> None:
    gen = torch.Generator().manual_seed(1)
    be = get_backend(backend)
    # Causal with more queries than keys: the first sq - sk queries see nothing.
    q_lens, k_lens = [5, 3, 2], [2, 0, 4]
    q = randn(gen, sum(q_lens), 4, 64)
    k, v = randn(gen, sum(k_lens), 2, 64), randn(gen, sum(k_lens), 2, 64)
    out, lse, _ = be.varlen(q, k, v, cu(q_lens), cu(k_lens), 5, 4, causal=True, return_attn_probs=True)
    assert not out.isnan().any() and not lse.isnan().any()
    dead = [0, 1, 2, 5, 6, 7]  # rows 0-2 of sequence 0 and all of sequence 1 (no keys)
    assert torch.all(out[dead] == 0)
    assert torch.all(lse[:, dead] == float("inf"))
    check_varlen(out, q, list(k.split(k_lens)), list(v.split(k_lens)), q_lens, True, None)

    # Same through the KV-cache entry point: 1 cached key, 4 queries.
    kc, vc = randn(gen, 2, 8, 2, 64), randn(gen, 2, 8, 2, 64)
    qd = randn(gen, 2, 4, 4, 64)
    out = be.with_kvcache(qd, kc, vc, cache_seqlens=torch.tensor([1, 0], dtype=torch.int32), causal=True)
    assert not out.isnan().any()
    assert torch.all(out[0, :3] == 0) and torch.all(out[1] == 0) and torch.any(out[0, 3] != 0)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def _varlen_args() -> tuple:
    q, k, v = torch.zeros(4, 4, 64), torch.zeros(4, 2, 64), torch.zeros(4, 2, 64)
    c = torch.tensor([0, 4], dtype=torch.int32)
    return q, k, v, c, c, 4, 4


def _kvcache_args() -> tuple:
    return torch.zeros(1, 1, 4, 64), torch.zeros(1, 8, 2, 64), torch.zeros(1, 8, 2, 64)


@pytest.mark.parametrize(
    ("option", "value"),
    [("dropout_p", 0.1), ("window_size", (16, 0)), ("softcap", 30.0), ("alibi_slopes", torch.ones(4))],
)
def test_varlen_rejects_unsupported_options(option: str, value: object) -> None:
    with pytest.raises(BackendError, match=rf"flash_attn_varlen_func: {option}=.* not supported.*: leave {option}"):
        flash_attn_varlen_func(*_varlen_args(), **{option: value})


@pytest.mark.parametrize(
    ("option", "value"),
    [("rotary_cos", torch.ones(8, 32)), ("rotary_sin", torch.ones(8, 32)),
     ("cache_batch_idx", torch.zeros(1, dtype=torch.int32)), ("cache_leftpad", torch.zeros(1, dtype=torch.int32)),
     ("window_size", [8, 0]), ("softcap", 1.0), ("alibi_slopes", torch.ones(4))],
)
def test_kvcache_rejects_unsupported_options(option: str, value: object) -> None:
    with pytest.raises(BackendError, match=rf"flash_attn_with_kvcache: {option}=.* not supported"):
        flash_attn_with_kvcache(*_kvcache_args(), **{option: value})
    try:
        flash_attn_with_kvcache(*_kvcache_args(), **{option: value})
    except BackendError as e:
        assert "\n" not in str(e)


def test_accepted_no_op_options() -> None:
    # Defaults passed explicitly, deterministic, and num_splits are fine.
    flash_attn_varlen_func(*_varlen_args(), dropout_p=0, window_size=[-1, -1], deterministic=True)
    flash_attn_with_kvcache(*_kvcache_args(), num_splits=8, rotary_interleaved=False, softcap=0)


def test_argument_errors() -> None:
    q, k, v, c, _, sq, sk = _varlen_args()
    with pytest.raises(BackendError, match="cu_seqlens_q must have dtype torch.int32"):
        flash_attn_varlen_func(q, k, v, c.long(), c, sq, sk)
    with pytest.raises(BackendError, match="multiple of nheads_k"):
        flash_attn_varlen_func(torch.zeros(4, 3, 64), k, v, c, c, sq, sk)
    with pytest.raises(BackendError, match="one dtype"):
        flash_attn_varlen_func(q.double(), k, v, c, c, sq, sk)
    with pytest.raises(BackendError, match="block_table must have dtype torch.int32"):
        flash_attn_varlen_func(q, torch.zeros(2, 16, 2, 64), torch.zeros(2, 16, 2, 64), c, c, sq, sk,
                               block_table=torch.zeros(1, 1, dtype=torch.int64))
    qd, kc, vc = _kvcache_args()
    with pytest.raises(BackendError, match="needs cache_seqlens"):
        flash_attn_with_kvcache(qd, kc, vc, torch.zeros(1, 1, 2, 64), torch.zeros(1, 1, 2, 64))
    with pytest.raises(BackendError, match="cache_seqlens must have dtype torch.int32"):
        flash_attn_with_kvcache(qd, kc, vc, cache_seqlens=torch.zeros(1, dtype=torch.int64))
    with pytest.raises(BackendError, match="k and v must be given together"):
        flash_attn_with_kvcache(qd, kc, vc, torch.zeros(1, 1, 2, 64), cache_seqlens=0)
    for message in _collect_messages():
        assert "\n" not in message


def _collect_messages() -> list[str]:
    messages = []
    for call in (lambda: get_backend("nope"), lambda: get_backend("flash-attn"),
                 lambda: flash_attn_varlen_func(*_varlen_args(), softcap=2.0)):
        try:
            call()
        except BackendError as e:
            messages.append(str(e))
    return messages


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


def _flash_importable() -> bool:
    try:
        import flash_attn  # noqa: F401
    except Exception:
        return False
    return True


def test_get_backend_torch() -> None:
    backend = get_backend("torch")
    assert backend.name == "torch" and backend.block_size_multiple == 1
    assert backend.varlen is flash_attn_varlen_func and backend.with_kvcache is flash_attn_with_kvcache
    assert get_backend(" Torch ") is backend
    backend.check(64, torch.bfloat16, torch.device("cpu"))
    with pytest.raises(BackendError, match="floating-point dtype"):
        backend.check(64, torch.int8, torch.device("cpu"))


def test_get_backend_unknown() -> None:
    with pytest.raises(BackendError, match=r"^unknown attention backend 'nope': choose one of torch, triton, flash-attn$"):
        get_backend("nope")


@pytest.mark.skipif(_flash_importable(), reason="flash_attn is importable here")
@pytest.mark.parametrize("name", ["flash-attn", "flash_attn"])
def test_get_backend_flash_missing(name: str) -> None:
    with pytest.raises(BackendError, match=r"needs the flash_attn package, which is not importable here \(.+\): "
                                           r"install flash-attn on a CUDA machine or use --backend torch"):
        get_backend(name)


def test_available_backends() -> None:
    available = available_backends()
    assert list(available)[:3] == ["torch", "triton", "flash-attn"]
    assert available["torch"] is None
    if not (torch.cuda.is_available() and _flash_importable()):
        reason = available["flash-attn"]
        assert isinstance(reason, str) and reason and "\n" not in reason
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        reason = available["triton"]  # no triton package, or no CUDA device
        assert isinstance(reason, str) and ("triton package" in reason or "only on CUDA" in reason)
        assert "\n" not in reason


def test_triton_backend_check() -> None:
    """Unavailable with one clear line where it cannot run; the engine attributes it declares."""
    try:
        triton = get_backend("triton")
    except BackendError as e:
        assert str(e) == ("attention backend 'triton' needs the triton package, which is not importable here: "
                          "install triton on a CUDA machine or use --backend torch")
        return
    assert not triton.pads_queries and triton.graph_decode_max_batch(1 << 20) >= 512
    with pytest.raises(BackendError, match="power-of-two head_dim from 16 to 256, this model has 96"):
        triton.check(96, torch.bfloat16, torch.device("cuda"))
    with pytest.raises(BackendError, match="supports float16/bfloat16/float32, got torch.float64"):
        triton.check(64, torch.float64, torch.device("cuda"))
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(BackendError, match="runs only on CUDA devices, got device 'cpu'"):
            triton.check(64, torch.bfloat16, torch.device("cpu"))


def test_engine_attributes() -> None:
    """What the engine reads instead of backend names: padded queries and the graph batch cap."""
    torch_backend = get_backend("torch")
    assert torch_backend.pads_queries
    assert torch_backend.graph_decode_max_batch(4096) == torch_ref.GRAPH_KEYS // 4096 >= 256
    assert torch_backend.graph_decode_max_batch(1 << 40) == 1
    flash = FlashAttnBackend(name="flash-attn", varlen=flash_attn_varlen_func,
                             with_kvcache=flash_attn_with_kvcache, block_size_multiple=256)
    assert not flash.pads_queries and flash.graph_decode_max_batch(1 << 20) >= 512


def test_register_backend() -> None:
    custom = AttentionBackend(name="Shadow_Test", varlen=flash_attn_varlen_func,
                              with_kvcache=flash_attn_with_kvcache, block_size_multiple=4)
    register_backend(custom)
    assert get_backend("shadow-test") is custom
    assert "shadow-test" in available_backends()


def test_flash_backend_check_rejects() -> None:
    # Built directly, so this runs without flash_attn installed.
    flash = FlashAttnBackend(name="flash-attn", varlen=flash_attn_varlen_func,
                             with_kvcache=flash_attn_with_kvcache, block_size_multiple=256)
    cuda = torch.device("cuda")
    with pytest.raises(BackendError, match="only on CUDA devices, got device 'cpu'"):
        flash.check(64, torch.bfloat16, torch.device("cpu"))
    with pytest.raises(BackendError, match="only float16/bfloat16, got torch.float32"):
        flash.check(64, torch.float32, cuda)
    with pytest.raises(BackendError, match="at most 256, this model has 320"):
        flash.check(320, torch.bfloat16, cuda)
    with pytest.raises(BackendError, match="multiple of 8"):
        flash.check(60, torch.float16, cuda)


def test_import_does_not_import_flash_attn_or_triton() -> None:
    # A meta-path hook records any attempt to import flash_attn or triton while minillama.attention
    # and the torch backend load. The minillama package is stubbed so only the attention package runs.
    script = textwrap.dedent(f"""
        import sys, types
        attempts = []
        class Spy:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("flash_attn", "triton"):
                    attempts.append(name)
                return None
        sys.meta_path.insert(0, Spy())
        pkg = types.ModuleType("minillama")
        pkg.__path__ = [{str(REPO / "minillama")!r}]
        sys.modules["minillama"] = pkg
        import minillama.attention as A
        A.get_backend("torch")
        import minillama.attention.flash
        assert not attempts, attempts
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO, timeout=120)
