"""Fused elementwise kernels for the GPU: RMSNorm (with the residual add), SiLU-and-mul, rotary,
the K/V store into the paged cache, and greedy sampling's argmax.

A decode step at large batch spends about as long in hundreds of tiny elementwise kernels as in
its matrix products' weight reads: PyTorch runs ``x + residual``, RMSNorm's square, mean, rsqrt
and two multiplies, rotary's halves, SiLU and the multiply each as its own kernel. Each function
here is one kernel doing the same arithmetic in the same order (float32 inside, rounded to the
input dtype where PyTorch rounds), so outputs match the PyTorch layers up to float32 contraction.

Used only for CUDA tensors when Triton imports and ``MINILLAMA_TRITON_OPS`` is not ``0``; the
layers keep their plain PyTorch code for everything else (CPU above all).
"""

from __future__ import annotations

import os

import torch

try:  # absent on CPU-only installs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None


def switched_on() -> bool:
    """True unless ``MINILLAMA_TRITON_OPS=0`` asks for plain PyTorch layers."""
    return os.environ.get("MINILLAMA_TRITON_OPS", "1") != "0"


def covers(x: torch.Tensor) -> bool:
    """True when ``x``'s elementwise work goes to these kernels (see the module docstring)."""
    return (triton is not None and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and switched_on())


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(X, R, W, Out, ROut, stride_x, stride_r, stride_o, stride_ro, N, eps,
                         HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        ok = cols < N
        x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0)
        if HAS_RESIDUAL:  # h = x + residual, rounded like PyTorch's add, and kept for the next layer
            x = (x.to(tl.float32) + tl.load(R + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32))
            x = x.to(ROut.dtype.element_ty)
            tl.store(ROut + row * stride_ro + cols, x, mask=ok)
        h = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(h * h, 0) / N + eps)
        y = (h * rstd).to(Out.dtype.element_ty)  # back to the input dtype, then the weight (as HF does)
        w = tl.load(W + cols, mask=ok, other=0.0)
        tl.store(Out + row * stride_o + cols, (w.to(tl.float32) * y.to(tl.float32)).to(Out.dtype.element_ty),
                 mask=ok)

    @triton.jit
    def _silu_and_mul_kernel(X, Out, stride_x, stride_o, N, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < N
        g = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(X + row * stride_x + N + cols, mask=ok, other=0.0).to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(Out.dtype.element_ty).to(tl.float32)  # F.silu rounds its result
        tl.store(Out + row * stride_o + cols, (act * u).to(Out.dtype.element_ty), mask=ok)

    @triton.jit
    def _rotary_kernel(X, Out, CosSin, Pos, stride_xt, stride_xh, stride_ot, stride_oh, stride_cs,
                       HALF: tl.constexpr, BLOCK_H: tl.constexpr, H: tl.constexpr):
        t = tl.program_id(0)
        heads = tl.arange(0, BLOCK_H)
        dims = tl.arange(0, HALF)
        ok = (heads < H)[:, None]
        pos = tl.load(Pos + t)
        cos = tl.load(CosSin + pos * stride_cs + dims)[None, :]
        sin = tl.load(CosSin + pos * stride_cs + HALF + dims)[None, :]
        base = X + t * stride_xt + heads[:, None] * stride_xh + dims[None, :]
        x1 = tl.load(base, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(base + HALF, mask=ok, other=0.0).to(tl.float32)
        out = Out + t * stride_ot + heads[:, None] * stride_oh + dims[None, :]
        tl.store(out, (x1 * cos - x2 * sin).to(Out.dtype.element_ty), mask=ok)
        tl.store(out + HALF, (x2 * cos + x1 * sin).to(Out.dtype.element_ty), mask=ok)

    @triton.jit
    def _store_kv_kernel(K, V, KCache, VCache, Slots, stride_kt, stride_kh, stride_vt, stride_vh,
                         stride_kb, stride_kp, stride_kch, stride_vb, stride_vp, stride_vch,
                         PAGE: tl.constexpr, H: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr):
        t = tl.program_id(0)
        slot = tl.load(Slots + t)
        if slot >= 0:  # -1: padding row of a captured graph, nothing to write
            block, off = slot // PAGE, slot % PAGE
            heads = tl.arange(0, BLOCK_H)[:, None]
            dims = tl.arange(0, D)[None, :]
            ok = heads < H
            k = tl.load(K + t * stride_kt + heads * stride_kh + dims, mask=ok)
            v = tl.load(V + t * stride_vt + heads * stride_vh + dims, mask=ok)
            tl.store(KCache + block * stride_kb + off * stride_kp + heads * stride_kch + dims, k, mask=ok)
            tl.store(VCache + block * stride_vb + off * stride_vp + heads * stride_vch + dims, v, mask=ok)

    @triton.jit
    def _argmax_kernel(X, OutV, OutI, V, stride_x, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
        # One program scans CHUNK entries of a row; each lane keeps its first maximum.
        row, chunk = tl.program_id(0), tl.program_id(1)
        best_v = tl.full((BLOCK,), float("-inf"), tl.float32)
        best_i = tl.zeros((BLOCK,), tl.int32) + chunk * CHUNK
        for start in range(chunk * CHUNK, chunk * CHUNK + CHUNK, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(X + row * stride_x + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            better = x > best_v
            best_v = tl.where(better, x, best_v)
            best_i = tl.where(better, cols, best_i)
        m = tl.max(best_v, 0)
        first = tl.min(tl.where(best_v == m, best_i, 2147483647), 0)
        tl.store(OutV + row * tl.num_programs(1) + chunk, m)
        tl.store(OutI + row * tl.num_programs(1) + chunk, first)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a 2-D (rows, features) view with unit stride in features (a copy only if needed)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``weight * rmsnorm(h)`` with ``h = x`` or ``h = x + residual``; returns (out, h or None)."""
    xr = _rows(x)
    rows, n = xr.shape
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    rr = _rows(residual) if residual is not None else xr
    h = torch.empty_like(out) if residual is not None else out
    if rows:
        _rms_norm_kernel[(rows,)](xr, rr, weight, out, h, xr.stride(0), rr.stride(0), out.stride(0), h.stride(0),
                                  n, eps, HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(n),
                                  num_warps=8 if n >= 2048 else 4)
    shape = x.shape
    return out.view(shape), (h.view(shape) if residual is not None else None)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``x = cat([gate, up], -1)``."""
    xr = _rows(x)
    rows, n = xr.shape[0], xr.shape[1] // 2
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(n))
    if rows:
        _silu_and_mul_kernel[(rows, triton.cdiv(n, block))](xr, out, xr.stride(0), out.stride(0), n, BLOCK=block)
    return out.view(*x.shape[:-1], n)


def rotary_covers(x: torch.Tensor) -> bool:
    """True when ``rotary`` can take ``x`` (tokens, heads, head_dim): see ``covers``; half a head a power of 2."""
    half = x.shape[-1] // 2
    return covers(x) and half > 0 and half & (half - 1) == 0


def rotary(x: torch.Tensor, cos_sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary of ``x`` (tokens, heads, head_dim) by ``cos_sin[positions]`` (cos | sin halves)."""
    T, H, D = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty((T, H, D), dtype=x.dtype, device=x.device)
    if T:
        _rotary_kernel[(T,)](x, out, cos_sin, positions, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
                             cos_sin.stride(0), HALF=D // 2, BLOCK_H=triton.next_power_of_2(H), H=H)
    return out


def store_kv_covers(k: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """True when ``store_kv`` can take these: see ``covers``; same dtype, head_dim a power of 2."""
    d = k.shape[-1]
    return covers(k) and k.dtype == k_cache.dtype and d & (d - 1) == 0 and k.stride(-1) == k_cache.stride(-1) == 1


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """``k``/``v`` (tokens, kv_heads, head_dim) into the caches (blocks, page, kv_heads, head_dim) at
    each token's slot (block * page + offset); slot -1 writes nothing. One kernel for both."""
    T, H, D = k.shape
    if v.stride(-1) != 1:
        v = v.contiguous()
    if T:
        _store_kv_kernel[(T,)](k, v, k_cache, v_cache, slot_mapping.contiguous(), k.stride(0), k.stride(1),
                               v.stride(0), v.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                               v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
                               PAGE=k_cache.shape[1], H=H, D=D, BLOCK_H=triton.next_power_of_2(H))


def argmax(x: torch.Tensor, chunks: int = 4, block: int = 2048) -> torch.Tensor:
    """``x.argmax(-1)`` for finite (rows, vocab) logits, int64, the first index among equal maxima.

    ``chunks`` programs per row each find their part's first maximum (one read of the logits at
    full bandwidth, where PyTorch's reduction runs one block per row); a tiny argmax over the
    parts then picks the first part holding the row's maximum. NaN is not treated as a maximum.
    """
    x = _rows(x)
    rows, vocab = x.shape
    chunk = triton.cdiv(triton.cdiv(vocab, chunks), block) * block
    parts = triton.cdiv(vocab, chunk)
    part_max = torch.empty(rows, parts, dtype=torch.float32, device=x.device)
    part_idx = torch.empty(rows, parts, dtype=torch.int32, device=x.device)
    if rows:
        _argmax_kernel[(rows, parts)](x, part_max, part_idx, vocab, x.stride(0), CHUNK=chunk, BLOCK=block,
                                      num_warps=8)
    best = part_max.argmax(-1, keepdim=True)
    return part_idx.gather(1, best).squeeze(1).long()
