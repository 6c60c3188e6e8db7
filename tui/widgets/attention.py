"""Attention: active vs shadow output for the current layer, their difference, and a weight heatmap.

Flash kernels never expose attention weights, so the heatmap recomputes them from the recorded
query rows and the keys the request's block table points at (see ``keys`` on the sources).
"""

from __future__ import annotations

import torch
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from tui.format import heat_colour, num, seq_label
from tui.state import ViewState
from tui.widgets.base import TimelineView


def attention_weights(q: torch.Tensor, k: torch.Tensor, head: int, first_pos: int) -> torch.Tensor:
    """Softmax weights (queries, keys) of query ``head`` for one request, causal, bottom-right aligned.

    ``q`` (queries, heads, head_dim), ``k`` (keys, kv_heads, head_dim); query i sits at position
    ``first_pos + i`` and sees keys ``j <= first_pos + i``; head h reads kv head ``h // (heads // kv_heads)``.
    """
    heads, kv_heads, d = q.shape[1], k.shape[1], q.shape[2]
    qh = q[:, head].double()
    kh = k[:, head // (heads // kv_heads)].double()
    scores = qh @ kh.T * d**-0.5
    pos_q = torch.arange(q.shape[0]).unsqueeze(1) + first_pos
    pos_k = torch.arange(k.shape[0]).unsqueeze(0)
    scores = scores.masked_fill(pos_k > pos_q, float("-inf"))
    return torch.softmax(scores, dim=-1)


def heatmap(w: torch.Tensor, first_pos: int, max_rows: int, max_cols: int) -> Text:
    """Rows = queries (evenly picked, the last one always), columns = keys (max-pooled to fit)."""
    nq, nk = w.shape
    shown = min(nq, max_rows)
    rows = sorted({round(i * (nq - 1) / max(1, shown - 1)) for i in range(shown)})
    bins = min(nk, max_cols)
    cell = max(1, min(3, max_cols // bins))  # few keys: wider cells
    edges = [round(i * nk / bins) for i in range(bins + 1)]
    out = Text()
    for r in rows:
        out.append(f"q@{first_pos + r:<5}", style="dim")
        for c in range(bins):
            if edges[c] > first_pos + r:  # keys after the query: masked by causality
                out.append("·" * cell, style="grey30")
                continue
            v = float(w[r, edges[c]:max(edges[c + 1], edges[c] + 1)].max())
            out.append("█" * cell, style=heat_colour(v))
        out.append("\n")
    out.append(" " * 7)
    axis = f"k0 … k{nk - 1}" + (f"  ({nk} keys, {bins} columns, max-pooled)" if bins < nk else f"  ({nk} keys)")
    axis += "  · masked (causal)  dark → bright = 0 → 1"
    out.append(axis, style="dim")
    return out


class AttentionView(TimelineView):
    """The current layer's attention, as the active and the shadow backend computed it."""

    TITLE = "attention"

    def render_state(self, state: ViewState) -> RenderableType:
        ev = state.event
        if ev is None:
            return Text("No step yet.", style="dim")
        layer = state.layer
        parts: list[RenderableType] = []
        if layer is None:
            after = state.site in ("final_norm", "logits", "sampled")
            layer = max(0, state.timeline.num_layers - 1) if after else 0
            parts.append(Text(f"The cursor is not inside a layer: showing layer {layer} (n and p walk the layers).",
                              style="dim"))
        seq = state.chosen_seq()
        tl, step = state.timeline, state.step
        title = Text()
        title.append(f"layer {layer}", style="bold cyan")
        if seq is not None:
            title.append(" · request ")
            title.append_text(seq_label(seq["seq_id"]))
        title.append(f" · head {state.head}  ([ ] request, - + head)", style="dim")
        parts.append(title)
        metrics = (ev.get("shadow") or {}).get(str(layer))
        if metrics:
            m = Text(f"{metrics.get('backend', 'shadow')}: ")
            for key, label in (("max_abs", "max|active-shadow|"), ("err_active", "active err"),
                               ("err_shadow", "shadow err"), ("budget_ratio", "budget ratio")):
                if key in metrics:
                    m.append(f"{label} {num(metrics[key])}  ")
            parts.append(m)
        active = tl.tensor(step, f"layers.{layer}.attn.out")
        other_name, other = "shadow", tl.tensor(step, f"layers.{layer}.attn.out@shadow")
        if other is None:
            other_name, other = "reference", tl.tensor(step, f"layers.{layer}.attn.out@ref")
        if seq is not None:
            parts.append(self._side_by_side(state, seq, layer, active, other_name, other))
            parts.append(self._weights(state, seq, layer))
        return Group(*parts)

    def _rows(self, state: ViewState, seq: dict, site: str) -> tuple[int, int]:
        for sid, a, b in ((state.event.get("sites") or {}).get(site) or {}).get("rows") or []:
            if sid == seq["seq_id"]:
                return a, b
        cu = state.batch.get("cu_seqlens_q") or []
        i = [s["seq_id"] for s in state.seqs].index(seq["seq_id"])
        return (cu[i], cu[i + 1]) if i + 1 < len(cu) else (0, 0)

    def _side_by_side(self, state: ViewState, seq: dict, layer: int, active: torch.Tensor | None,
                      other_name: str, other: torch.Tensor | None) -> RenderableType:
        if active is None:
            return Text(f"\nThe attention output of layer {layer} was not kept in full at this step (it is "
                        "with --shadow, or with --full 'layers.*.attn.out').", style="yellow")
        if other is None:
            return Text(f"\nNo shadow or reference output for layer {layer} at this step: start with --shadow "
                        "(or record with --shadow reference) to compare backends.", style="yellow")
        a, b = self._rows(state, seq, f"layers.{layer}.attn.out")
        if b <= a or active.shape != other.shape:
            return Text("\nThis request has no rows in this step's attention output.", style="dim")
        act, oth = active[a:b].double(), other[a:b].double()
        diff = act - oth
        h = min(state.head, act.shape[1] - 1) if act.dim() == 3 else 0
        n_vals = max(3, (self.width - 22) // 10)
        t = Table(box=None, pad_edge=False, header_style="bold", title_justify="left")
        t.add_column(f"last row, head {h}", no_wrap=True)
        t.add_column(f"[:{n_vals}]", no_wrap=True)
        for name, x in (("active", act), (other_name, oth), ("difference", diff)):
            row = x[-1, h] if x.dim() == 3 else x[-1]
            t.add_row(name, " ".join(f"{num(float(v), 3):>9}" for v in row[:n_vals]),
                      style="bold red" if name == "difference" and float(row.abs().max()) > 1e-3 else "")
        per_head = Text("max |difference| per head: ")
        if diff.dim() == 3:
            worst = diff.abs().amax(dim=(0, 2))
            for i, v in enumerate(worst.tolist()):
                per_head.append(f"h{i} {num(v, 2)}  ", style="bold red" if v > 1e-3 else "")
        return Group(Text(""), t, per_head)

    def _weights(self, state: ViewState, seq: dict, layer: int) -> RenderableType:
        site = f"layers.{layer}.attn.q"
        q = state.timeline.tensor(state.step, site)
        if q is None:
            return Text(f"\nNo attention weights: {site} was not recorded in full at this step (record with "
                        "--full 'layers.*.attn.q' --full 'layers.*.attn.k').", style="yellow")
        a, b = self._rows(state, seq, site)
        if b <= a:
            return Text("\nThis request has no queries in this step.", style="dim")
        upto = seq["num_computed"] + seq["num_new"]
        keys = state.timeline.keys(state.step, layer, seq, upto)
        if keys.k is None:
            return Text(f"\nNo attention weights: {keys.note}.", style="yellow")
        head = min(state.head, q.shape[1] - 1)
        w = attention_weights(q[a:b].float(), keys.k, head, seq["num_computed"])
        top = torch.topk(w[-1], k=min(5, w.shape[1]))
        t = Text(f"\nweights, head {head} ({keys.note}); last query's top keys: ", style="bold")
        t.append(", ".join(f"k{int(i)} {float(v):.2f}" for v, i in zip(top.values, top.indices, strict=True)),
                 style="")
        return Group(t, heatmap(w, seq["num_computed"], max_rows=12, max_cols=max(8, self.width - 9)))
