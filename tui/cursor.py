"""Cursor logic: where a key takes the cursor, and when it must make the live engine run instead.

Replay and the finished steps of a live session are history: keys move over them (``navigation``).
Live, the engine is paused at the head; a forward key at the head runs the engine to the next
step / layer / site, and keys pressed while it runs are queued (each one still stops where it
would have). Stepping forward from history onto the head follows the engine again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from minillama.debug import navigation as nav
from minillama.debug.navigation import BEGIN, Pos


@dataclass
class Move:
    """What a key does: ``pos`` to move to, ``run`` a unit for the engine, ``note`` to tell the user."""

    pos: Pos | None = None
    run: str | None = None
    note: str = ""


@dataclass
class Driver:
    """The cursor's relation to a timeline and (live) to the paused engine. ``session`` is None in replay."""

    tl: Any
    session: Any = None
    head: Pos | None = None  # live: where the engine is paused
    following: bool = True  # live: the cursor tracks the head
    running: str | None = None  # the unit the engine is running to
    queue: list[str] = field(default_factory=list)
    idle: bool = False
    stopped: str | None = None  # the engine stopped for good: why

    @property
    def live(self) -> bool:
        return self.session is not None

    def mode(self, loaded: bool, compare: bool = False) -> str:
        """The badge of the where panel: loading, replay, A/B replay, stopped, history, running, idle, live head."""
        if not loaded:
            return "loading"
        if not self.live:
            return "A/B replay" if compare else "replay"
        if self.stopped:
            return "stopped"
        if not self.following:
            return "history"
        if self.running:
            return "running"
        return "idle" if self.idle else "live head"

    def forward(self, cursor: Pos | None, unit: str) -> Move:
        """``s`` / ``n`` / ``.`` from ``cursor``."""
        if cursor is None:
            return Move(note="No step yet.")
        if self.live and self.following and not self.stopped:
            if self.running:
                self.queue.append(unit)
                return Move(note=f"queued ({len(self.queue)} waiting)")
            if self.idle:
                return Move(note="All requests finished: press / and type a prompt to start new work.")
            return Move(run=unit)
        nxt = nav.next_pos(self.tl, cursor, unit)
        if nxt is None:
            if self.live and not self.stopped:
                return self.to_head("back at the live head")
            return Move(note="At the end of the trace." if not self.live else
                        "At the newest step: the engine stopped (R restarts it).")
        if self.live and self.head is not None and not nav.before(self.tl, nxt, self.head):
            return self.to_head("back at the live head")
        return Move(pos=nxt)

    def back(self, cursor: Pos | None, unit: str) -> Move:
        """``S`` / ``p`` / ``,`` from ``cursor``."""
        if cursor is None:
            return Move(note="No step yet.")
        prv = nav.prev_pos(self.tl, cursor, unit)
        if prv is None:
            first = nav.first_index(self.tl)
            return Move(note="At the first step: nothing earlier was recorded." if first == 0 else
                        f"At the oldest step kept in memory (#{first}): record with r to keep every step.")
        if self.live:
            self.following = False
        return Move(pos=prv)

    def to_head(self, note: str = "") -> Move:
        """Follow the engine again: to the paused head, or the newest position."""
        self.following = True
        return Move(pos=self.head or nav.last_pos(self.tl), note=note)

    def last(self) -> Move:
        """``G``: the end of the newest step (live: the head)."""
        if self.live and not self.stopped:
            return self.to_head("at the live head")
        return Move(pos=nav.last_pos(self.tl))

    def first(self) -> Move:
        """``g``: the start of the oldest step."""
        n, first = self.tl.num_steps(), nav.first_index(self.tl)
        if n <= first:
            return Move(note="No step yet.")
        if self.live:
            self.following = False
        return Move(pos=Pos(first, BEGIN))

    def paused(self, index: int | None, site: str, breakpoint: bool) -> Move:
        """The engine paused at ``(index, site)``: the new head, and the queued unit to run next."""
        if index is None:
            return Move()
        if site.endswith(".attn.call"):  # not a recorded site: show the inputs just before it
            site = site.removesuffix("call") + "v"
        self.head, self.running, self.idle = Pos(index, site), None, False
        if breakpoint:
            self.queue.clear()
        if self.queue and self.following:
            return Move(pos=self.head, run=self.queue.pop(0))
        return Move(pos=self.head if self.following else None)

    def went_idle(self) -> Move:
        """The engine has nothing to do: the cursor (if following) goes to the end of the newest step."""
        self.queue.clear()
        self.running, self.idle, self.head = None, True, None
        return Move(pos=nav.last_pos(self.tl) if self.following else None,
                    note="All requests finished: press / to type a prompt.")
