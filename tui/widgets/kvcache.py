"""KV cache: the physical blocks in use (free runs compressed), who shares each, and one block table.

A cache of 1,024 blocks with three in use must not print a screen of dots: blocks in use are drawn
one cell each in their owner's colour, runs of free blocks as one ``··×1021`` cell. Blocks the step
writes have an amber background; a shared block shows its reference count and its sharers below.
"""

from __future__ import annotations

from typing import Any

from rich.console import Group, RenderableType
from rich.text import Text

from ..format import plural, seq_colour, seq_label
from .base import View

WRITTEN = "#af5f00"


def block_cells(n: int, used: dict[int, dict[str, Any]]) -> list[tuple[int, int]]:
    """The map as runs: ``(block, 1)`` for a block in use, ``(first, -count)`` for a run of free blocks."""
    out: list[tuple[int, int]] = []
    run = 0
    for blk in range(n):
        if blk in used:
            if run:
                out.append((blk - run, -run))
                run = 0
            out.append((blk, 1))
        else:
            run += 1
    if run:
        out.append((n - run, -run))
    return out


def ranges(xs: list[int]) -> str:
    """``0-9, 16-17`` for sorted ints."""
    out: list[str] = []
    for x in xs:
        if out and x == int(out[-1].split("-")[-1]) + 1:
            out[-1] = f"{out[-1].split('-')[0]}-{x}"
        else:
            out.append(str(x))
    return ", ".join(out)


class KVCacheView(View):
    """The block map as the scheduler left it for this step, and the chosen request's block table."""

    TITLE = "KV cache"

    def render_view(self) -> RenderableType:
        b = self.step_batch
        if not b:
            return Text("No step here: the block map appears once a step is scheduled.", style="dim")
        bs, n = int(b.get("block_size") or 16), int(b.get("num_blocks") or 0)
        used = {int(k): v for k, v in (b.get("blocks") or {}).items()}
        owners: dict[int, list[int]] = {}
        for s in b.get("seqs") or []:
            for blk in s["block_table"]:
                owners.setdefault(blk, []).append(s["seq_id"])
        written = {slot // bs for slot in b.get("slot_mapping") or [] if slot >= 0}
        grid = Text()
        for blk, count in block_cells(n, used):
            if count < 0:
                grid.append(f"··×{-count}" if -count > 1 else "··", style="grey50")
                grid.append(" ")
                continue
            info, own = used[blk], owners.get(blk, [])
            colour = seq_colour(own[0]) if own else "grey62"
            ref = int(info.get("ref", 1))
            bg = f" on {WRITTEN}" if blk in written else ""
            if ref > 1:
                grid.append(f"{ref:>2}", style=f"bold black on {colour}" if not bg else f"bold {colour}{bg}")
            else:
                grid.append("▣▣" if info.get("cached") else "■■", style=colour + bg)
            grid.append(" ")
        summary = Text(f"{n} blocks × {bs} slots: {len(used)} in use, {b.get('num_free_blocks', n - len(used))} free "
                       f"({b.get('num_cached_free_blocks') or 0} of them still cached for prefix hits) · prefix hits "
                       f"so far {b.get('prefix_hit_tokens_total') or 0} tokens · preemptions "
                       f"{b.get('preemptions_total') or 0}")
        legend = Text("■■ in use  ▣▣ full (hashed, shareable)  ")
        legend.append(" 2", style="bold black on grey62")
        legend.append(" shared (reference count)  ")
        legend.append("■■", style=f"grey62 on {WRITTEN}")
        legend.append(" written this step  ··×N free run  grey: a request not in this step")
        parts: list[RenderableType] = [summary, grid, legend]
        shared = {blk: own for blk, own in owners.items() if len(own) > 1 or int(used.get(blk, {}).get("ref", 1)) > 1}
        if shared:
            t = Text("shared: ", style="bold")
            for blk, own in sorted(shared.items()):
                t.append(f"block {blk} (ref {used.get(blk, {}).get('ref', len(own))}: ")
                for k, sid in enumerate(own):
                    t.append_text(seq_label(sid))
                    t.append(" " if k + 1 < len(own) else "")
                t.append(")  ")
            parts.append(t)
        seq = self.chosen()
        if seq is not None:
            parts.append(self._table(seq, bs, used, owners))
        return Group(*parts)

    def _table(self, seq: dict[str, Any], bs: int, used: dict[int, dict[str, Any]], owners: dict[int, list[int]]) -> Text:
        sid = seq["seq_id"]
        t = Text("\n")
        t.append_text(seq_label(sid))
        t.append(f" {plural(seq['len'], 'token')}, {seq.get('num_cached') or 0} from the prefix cache "
                 "([ ] picks a request)\n", style="dim")
        t.append(" logical → physical (filled/slots):\n")
        n_tok = seq["num_computed"] + seq["num_new"]
        per_line = max(1, (self.size.width - 2) // 26)
        for i, blk in enumerate(seq["block_table"]):
            filled = max(0, min(bs, n_tok - i * bs))
            others = [o for o in owners.get(blk, []) if o != sid]
            t.append(f"  {i:>3} → {blk:<5}", style=seq_colour(sid))
            t.append(f"{filled:>3}/{bs}")
            t.append((" +" + ",".join(f"#{o}" for o in others)).ljust(8) if others else " " * 8,
                     style="bold" if others else "")
            if (i + 1) % per_line == 0:
                t.append("\n")
        if len(seq["block_table"]) % per_line:
            t.append("\n")
        k = [s["seq_id"] for s in self.step_batch.get("seqs") or []].index(sid)
        cu = self.step_batch.get("cu_seqlens_q") or []
        slots = (self.step_batch.get("slot_mapping") or [])[cu[k]:cu[k + 1]] if k + 1 < len(cu) else []
        if slots:
            per_block: dict[int, list[int]] = {}
            for s in slots:
                per_block.setdefault(s // bs, []).append(s % bs)
            desc = "; ".join(f"block {blk} offsets {ranges(offs)}" for blk, offs in per_block.items())
            t.append(f" written this step: {plural(len(slots), 'slot')} ({desc})")
        else:
            t.append(" no slots written this step")
        return t
