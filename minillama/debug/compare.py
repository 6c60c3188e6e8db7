"""Two timelines in lockstep (A/B): the same prompts run twice, compared site by site and token by token.

Requests are matched by their prompt token ids, so the two runs may number them differently. At
step ``i`` a site is compared per matched request when both runs computed the same chunk of it
(per-request statistics, format 2), else over the whole batch when both batches hold the same
requests and chunks; exactly (max |A - B| over the rows) when both kept the tensor in full, else as
a lower bound from the statistics; bit-identical when the content hashes agree. Kept small on
purpose: the request-aligned ``minillama diff`` (``trace/diff.py``) is the batch tool.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from minillama import hooks
from minillama.debug.keys import host, rows_of

#: A site whose |A - B| exceeds this diverges (``minillama diff``'s default threshold).
THRESHOLD = 1e-3


class CompareError(ValueError):
    """Two timelines that cannot be compared; the message names the problem and the fix."""


@dataclass
class SiteDiff:
    """One site at one step: both sides' statistics, the difference and how it was measured."""

    site: str
    a: dict[str, Any] | None
    b: dict[str, Any] | None
    max_abs: float | None  # None: not comparable
    method: str  # equal, full, stats (then max_abs is a lower bound), missing, unaligned
    # Asked for one request but measured over the whole batch (a side kept no per-request statistics).
    whole_batch: bool = False

    @property
    def over(self) -> bool:
        return self.max_abs is not None and not self.max_abs <= THRESHOLD


@dataclass
class TokenSplit:
    """The first sampled token that differs: step, request (A's seq id, B's), both ids and texts."""

    step: int
    seq_a: int
    seq_b: int
    token_a: int | None
    token_b: int | None
    text_a: str
    text_b: str
    before: str


def _prompt_key(r: dict[str, Any]) -> tuple | None:
    ids = r.get("prompt_token_ids")
    if ids:
        return tuple(ids)
    return ("text", r["prompt"]) if r.get("prompt") else None


class Comparison:
    """A/B over timelines ``a`` and ``b``; raises ``CompareError`` when no request of A ran in B."""

    def __init__(self, a: Any, b: Any) -> None:
        self.a, self.b = a, b
        ra, rb = a.requests(), b.requests()
        by_prompt = {}
        for sid, r in rb.items():
            key = _prompt_key(r)
            if key is not None:
                by_prompt.setdefault(key, []).append(sid)
        self.pairs: dict[int, int] = {}
        for sid, r in ra.items():
            key = _prompt_key(r)
            if key is not None and by_prompt.get(key):
                self.pairs[sid] = by_prompt[key].pop(0)
        self.unmatched = [sid for sid in ra if sid not in self.pairs]
        if not self.pairs:
            raise CompareError("the two runs share no prompt (requests are matched by prompt token ids): "
                               "record B with the same prompts as A, e.g. the same --prompt arguments")
        if a.num_layers != b.num_layers:
            raise CompareError(f"A has {a.num_layers} layers and B {b.num_layers}: compare runs of the same model")

    def num_steps(self) -> int:
        return min(self.a.num_steps(), self.b.num_steps())

    def _chunks(self, tl: Any, i: int) -> dict[int, tuple[int, int]]:
        return {s["seq_id"]: tuple(s["chunk"]) for s in ((tl.event(i) or {}).get("batch") or {}).get("seqs", [])}

    def aligned(self, i: int) -> list[tuple[int, int]]:
        """Matched requests (A's seq id, B's) that computed the same chunk at step ``i``."""
        ca, cb = self._chunks(self.a, i), self._chunks(self.b, i)
        return [(sa, sb) for sa, sb in self.pairs.items() if sa in ca and ca[sa] == cb.get(sb)]

    def same_batch(self, i: int) -> bool:
        """Both steps hold the same matched requests, in the same order, with the same chunks."""
        ea, eb = (self.a.event(i) or {}).get("batch") or {}, (self.b.event(i) or {}).get("batch") or {}
        sa = [(self.pairs.get(s["seq_id"], -1), tuple(s["chunk"])) for s in ea.get("seqs", [])]
        sb = [(s["seq_id"], tuple(s["chunk"])) for s in eb.get("seqs", [])]
        return bool(sa) and sa == sb

    def site(self, i: int, site: str, seq_a: int | None = None) -> SiteDiff:
        """``site`` at step ``i`` for A's request ``seq_a`` (None: the whole batch). Without per-request
        statistics on one side (format 1) a request is compared through the whole batch when both batches match."""
        seq_b = self.pairs.get(seq_a) if seq_a is not None else None
        asked = seq_a is not None
        if seq_a is not None:
            if seq_b is None or (seq_a, seq_b) not in self.aligned(i):
                return SiteDiff(site, None, None, None, "unaligned")
            sa, sb = self.a.stats(i, site, seq_a), self.b.stats(i, site, seq_b)
            if (sa is None or sb is None) and self.same_batch(i) and self.a.stats(i, site) is not None:
                seq_a = seq_b = None  # per-request statistics missing on one side: the batch is the same
        if seq_a is None:
            if not self.same_batch(i):
                return SiteDiff(site, None, None, None, "unaligned")
            sa, sb = self.a.stats(i, site), self.b.stats(i, site)
        batch = asked and seq_a is None
        if sa is None or sb is None:
            return SiteDiff(site, sa, sb, None, "missing", batch)
        if sa.get("hash") and sa.get("hash") == sb.get("hash") and sa.get("dtype") == sb.get("dtype"):
            return SiteDiff(site, sa, sb, 0.0, "equal", batch)
        exact = self._full(i, site, seq_a, seq_b)
        if exact is not None:
            return SiteDiff(site, sa, sb, exact, "full", batch)
        bound = 0.0
        for key in ("mean", "absmax"):
            x, y = float(sa.get(key, math.nan)), float(sb.get(key, math.nan))
            if math.isfinite(x) and math.isfinite(y):
                bound = max(bound, abs(x - y))
        return SiteDiff(site, sa, sb, bound, "stats", batch)

    def tensors(self, i: int, site: str, seq_a: int | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Both sides' rows of ``site`` (of one matched request, or the whole batch) when kept in full."""
        ta, tb = host(self.a.tensor(i, site)), host(self.b.tensor(i, site))
        if ta is None or tb is None:
            return None
        if seq_a is not None:
            samples = hooks.site_part(site) in hooks.SAMPLE_SITES
            ra = rows_of(self.a.event(i)["batch"], seq_a, samples)
            rb = rows_of(self.b.event(i)["batch"], self.pairs[seq_a], samples)
            if ra is None or rb is None:
                return None
            ta, tb = ta[ra[0]:ra[1]], tb[rb[0]:rb[1]]
        return (ta, tb) if ta.shape == tb.shape else None

    def _full(self, i: int, site: str, seq_a: int | None, seq_b: int | None) -> float | None:
        got = self.tensors(i, site, seq_a)
        if got is None or not got[0].is_floating_point():
            return None
        d = (got[0].double() - got[1].double()).abs()
        return float(d.nan_to_num(nan=math.inf).max()) if d.numel() else 0.0

    def sites(self, i: int, seq_a: int | None = None) -> list[SiteDiff]:
        """Every site both runs recorded at step ``i``, in firing order."""
        names_b = set(self.b.site_names(i))
        return [self.site(i, s, seq_a) for s in self.a.site_names(i) if s in names_b and s != "sampled"]

    def first_divergence(self, threshold: float = THRESHOLD) -> tuple[int, SiteDiff] | None:
        """The first (step, site) where A and B differ by more than ``threshold``."""
        for i in range(self.num_steps()):
            for d in self.sites(i):
                if d.max_abs is not None and not d.max_abs <= threshold:
                    return i, d
        return None

    def first_token_split(self) -> TokenSplit | None:
        """The first step at which a matched request sampled a different token in A than in B."""
        for i in range(self.num_steps()):
            ta = {int(k): v for k, v in ((self.a.event(i) or {}).get("sampled") or {}).items()}
            tb = {int(k): v for k, v in ((self.b.event(i) or {}).get("sampled") or {}).items()}
            for sa, sb in self.pairs.items():
                if (sa in ta or sb in tb) and ta.get(sa) != tb.get(sb):
                    before = self.a.requests(i - 1).get(sa, {}).get("text", "") if i else ""
                    after_a = self.a.requests(i).get(sa, {}).get("text", "")
                    after_b = self.b.requests(i).get(sb, {}).get("text", "")
                    return TokenSplit(i, sa, sb, ta.get(sa), tb.get(sb), after_a[len(before):],
                                      after_b[len(before):] if after_b.startswith(before) else after_b, before)
        return None
