"""Breakpoints and searches: toggling them, adding the palette's conditional ones, ``c`` over history and
traces (``navigation.find_breakpoint``: the live session's own checks), and ``f``, the first (step, layer)
over the judging rule (A/B: the first diverging site)."""

from __future__ import annotations

from typing import Any

from textual import work

from minillama.debug import navigation as nav
from minillama.debug.navigation import Pos

from .cursor import Move


class Breaks:
    """Mixed into ``DebugScreen``."""

    ctx: Any
    pos: Any
    run: Any = None

    def action_breakpoint(self) -> None:
        """Toggle an unconditional breakpoint on the cursor's site (at a step start: every step)."""
        if self.pos is None:
            return
        pattern = "step" if self.pos.site == "step.begin" else self.pos.site
        if self.run is not None:
            on_now = self.run.session.toggle_breakpoint(pattern)
        else:
            from minillama.debug.breakpoints import Breakpoint

            bps = self.ctx.breakpoints
            found = [bp for bp in bps if bp.pattern == pattern and bp.condition is None]
            for bp in found:
                bps.remove(bp)
            if not found:
                bps.append(Breakpoint(pattern))
            on_now = not found
        self.toast(f"Breakpoint {'set on' if on_now else 'removed from'} {pattern}.")
        self.set_ctx()

    def add_breakpoint(self, pattern: str, condition: str | None = None, value: float = 0.0) -> None:
        """Add a conditional breakpoint (from the command palette)."""
        from minillama.debug.breakpoints import Breakpoint

        bp = Breakpoint(pattern, condition, value)
        if self.run is not None:
            self.run.session.add_breakpoint(bp)
        else:
            self.ctx.breakpoints.append(bp)
        self.toast(f"Breakpoint set: {bp.describe()}.")
        self.set_ctx()

    def clear_breakpoints(self) -> None:
        """Remove every breakpoint (from the command palette)."""
        if self.run is not None:
            self.run.session.clear_breakpoints()
        else:
            self.ctx.breakpoints.clear()
        self.toast("All breakpoints cleared.")
        self.set_ctx()

    def action_find(self) -> None:
        """Jump to the first (step, layer) over the judging rule after the cursor (A/B: the first divergence)."""
        self.status("searching…")
        self._find(self.pos)

    @work(thread=True, exclusive=True, group="find")
    def _find(self, pos: Pos | None) -> None:
        ctx = self.ctx
        if ctx.compare is not None:
            hit = ctx.compare.first_divergence()
            move = Move(pos=Pos(hit[0], hit[1].site)) if hit else Move(note="A and B agree at every site.")
            why = f"first divergence: |A-B| {hit[1].max_abs:.3g} ({hit[1].method})" if hit else ""
        else:
            m = ctx.budget.build()
            after = (pos.step, pos.layer if pos.layer is not None else -1) if pos is not None else None
            got = m.first_over(after) or m.first_over(None)
            move = Move(pos=Pos(got[0], f"layers.{got[1]}.attn.out")) if got else \
                Move(note="No layer is over the error budget." if m.index and not bool(m.ratio.size == 0) else
                     "No shadow records: f needs a run with --shadow.")
            why = f"over the budget: {got[2]}" if got else ""
        self.app.call_from_thread(self._found, move, why)

    def _found(self, move: Move, why: str) -> None:
        if move.pos is not None and self.driver is not None and self.driver.live:
            self.driver.following = move.pos == self.driver.head
        self.goto(move, why)

    def action_continue(self) -> None:
        """Run to the next breakpoint (over history and traces: search the recorded steps)."""
        if self.driver is None or self.pos is None:
            return
        if self.driver.live and self.driver.following and not self.driver.stopped:
            self.continue_engine()
            return
        self.status("searching…")
        self._search(self.pos, self.driver.head if self.driver.live else None)

    @work(thread=True, exclusive=True, group="search")
    def _search(self, start: Pos, limit: Pos | None) -> None:
        bps = list(self.ctx.breakpoints)
        hit = nav.find_breakpoint(self.ctx.timeline, start, bps, limit)
        if hit is not None:
            move, why = Move(pos=hit[0]), hit[1]
        elif self.driver.live and not self.driver.stopped:
            move, why = self.driver.to_head("No breakpoint in the history: back at the live head."), ""
        else:
            move = Move(pos=nav.last_pos(self.ctx.timeline), note="No breakpoint ahead: at the end of the trace." if bps
                        else "No breakpoints set (b sets one on the current site): at the end of the trace.")
            why = "end of trace"
        self.app.call_from_thread(self.goto, move, why)
