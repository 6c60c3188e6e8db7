"""Tensor inspector: the current site's shape, dtype and statistics, then per request a small slice of values."""

from __future__ import annotations

import torch
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from tui.format import num, seq_label
from tui.navigation import BEGIN
from tui.state import ViewState
from tui.widgets.base import TimelineView
from tui.widgets.where import seq_role


def _batch_table(state: ViewState) -> Table:
    t = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("req", "prompt", "len", "new tokens", "cached", "blocks", "samples", "preempted"):
        t.add_column(col, no_wrap=True)
    for s in state.seqs:
        t.add_row(seq_label(s["seq_id"]), str(s["prompt_len"]), str(s["len"]), seq_role(s),
                  str(s.get("num_cached", 0)), " ".join(map(str, s["block_table"])),
                  "yes" if s.get("samples") else "no", str(s.get("preemptions", 0)))
    return t


class InspectorView(TimelineView):
    """What the cursor's site held: recorded statistics always, values when the full tensor is at hand."""

    TITLE = "tensor inspector"

    def render_state(self, state: ViewState) -> RenderableType:
        if state.event is None:
            return Text("No step to inspect yet.", style="dim")
        if state.site == BEGIN:
            return Group(Text(f"Step {state.event.get('step', state.step)} is about to run "
                              f"({state.event.get('phase', '?')}). Its batch:", style="bold"),
                         _batch_table(state),
                         Text("\nn: run to the end of the next layer · .: next site · s: next step", style="dim"))
        rec = (state.event.get("sites") or {}).get(state.site)
        if rec is None:
            return Text(f"{state.site}: nothing recorded at this step.", style="dim")
        head = Text()
        head.append(state.site, style="bold cyan")
        head.append(f"  shape {tuple(rec.get('shape', []))}  {rec.get('dtype', '?')}")
        head.append(f"  mean {num(rec.get('mean'))}  std {num(rec.get('std'))}  absmax {num(rec.get('absmax'))}")
        bad = (rec.get("nan") or 0) + (rec.get("inf") or 0)
        head.append(f"  nan {rec.get('nan', 0)} inf {rec.get('inf', 0)}", style="bold red" if bad else "")
        head.append(f"  hash {rec.get('hash', '-')}", style="dim")
        tensor = state.timeline.tensor(state.step, state.site)
        parts: list[RenderableType] = [head]
        if tensor is None:
            parts.append(Text("statistics only: the full tensor was not kept (record with "
                              f"--full '{state.site}' to see values)", style="yellow"))
            parts.append(self._rows_table(state, rec, None))
        else:
            parts.append(self._rows_table(state, rec, tensor))
        return Group(*parts)

    def _rows_table(self, state: ViewState, rec: dict, tensor: torch.Tensor | None) -> Table:
        t = Table(box=None, pad_edge=False, header_style="bold")
        t.add_column("req", no_wrap=True)
        t.add_column("rows", no_wrap=True)
        if tensor is None:
            for sid, a, b in rec.get("rows") or []:
                t.add_row(seq_label(sid), f"{a}-{b}")
            return t
        integer = not tensor.is_floating_point()
        for col in (("token",) if integer else ("mean", "std", "absmax")):
            t.add_column(col, no_wrap=True, justify="right")
        n_vals = max(2, (self.width - 46) // 10)
        sub = "" if tensor.dim() <= 2 else f"[{', '.join('0' for _ in range(tensor.dim() - 2))}]"
        if not integer:
            t.add_column(f"last row{sub}[:{n_vals}]", no_wrap=True)
        for sid, a, b in rec.get("rows") or []:
            rows = tensor[a:b]
            if rows.numel() == 0:
                t.add_row(seq_label(sid), f"{a}-{b}", *([""] * (len(t.columns) - 2)))
                continue
            if integer:
                t.add_row(seq_label(sid), f"{a}-{b}", " ".join(str(int(x)) for x in rows.flatten()[:8]))
                continue
            f = rows.double()
            fin = f[torch.isfinite(f)]
            last = rows[-1]
            while last.dim() > 1:
                last = last[0]
            vals = " ".join(f"{num(float(x), 3):>9}" for x in last[:n_vals])
            t.add_row(seq_label(sid), f"{a}-{b}", num(float(fin.mean())) if fin.numel() else "nan",
                      num(float(fin.std())) if fin.numel() > 1 else "0",
                      num(float(fin.abs().max())) if fin.numel() else "nan", vals)
        return t
