"""Inspector: the cursor's site, its statistics per request, and any row / head / column of its tensor.

``l`` locates the largest |value| of the tensor (or, where the site has a twin, the largest |this -
twin|: the shadow's attention output, or B's tensor in A/B mode) and moves the slice there. For
``logits`` it lists each request's top tokens with their probabilities; for ``sampled`` the text.
"""

from __future__ import annotations

from typing import Any

import torch
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from minillama import hooks
from minillama.debug.keys import host, largest_difference, largest_value, rows_of
from minillama.trace.tables import request_rows

from ..format import num, plural, rows_text, seq_label
from .base import Choose, View
from .slices import locus_line, value_table


def request_of_row(batch: dict[str, Any], row: int, samples: bool) -> tuple[int, int] | None:
    """(seq id, row within that request) of flat row ``row``."""
    for s, span in zip(batch.get("seqs") or [], request_rows(batch, samples), strict=True):
        if span is not None and span[0] <= row < span[1]:
            return s["seq_id"], row - span[0]
    return None


class InspectorView(View):
    """The cursor's tensor site."""

    TITLE = "inspector"

    def twin(self) -> tuple[str, torch.Tensor | None]:
        """The tensor this site is compared with: B's (A/B mode), the shadow's or the reference's attention."""
        site, i = self.pos.site, self.pos.step
        if self.ctx.compare is not None:
            return "B", host(self.ctx.compare.b.tensor(i, site))
        if hooks.site_part(site) == "attn.out":
            for name in ("shadow", "ref"):
                t = self.tl.tensor(i, f"{site}@{name}")
                if t is not None:
                    return name, host(t)
        return "", None

    def locate(self) -> Choose | None:
        """Where the largest |value| (or |value - twin|) of the cursor's tensor is."""
        if self.pos is None or self.at_begin:
            return None
        t = host(self.tl.tensor(self.pos.step, self.pos.site))
        if t is None or not t.is_floating_point():
            return None
        name, other = self.twin()
        loc = largest_difference(t, other) if other is not None and other.shape == t.shape else largest_value(t)
        got = request_of_row(self.step_batch, loc.row, self.pos.site in hooks.SAMPLE_SITES) if loc else None
        if got is None:
            return None
        return Choose(seq_id=got[0], head=loc.head, row=got[1], col=loc.col)

    def render_view(self) -> RenderableType:
        ev = self.event
        if ev is None:
            return Text("No step here.", style="dim")
        if self.at_begin:
            return self._begin(ev)
        site = self.pos.site
        st = self.tl.stats(self.pos.step, site)
        if st is None:
            return Text(f"{site} has not run yet at this step (n runs to the next layer).", style="dim")
        head = Text()
        head.append(site, style="bold #87d7ff")
        head.append(f"  {list(st.get('shape', []))} {st.get('dtype', '')}  ")
        head.append("kept in full" if st.get("full") else "statistics only (record with --full to keep values)",
                    style="dim")
        parts: list[RenderableType] = [head, self._stats_table(st)]
        t = host(self.tl.tensor(self.pos.step, site))
        if t is not None and site == "logits":
            parts.append(self._top_k(t))
        elif t is not None and site == "sampled":
            parts.append(self._sampled(t))
        elif t is not None:
            parts.append(self._values(t))
        return Group(*parts)

    def _begin(self, ev: dict[str, Any]) -> RenderableType:
        b = ev.get("batch") or {}
        t = Text(f"start of step {ev.get('step', self.pos.step)}: ", style="bold")
        t.append(f"{plural(len(b.get('seqs') or []), 'request')}, {plural(int(b.get('num_tokens') or 0), 'token')} "
                 f"({ev.get('phase', '?')}). ")
        t.append("n runs to the end of the first layer, . to the next site.", style="dim")
        missing = ev.get("missing_sites") or []
        if missing:
            t.append(f"\n{plural(len(missing), 'site')} did not fire in this step ({', '.join(missing[:4])}…)",
                     style="#ffd75f")
        if ev.get("note"):
            t.append("\n" + str(ev["note"]), style="#ffd75f")
        return t

    def _stats_table(self, whole: dict[str, Any]) -> RenderableType:
        """Per-request and whole-batch statistics; on a narrow pane the least needed columns go first, so
        request ids and numbers stay whole."""
        width = self.size.width or 120
        cols = ["request", "rows", "mean", "std", "min", "max", "absmax", "nan/inf", "hash"]
        if width < 104:
            cols = [c for c in cols if c not in ("min", "max", "hash")]
        if width < 64:
            cols = [c for c in cols if c not in ("rows", "std")]
        t = Table(box=None, pad_edge=False, header_style="bold", padding=(0, 1))
        for col in cols:
            t.add_column(col, justify="left" if col in ("request", "hash") else "right", no_wrap=True)
        rows = []
        seqs = self.step_batch.get("seqs") or []
        shown = seqs if len(seqs) <= 12 else [s for k, s in enumerate(seqs) if k < 8 or s["seq_id"] == self.seq_id]
        for s in shown:
            st = self.tl.stats(self.pos.step, self.pos.site, s["seq_id"])
            if st is not None:
                rows.append((seq_label(s["seq_id"]), st))
        per_request = bool(rows)
        rows.append((Text("batch", style="bold"), whole))
        for label, st in rows:
            spans = st.get("rows") or []
            bad = f"{st.get('nan', 0)}/{st.get('inf', 0)}"
            cell = {"request": label, "rows": rows_text(spans),
                    "nan/inf": Text(bad, style="bold #ff5f5f" if bad != "0/0" else ""),
                    "hash": Text(str(st.get("hash") or "-"), style="dim")}
            t.add_row(*[cell[c] if c in cell else num(st.get(c), 4 if width >= 104 else 3) for c in cols])
        notes = []
        if len(shown) < len(seqs):
            notes.append(f"{len(seqs) - len(shown)} more requests in this step ([ ] picks one)")
        if not per_request:
            notes.append("per-request statistics are not in this trace (format 1 keeps whole-batch ones only)")
        return Group(t, *[Text(n, style="dim italic") for n in notes]) if notes else t

    def _values(self, t: torch.Tensor) -> RenderableType:
        seq = self.chosen()
        if seq is None or not t.is_floating_point():
            return Text("")
        span = rows_of(self.step_batch, seq["seq_id"], self.pos.site in hooks.SAMPLE_SITES)
        if span is None or span[1] <= span[0]:
            return Text("This request has no rows in this tensor.", style="dim")
        rows = t[span[0]:span[1]]
        r = self.row if 0 <= self.row < rows.shape[0] else rows.shape[0] - 1
        head = min(self.head, rows.shape[1] - 1) if rows.dim() == 3 else 0
        title = Text("\nvalues of ")
        title.append_text(seq_label(seq["seq_id"]))
        title.append(f", token {seq['chunk'][0] + r} (row {r + 1} of {rows.shape[0]})" +
                     (f", head {head}" if rows.dim() == 3 else "") + "   ↑↓ row  ←→ columns  - + head  l locate",
                     style="dim")
        name, other = self.twin()
        shown = [("value", rows)]
        if other is not None and other.shape == t.shape:
            o = other[span[0]:span[1]]
            shown += [(name, o), ("difference", rows.double() - o.double())]
        table = value_table(shown, r, head, self.col, self.size.width)
        loc = None
        if other is not None and other.shape == t.shape:
            loc = largest_difference(t, other)
            where = request_of_row(self.step_batch, loc.row, False) if loc else None
            return Group(title, table, locus_line(loc, f"|value - {name}|", ("value", name),
                                                  f"request #{where[0]} row {where[1]}" if where else "?"))
        return Group(title, table)

    def _top_k(self, logits: torch.Tensor, k: int = 5) -> RenderableType:
        tok = self.ctx.tokens
        out = Table(box=None, pad_edge=False, header_style="bold", title="top tokens (softmax of the logits)",
                    title_justify="left", padding=(0, 1))
        out.add_column("request", no_wrap=True)
        for j in range(k):
            out.add_column(f"#{j + 1}", no_wrap=True)
        probs = torch.softmax(logits.double(), dim=-1)
        for s, span in zip(self.step_batch.get("seqs") or [], request_rows(self.step_batch, True), strict=True):
            if span is None:
                continue
            top = torch.topk(probs[span[0]], k=min(k, probs.shape[-1]))
            cells = [Text(f"{tok.piece(int(i)) if tok else int(i)!s} {float(p):.2f}")
                     for p, i in zip(top.values, top.indices, strict=True)]
            out.add_row(seq_label(s["seq_id"]), *cells)
        return out

    def _sampled(self, ids: torch.Tensor) -> RenderableType:
        tok = self.ctx.tokens
        t = Text("\nsampled: ")
        for s, span in zip(self.step_batch.get("seqs") or [], request_rows(self.step_batch, True), strict=True):
            if span is None:
                continue
            tid = int(ids[span[0]])
            t.append_text(seq_label(s["seq_id"]))
            t.append(f" {tid} ")
            t.append(repr(tok.piece(tid)) if tok else "", style="bold")
            t.append("   ")
        return t
