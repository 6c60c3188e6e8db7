"""Ragged (varlen) prefill attention as one Triton kernel: the ``triton`` backend's prefill.

FlashAttention-2's forward pass, one program per (block of ``BLOCK_M`` queries of a sequence,
sequence, query head): the queries stay in registers while the keys stream past in tiles of
``BLOCK_N``, from flat ``(total_k, Hk, D)`` keys or through the block table of a paged cache,
with the online softmax (running max, running sum, rescaled accumulator). A sequence's programs
past its own queries return at once, so a ragged batch costs what its real rows cost (no
padding to the longest sequence), and with ``causal`` a program stops at the last key its
queries can see (bottom-right alignment: query ``i`` of ``sq`` sees keys ``j <= i + sk - sq``).
Numbers as in the torch backend: float32 scores and softmax, probabilities rounded to the value
dtype before ``P @ V``, 0 and log-sum-exp +inf for a row that sees no key.
"""

from __future__ import annotations

import torch

from minillama.attention.triton_decode import triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _prefill_kernel(
        Q, K, V, Out, Lse, CuQ, KStart, KLen, BlockTable, scale,
        stride_qt, stride_qh,
        stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vs, stride_vh,
        stride_ot, stride_oh,
        stride_bt, stride_lse,
        G: tl.constexpr, D: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr, CAUSAL: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    ):
        mb = tl.program_id(0)
        b = tl.program_id(1)
        h = tl.program_id(2)
        q_start = tl.load(CuQ + b)
        q_len = tl.load(CuQ + b + 1) - q_start
        if mb * BLOCK_M >= q_len:  # this sequence has fewer query blocks
            return
        k_len = tl.load(KLen + b)
        k_start = tl.load(KStart + b).to(tl.int64)
        kvh = h // G  # grouped-query attention
        rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < q_len
        dims = tl.arange(0, D)
        q_rows = (q_start + rows).to(tl.int64)  # int64: offsets of a long batch overflow 32 bits
        q = tl.load(Q + q_rows[:, None] * stride_qt + h * stride_qh + dims[None, :], mask=row_ok[:, None], other=0.0)

        shift = k_len - q_len  # bottom-right causal: query i sees keys j <= i + shift
        hi = k_len
        if CAUSAL:
            hi = tl.minimum(k_len, (mb + 1) * BLOCK_M + shift)  # past the block's last visible key
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        for start in range(0, hi, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            key_ok = n < k_len
            if PAGED:
                block = tl.load(BlockTable + b * stride_bt + n // PAGE, mask=key_ok, other=0).to(tl.int64)
                k_off = block * stride_kb + (n % PAGE) * stride_ks
                v_off = block * stride_vb + (n % PAGE) * stride_vs
            else:
                k_off = (k_start + n) * stride_kb
                v_off = (k_start + n) * stride_vb
            k = tl.load(K + k_off[:, None] + kvh * stride_kh + dims[None, :], mask=key_ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # (BLOCK_M, BLOCK_N) float32
            seen = key_ok[None, :]
            if CAUSAL:
                seen = seen & (n[None, :] <= rows[:, None] + shift)
            s = tl.where(seen, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row that has seen no key yet keeps m = -inf: subtract 0 instead (exp(-inf) = 0, not NaN).
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_use[:, None])
            alpha = tl.exp(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + v_off[:, None] + kvh * stride_vh + dims[None, :], mask=key_ok[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new

        has_key = l_i > 0
        out = tl.where(has_key[:, None], acc / tl.where(has_key, l_i, 1.0)[:, None], 0.0)
        tl.store(Out + q_rows[:, None] * stride_ot + h * stride_oh + dims[None, :], out.to(Out.dtype.element_ty),
                 mask=row_ok[:, None])
        lse = tl.where(has_key, m_i + tl.log(tl.where(has_key, l_i, 1.0)), float("inf"))
        tl.store(Lse + h * stride_lse + q_rows, lse, mask=row_ok)


def varlen_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                   cu_seqlens_k: torch.Tensor, max_seqlen_q: int, scale: float, causal: bool,
                   block_table: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of a ragged batch: q ``(total_q, H, D)``; k/v flat ``(total_k, Hk, D)`` or, with
    ``block_table``, paged ``(num_blocks, page, Hk, D)``; all with unit stride in D.

    Returns out ``(total_q, H, D)`` in q's dtype and float32 lse ``(H, total_q)``.
    """
    total_q, H, D = q.shape
    Hk = k.shape[-2]
    batch = cu_seqlens_q.shape[0] - 1
    out = torch.empty_like(q)
    lse = torch.empty(H, total_q, dtype=torch.float32, device=q.device)
    if total_q == 0 or batch == 0 or max_seqlen_q == 0:
        return out.zero_(), lse.fill_(float("inf"))
    cu_k = cu_seqlens_k.long()
    k_start, k_len = cu_k[:-1].contiguous(), (cu_k[1:] - cu_k[:-1]).contiguous()
    paged = block_table is not None
    if paged:
        table = block_table if block_table.stride(-1) == 1 else block_table.contiguous()
        (sk_b, sk_s, sk_h, _), (sv_b, sv_s, sv_h, _) = k.stride(), v.stride()
    else:
        table = cu_seqlens_k  # unused
        (sk_b, sk_h, _), (sv_b, sv_h, _) = k.stride(), v.stride()
        sk_s = sv_s = 0
    block_m = 64
    grid = (triton.cdiv(max_seqlen_q, block_m), batch, H)
    _prefill_kernel[grid](
        q, k, v, out, lse, cu_seqlens_q, k_start, k_len, table, scale,
        q.stride(0), q.stride(1),
        sk_b, sk_s, sk_h,
        sv_b, sv_s, sv_h,
        out.stride(0), out.stride(1),
        table.stride(0) if paged else 0, lse.stride(0),
        G=H // Hk, D=D, PAGED=paged, PAGE=k.shape[1] if paged else 1, CAUSAL=causal,
        BLOCK_M=block_m, BLOCK_N=64,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # float32 stays float32 (no TF32)
        num_warps=4, num_stages=2,
    )
    return out, lse
