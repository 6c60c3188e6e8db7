"""Shadow attention: redo each layer's attention with another backend, and judge both against the yardstick.

The active backend's output continues the forward pass; the shadow's output, the reference and the
plain budget (``yardstick.py``, the debugger's own attention) are only compared with it. Because
every layer redoes the very same call (same q, same cache), the difference at layer ``i`` is the
error that layer's kernel adds, not error inherited from earlier layers.

Everything runs on the device in the engine's stream and is reduced per request with scatter
operations into the step's ``StatsBuffer`` (``SHADOW_FIELDS``): no host synchronisation and no
loop over sequences, so it can be captured in a decode CUDA graph with the backends that allow it.
"""

from __future__ import annotations

import numpy as np
import torch

from minillama import hooks
from minillama.attention import AttentionBackend, get_backend
from minillama.debug import yardstick_gpu
from minillama.debug.devstats import to_device
from minillama.debug.yardstick import judge, reference_dtype
from minillama.layers.attention import AttentionCall, run_attention
from minillama.trace.format import SHADOW_FIELDS

_F = {name: i for i, name in enumerate(SHADOW_FIELDS)}


def width_of(call: AttentionCall) -> int:
    """Keys per sequence the yardstick reads: the longest sequence, or the whole block table in a graph."""
    ctx = call.context
    if hooks.capturing and ctx.block_tables is not None:
        return ctx.block_tables.shape[1] * call.k_cache.shape[1]
    return max(int(ctx.max_seqlen_k), 1)


class Shadow:
    """Runs ``backend`` (None: the yardstick alone, "reference") beside the active one at every layer."""

    def __init__(self, backend: str | AttentionBackend | None, device: torch.device, dtype: torch.dtype,
                 head_dim: int, active: str | None = None) -> None:
        self.backend = get_backend(backend) if isinstance(backend, str) else backend
        if self.backend is not None:
            self.backend.check(head_dim, dtype, device)
        self.dtype = dtype
        # A backend that pads queries would pad a mixed call's decodes to its prompts' length (the engine
        # splits such batches itself, but not while a debugger listens): run the two parts apart, as it
        # would. Not with the active backend as the shadow, which must redo the very same call.
        self.split_mixed = (self.backend is not None and self.backend.pads_queries and device.type == "cuda"
                            and self.backend.name != active)
        self._parts_of: tuple | None = None  # (step context, its two calls' inputs)

    @property
    def name(self) -> str:
        return self.backend.name if self.backend is not None else "reference"

    @torch.inference_mode()
    def run(self, call: AttentionCall, active: torch.Tensor, table: torch.Tensor) -> dict[str, torch.Tensor]:
        """Compare one call; fold the per-request metrics into ``table`` (requests, fields) and return the
        outputs (``shadow``, ``ref``, ``plain``) for whoever keeps them in full."""
        shadow = None
        if self.backend is not None:
            shadow = self._split(call) if self.split_mixed else None
            if shadow is None:
                shadow = run_attention(self.backend, call.q, call.k, call.v, call.k_cache, call.v_cache,
                                       call.context, call.scale)
        if yardstick_gpu.covers(call, self.dtype):
            ref, plain = yardstick_gpu.judge(call, self.dtype, width_of(call))
            yardstick_gpu.metrics(active, shadow, ref, plain, call.context.seq_index, table)
        else:
            ref, plain = judge(call, self.dtype, width_of(call))
            self._metrics(call, active, shadow, ref, plain, table)
        out = {"ref": ref, "plain": plain}
        if shadow is not None:
            out["shadow"] = shadow
        return out

    def _split(self, call: AttentionCall) -> torch.Tensor | None:
        """The shadow backend on a mixed prefill call as two calls: the one-token requests (decodes)
        through ``with_kvcache`` and the prompt chunks through ``varlen``, both reading the paged cache
        the active call wrote; None if the call is not mixed."""
        parts = self._parts(call.context)
        if parts is None:
            return None
        (d_rows, d_keys, d_table), (p_rows, cu_q, cu_k, max_q, max_k, p_table) = parts
        out = torch.empty_like(call.q)
        part = self.backend.with_kvcache(call.q[d_rows].unsqueeze(1), call.k_cache, call.v_cache, cache_seqlens=d_keys,
                                         block_table=d_table, softmax_scale=call.scale, causal=True)
        out[d_rows] = part.squeeze(1)
        out[p_rows] = self.backend.varlen(call.q[p_rows], call.k_cache, call.v_cache, cu_q, cu_k, max_q, max_k,
                                          softmax_scale=call.scale, causal=True, block_table=p_table)
        return out

    def _parts(self, ctx) -> tuple | None:
        """The two calls' rows, lengths and block tables, made once per step context (every layer shares
        it) from its host-side lengths and copied up without waiting; None if the call is not mixed."""
        if self._parts_of is not None and self._parts_of[0] is ctx:
            return self._parts_of[1]
        news, keys = np.asarray(ctx.query_lens, np.int64), np.asarray(ctx.key_lens, np.int64)
        parts = None
        if (ctx.is_prefill and ctx.block_tables is not None and not ctx.batch_invariant and len(keys) == len(news)
                and (news == 1).any() and (news > 1).any()):
            dev = ctx.block_tables.device
            starts = np.concatenate([[0], np.cumsum(news)])
            dec, pre = np.flatnonzero(news == 1), np.flatnonzero(news > 1)
            p_rows = np.flatnonzero(np.repeat(news > 1, news))  # the rows of the prompt chunks, in order
            cu_q, cu_k = (np.concatenate([[0], np.cumsum(n[pre])]) for n in (news, keys))
            parts = ((to_device(starts[dec], torch.int64, dev), to_device(keys[dec], torch.int32, dev),
                      ctx.block_tables[to_device(dec, torch.int64, dev)]),
                     (to_device(p_rows, torch.int64, dev), to_device(cu_q, torch.int32, dev),
                      to_device(cu_k, torch.int32, dev), int(news[pre].max()), int(keys[pre].max()),
                      ctx.block_tables[to_device(pre, torch.int64, dev)]))
        self._parts_of = (ctx, parts)
        return parts

    def _metrics(self, call: AttentionCall, active: torch.Tensor, shadow: torch.Tensor | None, ref: torch.Tensor,
                 plain: torch.Tensor, table: torch.Tensor) -> None:
        """The comparison in plain PyTorch, reduced per request with scatter operations."""
        seq = call.context.seq_index.long()
        rd = reference_dtype(self.dtype)
        r = ref.to(rd)

        def put(field: str, values: torch.Tensor, how: str) -> None:
            table[:, _F[field]].scatter_reduce_(0, seq, values.to(torch.float32), how, include_self=True)

        def errors(x: torch.Tensor, prefix: str) -> None:
            e = (x.to(rd) - r).flatten(1)
            put(prefix + "_max", e.abs().amax(1), "amax")
            put(prefix + "_sq", (e * e).sum(1), "sum")

        errors(active, "err_active")
        errors(plain, "budget")
        put("ref_absmax", r.flatten(1).abs().amax(1), "amax")
        if shadow is not None:
            errors(shadow, "err_shadow")
            d = (active.to(rd) - shadow.to(rd)).flatten(1)
            put("diff_max", d.abs().amax(1), "amax")
            put("diff_sq", (d * d).sum(1), "sum")
