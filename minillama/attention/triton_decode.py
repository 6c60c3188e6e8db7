"""Paged decode attention as one Triton kernel: the ``triton`` backend's decode.

Plain PyTorch has to copy every sequence's keys out of the paged cache before its matrix
products (one extra write and read of the keys). This kernel reads each key and value once,
straight through the block table, like flash-attn's decode kernel, and computes what the torch
backend computes for one query per sequence: float32 scores and softmax, probabilities rounded to
the value dtype before ``p @ v`` (as flash-attn does), 0 for a sequence with no key, log-sum-exp
``+inf`` then.

One program handles one (sequence, kv head): its G query heads are the rows of a small matrix
(padded to 16, the smallest ``tl.dot``), so K/V are read once for the whole group (GQA). Keys
are visited in tiles of ``BLOCK_N`` with the online softmax; each key's cache block is looked up
on its own, so any page size works.
"""

from __future__ import annotations

import os

import torch

try:  # absent on CPU-only installs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1``: Triton then runs kernels on CPU tensors (slowly; for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def covers(head_dim: int, device: torch.device) -> bool:
    """True when Triton kernels can run heads of ``head_dim`` on ``device``.

    That needs an importable Triton, a CUDA device (or the interpreter), and a power-of-two head
    size from 16 to 256 (``tl.dot`` and ``tl.arange`` shapes).
    """
    on_device = torch.device(device).type == "cuda" or interpreting()
    return triton is not None and on_device and 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0


def usable(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """True if this call can use the kernels (see ``covers``; one dtype, unit stride in D)."""
    return (covers(q.shape[-1], q.device) and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
            and q.dtype in (torch.float16, torch.bfloat16, torch.float32) and k_cache.dtype == q.dtype
            and v_cache.dtype == q.dtype)


if triton is not None:

    @triton.jit
    def _paged_decode_kernel(
        Q, K, V, Out, Lse, BlockTable, SeqLens, scale,
        stride_qb, stride_qh,
        stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vs, stride_vh,
        stride_ob, stride_oh,
        stride_bt,
        G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        rows = tl.arange(0, GP)  # query heads kvh * G + row; rows >= G are padding
        dims = tl.arange(0, D)
        row_ok = rows < G
        heads = kvh * G + rows
        q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + dims[None, :], mask=row_ok[:, None], other=0.0)
        seqlen = tl.load(SeqLens + b)

        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        for start in range(0, seqlen, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            key_ok = n < seqlen
            # int64: a large cache's offsets (block * stride) overflow 32 bits
            block = tl.load(BlockTable + b * stride_bt + n // PAGE, mask=key_ok, other=0).to(tl.int64)
            slot = n % PAGE
            k = tl.load(K + block[:, None] * stride_kb + slot[:, None] * stride_ks + kvh * stride_kh + dims[None, :],
                        mask=key_ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # (GP, BLOCK_N), float32
            s = tl.where(key_ok[None, :], s, float("-inf"))
            # Every tile holds at least one real key, so m_new is finite from the first tile on.
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + block[:, None] * stride_vb + slot[:, None] * stride_vs + kvh * stride_vh + dims[None, :],
                        mask=key_ok[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new

        has_key = l_i > 0
        out = tl.where(has_key[:, None], acc / tl.where(has_key, l_i, 1.0)[:, None], 0.0)
        tl.store(Out + b * stride_ob + heads[:, None] * stride_oh + dims[None, :], out.to(Out.dtype.element_ty),
                 mask=row_ok[:, None])
        lse = tl.where(has_key, m_i + tl.log(tl.where(has_key, l_i, 1.0)), float("inf"))
        tl.store(Lse + b * (G * tl.num_programs(1)) + heads, lse, mask=row_ok)


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                 seqlens: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One query per sequence over a paged cache.

    q ``(batch, 1, H, D)``; caches ``(num_blocks, page, Hk, D)`` with unit stride in D;
    block_table int32 ``(batch, max_blocks)``; seqlens int ``(batch,)`` keys each sequence sees.
    Returns out ``(batch, 1, H, D)`` in q's dtype and float32 lse ``(batch, H, 1)``.
    """
    B, _, H, D = q.shape
    Hk = k_cache.shape[2]
    G = H // Hk
    q = q if q.stride(-1) == 1 else q.contiguous()
    # The kernel steps through a table row and the lengths with unit stride.
    block_table = block_table if block_table.stride(-1) == 1 else block_table.contiguous()
    seqlens = seqlens.contiguous()
    out = torch.empty_like(q)
    lse = torch.empty(B, H, 1, dtype=torch.float32, device=q.device)
    # Tiles of 64 keys keep a (64, D) K and V tile in registers for D up to 128.
    _paged_decode_kernel[(B, Hk)](
        q, k_cache, v_cache, out, lse, block_table, seqlens, scale,
        q.stride(0), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(2),
        block_table.stride(0),
        G=G, GP=max(16, triton.next_power_of_2(G)), D=D, PAGE=k_cache.shape[1], BLOCK_N=64,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # float32 stays float32 (no TF32)
        num_warps=4, num_stages=2,  # on the H200, 2 stages beat the default 3 by ~5% for head_dim 64
    )
    return out, lse
