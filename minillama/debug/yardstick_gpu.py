"""The yardstick on a GPU: the same plain attention as ``yardstick.py``, op by op, as Triton kernels.

Three kernels, each one step of the textbook: ``_scores`` (S = q·k for every key a row may see,
float32 products of the bf16/fp16 inputs, into a scratch buffer), ``_softmax`` (turns S into the
reference's probabilities and, rounding scores and probabilities to the active dtype, into the
plain budget's; both materialised) and ``_weighted_sum`` (P·V for both). Keys are read through the
block table from the paged cache, only up to each row's own position, so a batch of short and long
sequences costs its real size. ``_metrics`` compares the outputs (active, shadow, reference, plain)
and folds each row into its request's entry of the step's table. The grids come from shapes alone,
so everything runs inside a captured CUDA graph. Used for bf16/fp16 on CUDA; float32 runs (and CPU)
use ``yardstick.py``, whose results these kernels must match (a GPU test checks).
"""

from __future__ import annotations

import torch

from minillama import hooks

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None

#: Score elements one launch may hold; longer prompts are judged a slice of rows at a time.
SCRATCH_ELEMENTS = 1 << 26
BLOCK_N = 64


def covers(call, dtype: torch.dtype) -> bool:
    """True when these kernels judge the call: CUDA, Triton, bf16/fp16, head_dim a power of two <= 256."""
    d = call.q.shape[-1]
    return (triton is not None and call.q.is_cuda and dtype in (torch.bfloat16, torch.float16)
            and d & (d - 1) == 0 and d <= 256)


if triton is not None:

    @triton.jit
    def _key_rows(seq, j, BT, bt_stride, CUK, bs, PAGED: tl.constexpr):
        if PAGED:
            blk = tl.load(BT + seq * bt_stride + j // bs).to(tl.int64)
            return blk * bs + j % bs
        return tl.load(CUK + seq).to(tl.int64) + j

    @triton.jit
    def _round(x, BF16: tl.constexpr):
        """float32 values rounded to the active low precision, back in float32."""
        if BF16:
            return x.to(tl.bfloat16).to(tl.float32)
        return x.to(tl.float16).to(tl.float32)

    @triton.jit
    def _scores(Q, q_row, q_head, K, k_row, k_head, BT, bt_stride, CUK, SEQ, POS, S, s_row, s_head, bs, width,
                group, GP: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, PAGED: tl.constexpr):
        """S[row, h, j] = q·k for one row's group of query heads and a tile of keys."""
        row, kh, tile = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        pos = tl.load(POS + row)
        if tile * BLOCK <= pos:
            seq = tl.load(SEQ + row).to(tl.int64)
            j = tile * BLOCK + tl.arange(0, BLOCK)
            ok = (j <= pos) & (j < width)
            krow = _key_rows(seq, tl.where(ok, j, 0), BT, bt_stride, CUK, bs, PAGED)
            d = tl.arange(0, D)
            g = tl.arange(0, GP)
            heads = kh * group + g
            live = g < group
            k = tl.load(K + krow[:, None] * k_row + kh * k_head + d[None, :], mask=ok[:, None], other=0.0)
            q = tl.load(Q + row * q_row + heads[:, None] * q_head + d[None, :], mask=live[:, None], other=0.0)
            # bf16/fp16 values are exact in TF32, so the matrix units multiply them exactly (float32 sums)
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)))  # (GP, BLOCK)
            s = tl.where(ok[None, :], s, float("-inf"))
            tl.store(S + row * s_row + heads[:, None] * s_head + j[None, :], s, mask=live[:, None] & (j < width)[None, :])

    @triton.jit
    def _softmax(S, P, s_row, s_head, POS, scale, width, BF16: tl.constexpr, BLOCK: tl.constexpr):
        """In place, S becomes the reference's probabilities; P gets the plain budget's (rounded)."""
        row, h = tl.program_id(0), tl.program_id(1)
        n = tl.minimum(tl.load(POS + row) + 1, width)
        base = S + row * s_row + h * s_head
        pbase = P + row * s_row + h * s_head
        m = tl.full([BLOCK], float("-inf"), tl.float32)
        mp = tl.full([BLOCK], float("-inf"), tl.float32)
        for start in range(0, n, BLOCK):
            j = start + tl.arange(0, BLOCK)
            x = tl.load(base + j, mask=j < n, other=float("-inf")) * scale
            m = tl.maximum(m, x)
            mp = tl.maximum(mp, _round(x, BF16))
        mx, mpx = tl.max(m, 0), tl.max(mp, 0)
        acc = tl.zeros([BLOCK], tl.float32)
        accp = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n, BLOCK):
            j = start + tl.arange(0, BLOCK)
            x = tl.load(base + j, mask=j < n, other=float("-inf")) * scale
            acc += tl.where(j < n, tl.exp(x - mx), 0.0)
            accp += tl.where(j < n, tl.exp(_round(x, BF16) - mpx), 0.0)
        total, totalp = tl.sum(acc, 0), tl.sum(accp, 0)
        for start in range(0, n, BLOCK):
            j = start + tl.arange(0, BLOCK)
            x = tl.load(base + j, mask=j < n, other=float("-inf")) * scale
            tl.store(base + j, tl.exp(x - mx) / total, mask=j < n)
            tl.store(pbase + j, _round(tl.exp(_round(x, BF16) - mpx) / totalp, BF16), mask=j < n)

    @triton.jit
    def _weighted_sum(S, P, s_row, s_head, V, v_row, v_head, BT, bt_stride, CUK, SEQ, POS, REF, PLAIN, o_row, o_head,
                      bs, width, group, GP: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
                      PAGED: tl.constexpr):
        """O = P·V for the reference (float32 products and sums, "ieee") and the plain budget (its rounded
        probabilities times bf16/fp16 values are exact in TF32, so the fast path loses nothing)."""
        row, kh = tl.program_id(0), tl.program_id(1)
        n = tl.minimum(tl.load(POS + row) + 1, width)
        seq = tl.load(SEQ + row).to(tl.int64)
        d = tl.arange(0, D)
        g = tl.arange(0, GP)
        heads = kh * group + g
        live = g < group
        acc = tl.zeros([GP, D], tl.float32)
        accp = tl.zeros([GP, D], tl.float32)
        for start in range(0, n, BLOCK):
            j = start + tl.arange(0, BLOCK)
            ok = j < n
            vrow = _key_rows(seq, tl.where(ok, j, 0), BT, bt_stride, CUK, bs, PAGED)
            v = tl.load(V + vrow[:, None] * v_row + kh * v_head + d[None, :], mask=ok[:, None], other=0.0)
            off = row * s_row + heads[:, None] * s_head + j[None, :]
            keep = live[:, None] & ok[None, :]
            p = tl.load(S + off, mask=keep, other=0.0)
            pp = tl.load(P + off, mask=keep, other=0.0)
            vf = v.to(tl.float32)
            acc += tl.dot(p, vf, input_precision="ieee")
            accp += tl.dot(pp, vf)
        out = row * o_row + heads[:, None] * o_head + d[None, :]
        tl.store(REF + out, acc, mask=live[:, None])
        tl.store(PLAIN + out, accp.to(PLAIN.dtype.element_ty), mask=live[:, None])

    @triton.jit
    def _metrics(A, a_row, SH, sh_row, R, PL, SEQ, TABLE_F, TABLE_I, t_row, n, HAS_SHADOW: tl.constexpr,
                 BLOCK: tl.constexpr):
        """One row: max |.| and sum of squares of a-s, a-r, s-r, p-r and max |r|, into its request's fields
        (``SHADOW_FIELDS`` order; maxima of non-negative floats compare as their int32 bits)."""
        row = tl.program_id(0)
        req = tl.load(SEQ + row).to(tl.int64)
        zero = tl.zeros([BLOCK], tl.float32)
        dmax, dsq, amax, asq, smax, ssq, bmax, bsq, rmax = zero, zero, zero, zero, zero, zero, zero, zero, zero
        for start in range(0, n, BLOCK):
            c = start + tl.arange(0, BLOCK)
            ok = c < n
            r = tl.load(R + row * n + c, mask=ok, other=0.0)
            a = tl.load(A + row * a_row + c, mask=ok, other=0.0).to(tl.float32)
            p = tl.load(PL + row * n + c, mask=ok, other=0.0).to(tl.float32)
            if HAS_SHADOW:
                s = tl.load(SH + row * sh_row + c, mask=ok, other=0.0).to(tl.float32)
                dmax = tl.maximum(dmax, tl.abs(a - s))
                dsq += (a - s) * (a - s)
                smax = tl.maximum(smax, tl.abs(s - r))
                ssq += (s - r) * (s - r)
            amax = tl.maximum(amax, tl.abs(a - r))
            asq += (a - r) * (a - r)
            bmax = tl.maximum(bmax, tl.abs(p - r))
            bsq += (p - r) * (p - r)
            rmax = tl.maximum(rmax, tl.abs(r))
        fi = TABLE_I + req * t_row
        ff = TABLE_F + req * t_row
        if HAS_SHADOW:
            tl.atomic_max(fi + 0, tl.max(dmax, 0).to(tl.int32, bitcast=True))
            tl.atomic_add(ff + 1, tl.sum(dsq, 0))
            tl.atomic_max(fi + 4, tl.max(smax, 0).to(tl.int32, bitcast=True))
            tl.atomic_add(ff + 5, tl.sum(ssq, 0))
        tl.atomic_max(fi + 2, tl.max(amax, 0).to(tl.int32, bitcast=True))
        tl.atomic_add(ff + 3, tl.sum(asq, 0))
        tl.atomic_max(fi + 6, tl.max(bmax, 0).to(tl.int32, bitcast=True))
        tl.atomic_add(ff + 7, tl.sum(bsq, 0))
        tl.atomic_max(fi + 8, tl.max(rmax, 0).to(tl.int32, bitcast=True))


def judge(call, dtype: torch.dtype, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference (float32) and the plain output (``dtype``) of one call, ``(rows, heads, head_dim)``."""
    ctx = call.context
    q = call.q
    rows, heads, d = q.shape
    paged = ctx.block_tables is not None
    if paged:
        k, v, bs = call.k_cache, call.v_cache, call.k_cache.shape[1]
        kr, kh, vr, vh = k.stride(1), k.stride(2), v.stride(1), v.stride(2)
        bt, bt_stride, cuk = ctx.block_tables, ctx.block_tables.stride(0), ctx.block_tables
    else:
        k, v, bs = call.k, call.v, 1
        kr, kh, vr, vh = k.stride(0), k.stride(1), v.stride(0), v.stride(1)
        bt, bt_stride, cuk = ctx.cu_seqlens_k, 0, ctx.cu_seqlens_k
    hk = k.shape[-2]
    group = heads // hk
    gp = max(16, triton.next_power_of_2(group))  # the matrix units want 16 rows at least
    ref = torch.empty((rows, heads, d), dtype=torch.float32, device=q.device)
    plain = torch.empty((rows, heads, d), dtype=dtype, device=q.device)
    step = rows if hooks.capturing else max(1, SCRATCH_ELEMENTS // max(1, heads * width))
    for lo in range(0, rows, step):
        n = min(rows, lo + step) - lo
        s = torch.empty((n, heads, width), dtype=torch.float32, device=q.device)
        p = torch.empty_like(s)
        qs, seq, pos = q[lo: lo + n], ctx.seq_index[lo: lo + n], ctx.positions[lo: lo + n]
        _scores[(n, hk, triton.cdiv(width, BLOCK_N))](
            qs, qs.stride(0), qs.stride(1), k, kr, kh, bt, bt_stride, cuk, seq, pos, s, s.stride(0), s.stride(1), bs,
            width, group, GP=gp, D=d, BLOCK=BLOCK_N, PAGED=paged, num_warps=4)
        _softmax[(n, heads)](s, p, s.stride(0), s.stride(1), pos, call.scale, width, BF16=dtype == torch.bfloat16,
                             BLOCK=256, num_warps=4)
        r, pl = ref[lo: lo + n], plain[lo: lo + n]
        _weighted_sum[(n, hk)](s, p, s.stride(0), s.stride(1), v, vr, vh, bt, bt_stride, cuk, seq, pos, r, pl,
                               r.stride(0), r.stride(1), bs, width, group, GP=gp, D=d, BLOCK=BLOCK_N, PAGED=paged,
                               num_warps=4)
    return ref, plain


def metrics(active: torch.Tensor, shadow: torch.Tensor | None, ref: torch.Tensor, plain: torch.Tensor,
            seq_index: torch.Tensor, table: torch.Tensor) -> None:
    """Fold one call's comparison into ``table`` (requests, fields) float32, one program per row."""
    rows = active.shape[0]
    n = active[0].numel() if rows else 0
    a = active.reshape(rows, n)
    a = a if a.stride(-1) == 1 else a.contiguous()
    s = shadow.reshape(rows, n) if shadow is not None else a
    s = s if s.stride(-1) == 1 else s.contiguous()
    _metrics[(rows,)](a, a.stride(0), s, s.stride(0), ref, plain, seq_index, table, table.view(torch.int32),
                      table.stride(0), n, HAS_SHADOW=shadow is not None, BLOCK=1024, num_warps=4)
