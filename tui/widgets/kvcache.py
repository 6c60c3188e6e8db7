"""KV cache: the physical blocks coloured by owner, free and shared blocks, and one request's block table."""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.text import Text

from tui.format import seq_colour, seq_label
from tui.state import ViewState
from tui.widgets.base import TimelineView


def _ranges(xs: list[int]) -> str:
    """``0-9, 16-17`` for a sorted list of ints."""
    out, start, prev = [], None, None
    for x in xs:
        if start is None:
            start = prev = x
        elif x == prev + 1:
            prev = x
        else:
            out.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = prev = x
    if start is not None:
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
    return ", ".join(out)


class KVCacheView(TimelineView):
    """The block map as the scheduler left it for this step, and the chosen request's logical-to-physical table."""

    TITLE = "KV cache"

    def render_state(self, state: ViewState) -> RenderableType:
        b = state.batch
        if not b:
            return Text("No step yet: the block map appears once a step is scheduled.", style="dim")
        bs, n = int(b.get("block_size", 16)), int(b.get("num_blocks", 0))
        blocks = {int(k): v for k, v in (b.get("blocks") or {}).items()}
        owners: dict[int, list[int]] = {}
        for s in state.seqs:
            for blk in s["block_table"]:
                owners.setdefault(blk, []).append(s["seq_id"])
        written = {slot // bs for slot in b.get("slot_mapping") or [] if slot >= 0}
        cells_per_row = max(8, (self.width - 6) // 3)
        cells_per_row -= cells_per_row % 8 if cells_per_row >= 16 else 0
        grid = Text()
        for start in range(0, n, cells_per_row):
            grid.append(f"{start:>4} ", style="dim")
            for blk in range(start, min(n, start + cells_per_row)):
                info = blocks.get(blk)
                if info is None:
                    grid.append("·· ", style="grey42")
                    continue
                ref = int(info.get("ref", 1))
                own = owners.get(blk)
                colour = seq_colour(own[0]) if own else "grey50"
                label = f"{ref:>2}" if ref > 1 else ("▓▓" if info.get("cached") else "██")
                style = f"bold white on {colour}" if ref > 1 else colour
                if blk in written:
                    style += " underline"
                grid.append(label, style=style)
                grid.append(" ")
            grid.append("\n")
        used = len(blocks)
        summary = Text()
        summary.append(f"{n} blocks × {bs} slots: {used} in use, {b.get('num_free_blocks', n - used)} free "
                       f"({b.get('num_cached_free_blocks', 0)} of them still cached for prefix hits) · "
                       f"prefix hits so far {b.get('prefix_hit_tokens_total', 0)} tokens · "
                       f"preemptions {b.get('preemptions_total', 0)}")
        legend = Text("██ owned  ▓▓ full (hashed, shareable)  ")
        legend.append(" 2", style="bold white on grey50")
        legend.append(" shared, ref count  ")
        legend.append("██", style="underline")
        legend.append(" written this step  ·· free   ")
        for s in state.seqs:
            legend.append_text(seq_label(s["seq_id"]))
            legend.append(" ")
        parts: list[RenderableType] = [summary, grid, legend]
        seq = state.chosen_seq()
        if seq is not None:
            parts.append(self._table(state, seq, bs))
        return Group(*parts)

    def _table(self, state: ViewState, seq: dict, bs: int) -> Text:
        b = state.batch
        sid = seq["seq_id"]
        t = Text("\n")
        t.append_text(seq_label(sid))
        t.append(f" ({seq['len']} tokens, {seq.get('num_cached', 0)} from the prefix cache; [ ] picks a request)\n",
                 style="dim")
        t.append(" logical → physical (filled/slots):\n")
        n_tok = seq["num_computed"] + seq["num_new"]
        blocks = b.get("blocks") or {}
        per_line = max(1, (self.width - 2) // 24)
        for i, blk in enumerate(seq["block_table"]):
            filled = max(0, min(bs, n_tok - i * bs))
            ref = int((blocks.get(str(blk)) or {}).get("ref", 1))
            t.append(f"  {i:>3} → {blk:<4}", style=seq_colour(sid))
            t.append(f"{filled:>2}/{bs}" + (f" ref {ref}" if ref > 1 else "").ljust(7))
            if (i + 1) % per_line == 0:
                t.append("\n")
        if len(seq["block_table"]) % per_line:
            t.append("\n")
        # the slots this request wrote in this step: its part of the flat slot mapping
        rows = dict((s["seq_id"], i) for i, s in enumerate(state.seqs))
        cu = b.get("cu_seqlens_q") or []
        i = rows.get(sid)
        slots = (b.get("slot_mapping") or [])[cu[i]:cu[i + 1]] if i is not None and i + 1 < len(cu) else []
        if slots:
            per_block: dict[int, list[int]] = {}
            for s in slots:
                per_block.setdefault(s // bs, []).append(s % bs)
            desc = "; ".join(f"block {blk} offsets {_ranges(offs)}" for blk, offs in per_block.items())
            t.append(f" slots written this step ({len(slots)}): {_ranges(sorted(slots))}  ({desc})")
        else:
            t.append(" no slots written this step")
        return t
