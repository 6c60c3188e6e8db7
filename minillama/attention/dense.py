"""The torch backend's arithmetic: masked dense attention over a padded batch.

``attend`` is the op-by-op reference (float32 scores and softmax, any device, returns the
log-sum-exp); ``attend_sdpa``, ``prompt_sdpa`` and ``decode_sdpa`` compute the same thing with
PyTorch's fused ``scaled_dot_product_attention`` on CPU when no log-sum-exp is asked for.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Upper bound on the elements of one (batch, heads, query-chunk, keys) score tensor. Above it the
# queries are processed in chunks (a loop over chunk index, not over sequences), so a long
# prefill does not materialise a huge score matrix: 2**26 float32 scores are 256 MiB.
MAX_SCORE_ELEMENTS = 1 << 26

# ---------------------------------------------------------------------------------------------
# The core: masked dense attention over a padded batch.
# ---------------------------------------------------------------------------------------------


def half_on_cuda(t: torch.Tensor) -> bool:
    return t.is_cuda and t.dtype in (torch.float16, torch.bfloat16)


def bmm(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``a @ b`` (batched) with products summed in ``acc``.

    On CUDA, half-precision operands go straight to the matrix units with a float32 result: the
    products of bf16/fp16 numbers are exact in float32, so this gives the numbers of upcasting
    first without writing float32 copies of the keys. Elsewhere the operands are upcast.
    """
    if half_on_cuda(a) and a.dtype == b.dtype and acc == torch.float32:
        return torch.bmm(a, b, out_dtype=acc)
    return torch.bmm(a.to(acc), b.to(acc))


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_lens: torch.Tensor,
    k_lens: torch.Tensor,
    scale: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of padded queries over padded keys.

    q ``(B, Sq, H, D)``; k, v kv-head-major ``(Hk, B, Sk, D)`` (see ``gather_heads``), with finite
    values in padding slots; ``q_lens``/``k_lens`` ``(B,)`` give how many rows of each sequence
    are real. Returns out ``(B, Sq, H, D)`` in q's dtype and lse ``(B, H, Sq)`` in float32. Padded
    query rows hold meaningless values.
    """
    B, Sq, H, D = q.shape
    Hk, Sk = k.shape[0], k.shape[2]
    G = H // Hk  # query heads per kv head
    acc = torch.promote_types(q.dtype, torch.float32)  # fp16/bf16/fp32 -> fp32, fp64 stays fp64
    device = q.device
    q_lens = q_lens.long()
    k_lens = k_lens.long()

    out = q.new_empty(B, Sq, H, D)
    lse = torch.empty(B, H, Sq, dtype=torch.float32, device=device)
    if Sq == 0 or Sk == 0:
        # No keys at all: every row is fully masked (and reductions over an empty dim would fail).
        return out.zero_(), lse.fill_(float("inf"))

    # (Hk, B, Sk, D) -> (Hk*B, Sk, D): one matrix per (kv head, sequence), no copy.
    kf, vf = k.reshape(Hk * B, Sk, D), v.reshape(Hk * B, Sk, D)
    # Which key slots are real, and the bottom-right causal shift: query i may see key j iff
    # j <= i + (k_len - q_len). Shapes broadcast over scores (Hk, B, G, c, Sk).
    key_pos = torch.arange(Sk, device=device)
    valid = (key_pos[None, :] < k_lens[:, None])[None, :, None, None, :]
    shift = (k_lens - q_lens)[None, :, None, None, None]

    # Queries are processed in chunks only when the whole score tensor would be too large.
    chunk = max(1, min(Sq, MAX_SCORE_ELEMENTS // max(1, B * H * Sk)))
    for start in range(0, Sq, chunk):
        c = min(chunk, Sq - start)
        # (B, c, H, D) -> (Hk, B, G, c, D) -> (Hk*B, G*c, D): head h = kv_head * G + g.
        qc = q[:, start:start + c].reshape(B, c, Hk, G, D).permute(2, 0, 3, 1, 4).reshape(Hk * B, G * c, D)
        scores = bmm(qc, kf.transpose(1, 2), acc).view(Hk, B, G, c, Sk)
        scores.mul_(scale)

        mask = valid
        if causal:
            q_pos = torch.arange(start, start + c, device=device)[:, None]  # (c, 1)
            mask = mask & (key_pos[None, :] <= q_pos + shift)
        scores.masked_fill_(~mask, float("-inf"))

        # Numerically stable softmax that tolerates rows with no visible key: subtract the row
        # max (0 for an all -inf row, so exp gives 0 instead of NaN), exponentiate, normalise
        # only rows whose sum is positive.
        row_max = scores.amax(dim=-1, keepdim=True)
        row_max = row_max.masked_fill(row_max == float("-inf"), 0.0)
        probs = scores.sub_(row_max).exp_()  # reuses the score buffer
        row_sum = probs.sum(dim=-1, keepdim=True)
        has_key = row_sum > 0

        # On CUDA the probabilities meet half-precision values as flash-attn does: rounded to the
        # value dtype, products summed in float32.
        p = probs.to(v.dtype) if half_on_cuda(v) else probs
        o = bmm(p.view(Hk * B, G * c, Sk), vf, acc).view(Hk, B, G, c, D)
        o = torch.where(has_key, o / row_sum, 0.0)  # rows without keys: exactly 0
        out[:, start:start + c] = o.permute(1, 3, 0, 2, 4).reshape(B, c, H, D).to(q.dtype)

        row_lse = torch.where(has_key, row_max + torch.log(row_sum), float("inf"))  # (Hk, B, G, c, 1)
        lse[:, :, start:start + c] = row_lse.permute(1, 0, 2, 3, 4).reshape(B, H, c).float()
    return out, lse


def attend_sdpa(q: torch.Tensor, k_pad: torch.Tensor, v_pad: torch.Tensor, q_lens: torch.Tensor,
                k_lens: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    """``attend`` through ``F.scaled_dot_product_attention``: q (B, Sq, H, D), k/v (B, Sk, Hk, D).

    The G query heads of a kv head become G blocks of query rows of that head (GQA without
    copying K/V); the mask says which key each row may see (real key, bottom-right causal).
    Rows that see no key come out of SDPA as NaN and are set to 0, as flash-attn returns.
    """
    B, Sq, H, D = q.shape
    Sk, Hk = k_pad.shape[1], k_pad.shape[2]
    G = H // Hk
    qh = q.reshape(B, Sq, Hk, G, D).permute(0, 2, 3, 1, 4).reshape(B, Hk, G * Sq, D)
    key = torch.arange(Sk, device=q.device)
    mask = (key[None, :] < k_lens[:, None])[:, None, :]  # (B, 1, Sk)
    if causal:
        qpos = torch.arange(Sq, device=q.device)
        shift = (k_lens - q_lens).long()
        mask = mask & (key[None, None, :] <= qpos[None, :, None] + shift[:, None, None])  # (B, Sq, Sk)
    mask = mask.expand(B, Sq, Sk)[:, None, None].expand(B, 1, G, Sq, Sk).reshape(B, 1, G * Sq, Sk)
    k, v = k_pad.transpose(1, 2).to(q.dtype), v_pad.transpose(1, 2).to(q.dtype)  # (B, Hk, Sk, D) views
    out = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask, scale=scale)
    out = torch.where(mask.any(-1, keepdim=True), out, 0.0)
    return out.view(B, Hk, G, Sq, D).permute(0, 3, 1, 2, 4).reshape(B, Sq, H, D)


def prompt_sdpa(q: torch.Tensor, k_pad: torch.Tensor, v_pad: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of whole prompts (every sequence's queries are all its keys) on CPU.

    Queries and keys then share positions, so the plain causal mask of SDPA is exactly the right
    one for every real row, and no mask tensor is needed: the fused kernel skips the blocks above
    the diagonal. Real rows never see padding keys (they sit after the sequence's last query);
    padded query rows are computed and dropped. K/V heads are repeated for the query heads,
    because a causal kernel cannot use the stacked-rows GQA layout of ``attend_sdpa``.
    """
    B, Sq, H, D = q.shape
    Sk, Hk = k_pad.shape[1], k_pad.shape[2]
    G = H // Hk

    def per_head(x: torch.Tensor) -> torch.Tensor:  # (B, Sk, Hk, D) -> (B, H, Sk, D)
        return x.transpose(1, 2)[:, :, None].expand(B, Hk, G, Sk, D).reshape(B, H, Sk, D).to(q.dtype)

    out = F.scaled_dot_product_attention(q.transpose(1, 2), per_head(k_pad), per_head(v_pad), is_causal=True,
                                         scale=scale)
    return out.transpose(1, 2)  # (B, Sq, H, D)


def decode_sdpa(q: torch.Tensor, k_pad: torch.Tensor, v_pad: torch.Tensor, valid: torch.Tensor,
                scale: float) -> torch.Tensor:
    """One query per sequence on CPU: PyTorch's fused SDPA instead of the op-by-op ``attend``.

    q (B, 1, H, D), k/v (B, S, Hk, D), ``valid`` (B, S) marks real key slots. A single query sees
    every key its sequence has (bottom-right causal with sq = 1), so the only mask is ``valid``.
    The G query heads sharing a kv head are laid out as G query rows of that head, which is GQA
    without copying K/V and works on torch 2.4. Same math as ``attend``.
    """
    B, _, H, D = q.shape
    Hk = k_pad.shape[2]
    if k_pad.shape[1] == 0:  # no keys at all
        return q.new_zeros(q.shape)
    qh = q.view(B, Hk, H // Hk, D)  # head h = kv_head * G + g
    k, v = k_pad.transpose(1, 2).to(q.dtype), v_pad.transpose(1, 2).to(q.dtype)  # (B, Hk, S, D) views
    out = F.scaled_dot_product_attention(qh, k, v, attn_mask=valid[:, None, None, :], scale=scale)
    # A sequence with no key at all gets 0, like flash-attn (SDPA would give NaN).
    out = torch.where(valid[:, :1, None, None], out, 0.0)
    return out.reshape(B, 1, H, D)
