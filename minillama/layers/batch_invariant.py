"""Batch-invariant ops: each row's result does not depend on the other rows, their number, or its place.

``LLM(..., batch_invariant=True)`` sets ``Context.batch_invariant`` for every step, and the layers
route through these instead of their usual kernels where the usual kernel is not row-invariant.
What varies with the batch was measured on CPU (float32, MKL, AVX512, torch 2.13): a row of
``F.linear`` at M = 1..3 rows differs from the same row at M >= 4, and the last row of an odd M
differs too (small-M and edge kernels); RMSNorm (``F.rms_norm``), the rotary, the residual adds and
argmax are row-wise and came out identical at every M; ``torch.sigmoid`` / ``F.silu`` compute
elements in the scalar tail of a vectorized loop differently from the vector body (about 4% of
values differ by an ulp), so which elements land in the tail (it depends on the number of rows and
threads) can change a row; ``torch.exp`` gives the same bits on both paths. Attention varies with
the padding, the number of keys of the other requests and whether a row is computed in a prefill
chunk or a decode step (``invariant_attention``). On CUDA, cuBLAS picks its kernel (tile shape,
split-K) from M, so a row's sum order depends on the batch size.

The fixes: matmuls run over tiles of exactly ``ROW_TILE`` rows (the last tile padded with zeros),
so every row goes through one kernel of one shape (a tile's rows do not influence each other, and a
row's place in its tile does not matter: measured, and true of GEMM kernels that give each output
element its own fixed sum over K); SiLU is ``x / (1 + exp(-x))`` from exactly rounded ops and exp.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Rows per matmul tile. CPU: 1, every row a matrix-vector product, as an unbatched decode step computes it
#: (a prefill pays: measured 2-6x per matmul at 8-43 rows); CUDA: one decode batch (cuBLAS is weight-bound there).
ROW_TILE = {"cpu": 1, "cuda": 128}
#: Batched-matmul items per call in ``fixed_bmm`` on CUDA (cuBLAS picks kernels by the item count too).
ITEM_TILE = 1024


def row_tile(device: torch.device) -> int:
    return ROW_TILE.get(device.type, ROW_TILE["cpu"])


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` contiguous with zero rows appended up to ``rows`` (one fixed memory layout for every call)."""
    if x.shape[0] == rows:
        return x.contiguous()
    out = x.new_zeros(rows, *x.shape[1:])
    out[: x.shape[0]] = x
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x @ weight.T`` for ``x`` (..., K), computed over tiles of exactly ``ROW_TILE`` rows.

    CPU: one batched matmul over the tiles (MKL computes each item alone: measured, the same bits
    whatever the number of items). CUDA: one ``torch.mm`` per tile, so cuBLAS sees one shape only.
    ``out_dtype`` float32 with half inputs on CUDA gives float32 results from the matrix units.
    """
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    rows, tile = x2.shape[0], row_tile(x.device)
    n = max(1, -(-rows // tile))
    xp = _pad_rows(x2, n * tile)
    if x.is_cuda:
        wt = weight.t()
        if out_dtype is not None and out_dtype != x.dtype:
            parts = [torch.mm(xp[i * tile:(i + 1) * tile], wt, out_dtype=out_dtype) for i in range(n)]
        else:
            parts = [torch.mm(xp[i * tile:(i + 1) * tile], wt) for i in range(n)]
        out = torch.cat(parts) if n > 1 else parts[0]
    else:
        out = torch.bmm(xp.view(n, tile, k), weight.t().expand(n, k, weight.shape[0])).view(n * tile, -1)
        if out_dtype is not None:
            out = out.to(out_dtype)
    return out[:rows].view(*lead, weight.shape[0])


def fixed_bmm(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``a @ b`` for (I, M, K) x (I, K, N) such that every item meets one kernel of one shape and layout.

    Inputs are made contiguous first (a transposed operand changes MKL's sums: measured). On CUDA the
    items go in calls of exactly ``ITEM_TILE`` (the last padded); half inputs sum in float32 on the
    matrix units. On CPU one call (MKL: the same bits whatever the item count, measured); inputs are
    upcast to ``out_dtype``.
    """
    if not a.is_cuda:
        return torch.bmm(a.to(out_dtype).contiguous(), b.to(out_dtype).contiguous())
    items = a.shape[0]
    n = max(1, -(-items // ITEM_TILE))
    half = a.dtype in (torch.float16, torch.bfloat16) and a.dtype == b.dtype
    if not half:
        a, b = a.to(out_dtype), b.to(out_dtype)
    a, b = _pad_rows(a, n * ITEM_TILE), _pad_rows(b, n * ITEM_TILE)
    t = ITEM_TILE
    parts = [torch.bmm(a[i * t:(i + 1) * t], b[i * t:(i + 1) * t], out_dtype=out_dtype) if half
             else torch.bmm(a[i * t:(i + 1) * t], b[i * t:(i + 1) * t]) for i in range(n)]
    return (torch.cat(parts) if n > 1 else parts[0])[:items]


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (``x = cat([gate, up], -1)``) from ops that round the same on every element."""
    gate, up = x.chunk(2, -1)
    if x.is_cuda:  # CUDA elementwise kernels use one code path for every element
        return F.silu(gate) * up
    return gate / (1 + torch.exp(-gate)) * up


def tree_sum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum over ``dim`` in a fixed pairwise order (elementwise adds of halves, zero-padded to a power of
    two): the same bits for a row whatever the tensor's other dimensions, on any device."""
    dim = dim % x.dim()
    n = x.shape[dim]
    size = 1 << max(0, (n - 1).bit_length())
    if size != n:
        pad = list(x.shape)
        pad[dim] = size - n
        x = torch.cat([x, x.new_zeros(pad)], dim)
    while x.shape[dim] > 1:
        half = x.shape[dim] // 2
        x = x.narrow(dim, 0, half) + x.narrow(dim, half, half)
    return x.squeeze(dim)
