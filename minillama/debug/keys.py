"""Rebuild what an attention row saw (its keys, its weights) and find where two outputs differ most.

Flash kernels never expose attention weights, so the debugger recomputes them from the query rows
(``layers.N.attn.q``) and the keys the request's block table points at. A key is looked up by its
cache slot: the newest recorded step at or before the cursor that wrote that slot (its
``layers.N.attn.k`` row, found through the step's slot mapping) holds it; a slot no recorded step
wrote comes from the engine's cache when live, or, in a recording started mid-run, from the keys
cached when the recording began (``catchup.blocks`` / ``catchup.k`` in its first step, see
traces/README.md). Everything is moved to the host before it is combined: live tensors may sit on
the GPU while recorded ones are on the host.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from minillama import hooks
from minillama.trace.tables import request_rows

#: How many of a trace's first steps are searched for the keys a mid-run recording caught up.
CATCH_UP_STEPS = 4


@dataclass
class Keys:
    """Keys one request's queries attended to: ``k`` (positions, kv_heads, head_dim) float64 on the host,
    or None with ``note`` saying why; ``note`` also says where the keys came from."""

    k: torch.Tensor | None
    note: str


@dataclass
class Locus:
    """Where two tensors differ most: flat row, head (None for 2-D tensors), column, both values."""

    row: int
    head: int | None
    col: int
    a: float
    b: float

    @property
    def diff(self) -> float:
        return abs(self.a - self.b)


def host(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` on the host (live tensors may be on the GPU)."""
    return None if t is None else t.detach().cpu()


def rows_of(batch: dict[str, Any], seq_id: int, samples: bool = False) -> tuple[int, int] | None:
    """Rows ``[a, b)`` of request ``seq_id`` in a site's flat tensor (None: no rows this step)."""
    for s, span in zip(batch.get("seqs") or [], request_rows(batch, samples), strict=True):
        if s["seq_id"] == seq_id:
            return span
    return None


def slots_of(seq: dict[str, Any], block_size: int, upto: int) -> list[int]:
    """Cache slots of positions ``0..upto-1`` of a request, through its block table."""
    bt = seq["block_table"]
    return [bt[p // block_size] * block_size + p % block_size for p in range(upto) if p // block_size < len(bt)]


def attention_weights(q: torch.Tensor, k: torch.Tensor, head: int, first_pos: int) -> torch.Tensor:
    """Softmax weights (queries, keys) of query ``head``, causal: query i sits at ``first_pos + i`` and sees
    keys ``j <= first_pos + i``; head h reads kv head ``h // (heads // kv_heads)`` (float64, host)."""
    q, k = host(q).double(), host(k).double()
    heads, kv_heads, d = q.shape[1], k.shape[1], q.shape[2]
    scores = q[:, head] @ k[:, head // max(1, heads // kv_heads)].T * d**-0.5
    pos_q = torch.arange(q.shape[0]).unsqueeze(1) + first_pos
    scores = scores.masked_fill(torch.arange(k.shape[0]).unsqueeze(0) > pos_q, float("-inf"))
    return torch.softmax(scores, dim=-1)


def largest_difference(a: torch.Tensor, b: torch.Tensor) -> Locus | None:
    """The element where |a - b| is largest (NaN where only one side is NaN counts as largest)."""
    a, b = host(a).double(), host(b).double()
    if a.shape != b.shape or not a.numel():
        return None
    d = (a - b).abs()
    d = torch.where(a.isnan() ^ b.isnan(), torch.full_like(d, float("inf")), d.nan_to_num(0.0))
    flat = int(d.flatten().argmax())
    return _locus(a, b, flat)


def largest_value(a: torch.Tensor) -> Locus | None:
    """The element of largest |a| (a NaN or Inf first)."""
    a = host(a).double()
    if not a.numel():
        return None
    m = a.abs().nan_to_num(nan=float("inf"))
    return _locus(a, a, int(m.flatten().argmax()))


def _locus(a: torch.Tensor, b: torch.Tensor, flat: int) -> Locus:
    if a.dim() >= 3:
        per_row = a.shape[1] * a.shape[2]
        row, rest = divmod(flat, per_row)
        head, col = divmod(rest, a.shape[2])
    else:
        width = a.shape[1] if a.dim() == 2 else 1
        row, col, head = flat // width, flat % width, None
    return Locus(row, head, col, float(a.flatten()[flat]), float(b.flatten()[flat]))


class KeyBook:
    """Rebuilds keys over one timeline (``keys``); caches the last results (finished steps never change)."""

    def __init__(self, tl: Any, size: int = 64) -> None:
        self.tl = tl
        self._cache: OrderedDict[tuple, Keys] = OrderedDict()
        self._size = size
        self._snapshot: dict[str, torch.Tensor] | None | bool = False

    def keys(self, i: int, layer: int, seq: dict[str, Any], upto: int) -> Keys:
        """Keys of request ``seq`` (a batch entry of step ``i``) at ``layer`` for positions ``0..upto-1``."""
        ev = self.tl.event(i) or {}
        key = (i, layer, int(seq["seq_id"]), upto)
        if key in self._cache and not ev.get("in_progress"):
            return self._cache[key]
        res = self._rebuild(i, ev, layer, seq, upto)
        self._cache[key] = res
        if len(self._cache) > self._size:
            self._cache.popitem(last=False)
        return res

    def _rebuild(self, i: int, ev: dict[str, Any], layer: int, seq: dict[str, Any], upto: int) -> Keys:
        bs = int((ev.get("batch") or {}).get("block_size") or 16)
        want = slots_of(seq, bs, upto)
        if len(want) < upto:
            return Keys(None, f"the block table covers {len(want)} of {upto} positions")
        where = {s: p for p, s in enumerate(want)}
        rows: list[torch.Tensor | None] = [None] * len(want)
        site = hooks.layer_site(layer, "attn.k")
        first = int(getattr(self.tl, "first_step", lambda: 0)())
        missing_site = None
        for t in range(i, first - 1, -1):
            if not where:
                break
            slots = ((self.tl.event(t) or {}).get("batch") or {}).get("slot_mapping") or []
            hits = [(r, s) for r, s in enumerate(slots) if s in where]
            if not hits:
                continue
            k = host(self.tl.tensor(t, site))
            if k is None:
                missing_site = t
                break
            for r, s in hits:
                if r < k.shape[0]:
                    rows[where.pop(s)] = k[r]
        source = f"recorded {site}"
        if where:
            filled = self._fallback(layer, where, rows)
            if filled is None:
                if missing_site is not None:
                    return Keys(None, f"{site} was not recorded in full at step {missing_site}: record with "
                                      "--full 'layers.*.attn.k' to see attention weights")
                return Keys(None, f"{len(where)} of the {len(want)} keys were written before the recording began "
                                  "and the trace has no cache snapshot for them")
            source += f" + {filled}"
        return Keys(torch.stack(rows).double(), source)

    def _fallback(self, layer: int, where: dict[int, int], rows: list) -> str | None:
        """Fill the keys no recorded step wrote: the live engine's cache, or the trace's start snapshot."""
        session = getattr(self.tl, "session", None)
        if session is not None:
            cache = session.llm.runner.kv_cache
            if cache.numel() == 0:
                return None
            flat = cache[0, layer].reshape(-1, *cache.shape[4:])
            idx = torch.tensor(sorted(where), dtype=torch.long, device=flat.device)
            got = host(flat.index_select(0, idx))
            for s, t in zip(sorted(where), got, strict=True):
                rows[where[s]] = t
            where.clear()
            return "the engine's cache now"
        snap = self._load_snapshot()
        if snap is None:
            return None
        pos, k = snap
        if any(s not in pos for s in where):
            return None
        for s, p in where.items():
            rows[p] = k[layer, pos[s]]
        where.clear()
        return "the cache snapshot taken when the recording began"

    def _load_snapshot(self) -> tuple[dict[int, int], torch.Tensor] | None:
        """The keys a mid-run recording caught up: slot -> row, and (layers, slots, kv_heads, head_dim)."""
        if self._snapshot is False:
            self._snapshot = None
            first = int(getattr(self.tl, "first_step", lambda: 0)())
            for i in range(first, min(first + CATCH_UP_STEPS, self.tl.num_steps())):
                blocks, k = self.tl.tensor(i, "catchup.blocks"), self.tl.tensor(i, "catchup.k")
                if blocks is None or k is None:
                    continue
                bs = k.shape[2]
                slots = (host(blocks).long().unsqueeze(1) * bs + torch.arange(bs)).flatten().tolist()
                self._snapshot = ({s: n for n, s in enumerate(slots)}, host(k).reshape(k.shape[0], -1, *k.shape[3:]))
                break
        return self._snapshot  # type: ignore[return-value]
