"""Attention: the layer's output as the active and the shadow backend computed it, and where they differ.

``l`` locates the largest |active - shadow| of the step (request, token, head, dimension, both
values) and moves the slice there. Below, the weights of the chosen head (recomputed from the
recorded queries and the rebuilt keys, ``minillama.debug.keys``) beside a tokens x heads map of the
difference; the chosen query's strongest keys are listed with their token text.
"""

from __future__ import annotations

from typing import Any

import torch
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from textual import work

from minillama import hooks
from minillama.debug.keys import Keys, attention_weights, host, largest_difference, rows_of
from minillama.debug.tokens import sequence_ids
from minillama.trace.tables import judge

from ..format import diff_colour, flat, head, heat_colour, num, seq_label
from .base import Choose, View
from .inspector import request_of_row
from .slices import locus_line, value_table

DIFF_THRESHOLD = 1e-3


def weight_map(w: torch.Tensor, first_pos: int, chosen: int, max_rows: int, max_cols: int) -> Text:
    """Queries (evenly picked, the chosen one always) x keys (max-pooled to fit); ``·`` masked by causality."""
    nq, nk = w.shape
    rows = sorted({round(i * (nq - 1) / max(1, min(nq, max_rows) - 1)) for i in range(min(nq, max_rows))} | {chosen})
    bins = max(1, min(nk, max_cols))
    cell = max(1, min(3, max_cols // bins))
    edges = [round(i * nk / bins) for i in range(bins + 1)]
    out = Text()
    for r in rows:
        out.append(f"{'▸' if r == chosen else ' '}q{first_pos + r:<5}", style="bold" if r == chosen else "dim")
        for c in range(bins):
            if edges[c] > first_pos + r:
                out.append("·" * cell, style="grey30")
                continue
            out.append("█" * cell, style=heat_colour(float(w[r, edges[c]:max(edges[c + 1], edges[c] + 1)].max())))
        out.append("\n")
    out.append(f"        k0 … k{nk - 1}" + (f" ({nk} keys in {bins} columns, max-pooled)" if bins < nk else ""),
               style="dim")
    return out


def diff_map(d: torch.Tensor, first_pos: int, chosen: int, max_rows: int) -> Text:
    """Tokens x heads of max |active - shadow| over the head's dimensions (fixed colour scale)."""
    nq = d.shape[0]
    rows = sorted({round(i * (nq - 1) / max(1, min(nq, max_rows) - 1)) for i in range(min(nq, max_rows))} | {chosen})
    out = Text()
    for r in rows:
        out.append(f"{'▸' if r == chosen else ' '}q{first_pos + r:<5}", style="bold" if r == chosen else "dim")
        for h in range(d.shape[1]):
            out.append("  ", style=f"on {diff_colour(float(d[r, h]), DIFF_THRESHOLD)}")
        out.append("\n")
    out.append(f"        h0 … h{d.shape[1] - 1} max |a-s|: dark 0, green < {DIFF_THRESHOLD:g}, red over", style="dim")
    return out


class AttentionView(View):
    """The chosen layer's attention at the cursor's step."""

    TITLE = "attention"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._keys: dict[tuple, Keys] = {}

    def _layer(self) -> int:
        layer = self.cur_layer
        if layer is None:
            after = self.pos is not None and self.pos.site in ("final_norm", "logits", "sampled")
            layer = max(0, int(self.tl.num_layers) - 1) if after else 0
        return layer

    def outputs(self) -> tuple[torch.Tensor | None, str, torch.Tensor | None]:
        """The active output of the layer, the name of the other one, and the other one (host tensors)."""
        base = hooks.layer_site(self._layer(), "attn.out")
        active = host(self.tl.tensor(self.pos.step, base))
        for name in ("shadow", "ref"):
            other = host(self.tl.tensor(self.pos.step, f"{base}@{name}"))
            if other is not None:
                return active, name, other
        return active, "", None

    def locate(self) -> Choose | None:
        active, _name, other = self.outputs()
        loc = largest_difference(active, other) if active is not None and other is not None else None
        got = request_of_row(self.step_batch, loc.row, False) if loc else None
        return Choose(seq_id=got[0], head=loc.head, row=got[1], col=loc.col) if got else None

    def render_view(self) -> RenderableType:
        if self.event is None:
            return Text("No step here.", style="dim")
        layer, seq = self._layer(), self.chosen()
        title = Text()
        title.append(f"layer {layer}", style="bold #87d7ff")
        if seq is not None:
            title.append(" · request ")
            title.append_text(seq_label(seq["seq_id"]))
        title.append(f" · head {self.head}   [ ] request  - + head  ↑↓ token  ←→ dims  l locate", style="dim")
        parts: list[RenderableType] = [title]
        if self.cur_layer is None:
            parts.append(Text(f"(the cursor is not inside a layer: showing layer {layer}; n walks the layers)",
                              style="dim"))
        m = self.tl.shadow(self.pos.step).get(str(layer))
        if m:
            line = Text(f"{m.get('backend', 'shadow')}: ")
            for key, label in (("max_abs", "max|active-shadow|"), ("err_active", "active err"),
                               ("err_shadow", "shadow err"), ("budget_ratio", "ratio")):
                if m.get(key) is not None:
                    line.append(f"{label} {num(m[key])}  ")
            why = judge(m)
            line.append(f"OVER: {why}" if why else "within the error budget",
                        style="bold #ff5f5f" if why else "#5fd75f")
            parts.append(line)
        active, name, other = self.outputs()
        graphed = bool((self.event or {}).get("graphed"))
        if active is None:
            ran = hooks.layer_site(layer, "attn.out") in self.tl.site_names(self.pos.step)
            why = ("was not kept in full at this step (record with --full 'layers.*.attn.out')" if ran else
                   "has not run yet at this step (n runs the next layer)")
            if ran and graphed:
                why = ("was not kept in full: this step replayed a CUDA graph (its statistics are complete; pause "
                       "inside a step with n to keep every tensor)")
            return Group(*parts, Text(f"\nlayers.{layer}.attn.out {why}.", style="#ffd75f" if ran else "dim"))
        if other is None and m:
            parts.append(Text("\nThe shadow's output was compared on the device but not kept in full at this step"
                              + (" (it replayed a CUDA graph; pause inside a step with n to keep it)" if graphed else
                                 " (keep it with --full 'layers.*.attn.out@*')") + "; its numbers are in the diff view.",
                              style="dim"))
        elif other is None:
            parts.append(Text("\nNo second attention to compare with: start with --shadow (a backend, or alone for "
                              "the float64 reference).", style="#ffd75f"))
        elif other.shape == active.shape:
            loc = largest_difference(active, other)
            where = request_of_row(self.step_batch, loc.row, False) if loc else None
            token = (next(s for s in self.step_batch["seqs"] if s["seq_id"] == where[0])["chunk"][0] + where[1]) \
                if where else 0
            parts.append(locus_line(loc, f"|active - {name}|", ("active", name),
                                    f"request #{where[0]}, token {token}" if where else "?"))
        if seq is not None:
            parts.extend(self._request(seq, layer, active, name, other))
        return Group(*parts)

    def _request(self, seq: dict[str, Any], layer: int, active: torch.Tensor, name: str,
                 other: torch.Tensor | None) -> list[RenderableType]:
        span = rows_of(self.step_batch, seq["seq_id"])
        if span is None or span[1] <= span[0]:
            return [Text("\nThis request has no queries in this step.", style="dim")]
        act = active[span[0]:span[1]]
        r = self.row if 0 <= self.row < act.shape[0] else act.shape[0] - 1
        h = min(self.head, act.shape[1] - 1)
        shown = [("active", act)]
        d = None
        if other is not None and other.shape == active.shape:
            oth = other[span[0]:span[1]]
            d = (act.double() - oth.double()).abs()
            shown += [(name, oth), ("difference", act.double() - oth.double())]
        ids = sequence_ids(self.requests(self.pos.step).get(seq["seq_id"]))
        pos_r = seq["chunk"][0] + r
        piece = self.ctx.tokens.piece(ids[pos_r]) if self.ctx.tokens is not None and pos_r < len(ids) else ""
        sub = Text(f"\ntoken {pos_r}" + (f" {flat(piece)!r}" if piece else "") +
                   f" (row {r + 1} of {act.shape[0]}), head {h}:", style="bold")
        out: list[RenderableType] = [sub, value_table(shown, r, h, self.col, self.size.width)]
        caption, weights = self._weights(seq, layer, span, r, h)
        out.append(caption)
        if d is not None and weights is not None:
            grid = Table.grid(padding=(0, 3))
            grid.add_column()
            grid.add_column()
            grid.add_row(Text(f"weights of head {h} (query × key)", style="bold"),
                         Text("max |active - shadow| (query × head)", style="bold"))
            grid.add_row(weights, diff_map(d.amax(dim=2), seq["chunk"][0], r, max_rows=10))
            out.append(grid)
        elif weights is not None:
            out.append(weights)
        elif d is not None:
            out.append(diff_map(d.amax(dim=2), seq["chunk"][0], r, max_rows=10))
        return out

    def _weights(self, seq: dict[str, Any], layer: int, span: tuple[int, int], r: int,
                 h: int) -> tuple[RenderableType, RenderableType | None]:
        """A caption (where the keys came from, the strongest keys) and the weight map, or why there is none."""
        q = host(self.tl.tensor(self.pos.step, hooks.layer_site(layer, "attn.q")))
        if q is None:
            return Text("\nno weights: layers.*.attn.q was not kept in full at this step (record with --full "
                        "'layers.*.attn.q' --full 'layers.*.attn.k')", style="#ffd75f"), None
        upto = seq["num_computed"] + seq["num_new"]
        key = (self.pos.step, layer, seq["seq_id"], upto)
        keys = self._keys.get(key)
        if keys is None:
            self._rebuild(key, seq)
            return Text("\nrebuilding the keys this request attended to…", style="dim italic"), None
        if keys.k is None:
            return Text(f"\nno weights: {keys.note}", style="#ffd75f"), None
        w = attention_weights(q[span[0]:span[1]], keys.k, h, seq["num_computed"])
        ids = sequence_ids(self.requests(self.pos.step).get(seq["seq_id"]))
        tok = self.ctx.tokens
        top = torch.topk(w[r], k=min(5, w.shape[1]))
        t = Text(f"\nkeys from {keys.note}; token {seq['chunk'][0] + r}'s strongest keys: ", style="bold")
        for v, i in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            piece = tok.piece(ids[i]) if tok is not None and i < len(ids) else ""
            t.append(f"k{i} ")
            t.append(repr(head(flat(piece), 12)) if piece else "", style="italic")
            t.append(f" {v:.2f}  ")
        room = max(8, self.size.width - 16 - 2 * int(q.shape[1]) - 14)
        return t, weight_map(w, seq["num_computed"], r, max_rows=10, max_cols=room)

    @work(thread=True, exclusive=True, group="keys")
    def _rebuild(self, key: tuple, seq: dict[str, Any]) -> None:
        step, layer, _sid, upto = key
        try:
            got = self.ctx.keys.keys(step, layer, seq, upto)
        except Exception as e:  # a damaged trace: say so in the view, never crash the app
            got = Keys(None, f"rebuilding the keys failed ({type(e).__name__}: {e})")
        self.app.call_from_thread(self._got_keys, key, got)

    def _got_keys(self, key: tuple, keys: Keys) -> None:
        self._keys[key] = keys
        if len(self._keys) > 32:
            self._keys.pop(next(iter(self._keys)))
        self.schedule()
