"""The screen's choices inside a step: which request, head, token row and column the views show, and the
locator (``l``) that moves them to the largest difference of the visible view."""

from __future__ import annotations

from typing import Any

from .widgets.base import Choose
from .widgets.heatmap import HeatmapView


class Selection:
    """Mixed into ``DebugScreen`` (which owns the ``seq_id``, ``head``, ``row`` and ``col`` reactives)."""

    ctx: Any
    pos: Any

    def on_choose(self, msg: Choose) -> None:
        msg.stop()
        for name in ("seq_id", "head", "col"):
            if getattr(msg, name) is not None:
                setattr(self, name, getattr(msg, name))
        if msg.row is not None:
            self.row = msg.row

    def action_seq(self, delta: int) -> None:
        """Choose the request the views show."""
        ev = self.ctx.timeline.event(self.pos.step) if self.pos else None
        ids = [s["seq_id"] for s in ((ev or {}).get("batch") or {}).get("seqs", [])]
        if ids:
            k = ids.index(self.seq_id) if self.seq_id in ids else 0
            self.seq_id = ids[(k + delta) % len(ids)]

    def action_head(self, delta: int) -> None:
        """Choose the attention head."""
        t = self.ctx.timeline.tensor(self.pos.step, f"layers.{self.pos.layer or 0}.attn.q") if self.pos else None
        heads = t.shape[1] if t is not None and t.dim() == 3 else 64
        self.head = (self.head + delta) % max(heads, 1)

    def action_row(self, delta: int) -> None:
        """Choose the token row of the chosen request (inspector, attention)."""
        self.row = max(-1, self.row + delta) if self.row >= 0 or delta < 0 else -1
        if self.row == -1 and delta < 0:
            self.row = 0 if self._rows() <= 1 else self._rows() - 2
        self.row = min(self.row, max(self._rows() - 1, 0)) if self.row >= 0 else -1

    def _rows(self) -> int:
        ev = self.ctx.timeline.event(self.pos.step) if self.pos else None
        seq = next((s for s in ((ev or {}).get("batch") or {}).get("seqs", []) if s["seq_id"] == self.seq_id), None)
        return int(seq["num_new"]) if seq else 0

    def action_col(self, delta: int) -> None:
        """Choose the column (dimension) shown highlighted; the window of values follows it."""
        t = self.ctx.timeline.tensor(self.pos.step, self.pos.site) if self.pos else None
        width = t.shape[-1] if t is not None and t.dim() >= 2 else 1 << 20
        self.col = min(max(0, self.col + delta), width - 1)

    def action_locate(self) -> None:
        """Move the slice to the largest difference (or value) of the visible view."""
        for name in (self.view, "attention", "inspector"):
            view = self.query_one(f"#{name}")
            if view.display and hasattr(view, "locate"):
                got = view.locate()
                if got is not None:
                    self.on_choose(got)
                    return
        self.toast("Nothing to locate here: move to a site kept in full (attention output, or a --full site).")

    def action_toggle(self) -> None:
        self.query_one(HeatmapView).toggle()

