"""One timeline over several debug sessions of the same engine (a session restarted after an error).

Each session's ``LiveTimeline`` counts its steps from 0; the chain lays them end to end, so the
history before a restart stays browsable and the views never see the seam. Requests that go on in
the next session keep their seq id, so one fold (``RequestBook``) spans them; requests failed at a
restart carry their reason.
"""

from __future__ import annotations

from typing import Any

from minillama.debug.book import RequestBook
from minillama.debug.timeline import LiveTimeline


class ChainTimeline:
    """The ``Timeline`` interface over sessions laid end to end (the last one is live)."""

    live = True

    def __init__(self, session: Any) -> None:
        self._segments: list[tuple[int, LiveTimeline, int | None]] = [(0, LiveTimeline(session), None)]
        self.book = RequestBook(self)
        cur = self._segments[0][1]
        self.num_layers, self.dtype, self.llm, self.catalog = cur.num_layers, cur.dtype, cur.llm, cur.catalog

    def add(self, session: Any, failed: dict[int, dict[str, Any]]) -> None:
        """Freeze the current session's steps and append ``session``'s (``failed``: ``RequestBook.failed`` entries
        without their ``at``)."""
        off, tl, _ = self._segments[-1]
        n = tl.num_steps()
        self._segments[-1] = (off, tl, n)
        self._segments.append((off + n, LiveTimeline(session), None))
        for sid, f in failed.items():
            self.book.failed[sid] = {**f, "at": off + n}

    # ---- which session holds index i ------------------------------------------------------------
    @property
    def current(self) -> LiveTimeline:
        return self._segments[-1][1]

    @property
    def session(self) -> Any:
        return self.current.session

    @property
    def recorder(self) -> Any:
        return self.current.recorder

    @property
    def offset(self) -> int:
        """The index of the current session's first step."""
        return self._segments[-1][0]

    def _find(self, i: int) -> tuple[LiveTimeline, int] | None:
        for off, tl, n in reversed(self._segments):
            if i >= off:
                k = i - off
                return (tl, k) if n is None or k < n else None
        return None

    def _call(self, name: str, i: int, *args: Any, default: Any = None) -> Any:
        got = self._find(i)
        return default if got is None else getattr(got[0], name)(got[1], *args)

    # ---- the Timeline interface -------------------------------------------------------------------
    def num_steps(self) -> int:
        off, tl, _ = self._segments[-1]
        return off + tl.num_steps()

    def first_step(self) -> int:
        off, tl, n = self._segments[0]
        return off + min(tl.first_step(), n if n is not None else tl.first_step())

    def event(self, i: int) -> dict[str, Any] | None:
        return self._call("event", i)

    def site_names(self, i: int) -> list[str]:
        return self._call("site_names", i, default=[])

    def stats(self, i: int, site: str, seq_id: int | None = None) -> dict[str, Any] | None:
        return self._call("stats", i, site, seq_id)

    def shadow(self, i: int, seq_id: int | None = None) -> dict[str, Any]:
        return self._call("shadow", i, seq_id, default={})

    def tensor(self, i: int, site: str):
        return self._call("tensor", i, site)

    def _tables(self, i: int):
        return self._call("_tables", i)

    def engine_step(self, i: int) -> int:
        ev = self.event(i)
        return int(ev["step"]) if ev is not None else i

    def index_of(self, session: Any, engine_step: int) -> int | None:
        """The chain index of ``engine_step`` of the current session (a paused position)."""
        off, tl, _ = self._segments[-1]
        if tl.session is not session:
            return None
        cur = session.current_event
        if cur is not None and int(cur["step"]) == engine_step:
            return off + tl.recorder.num_records
        for k in range(tl.num_steps() - 1, tl.first_step() - 1, -1):
            ev = tl.event(k)
            if ev is not None and int(ev["step"]) == engine_step:
                return off + k
        return None

    def requests(self, upto: int | None = None) -> dict[int, dict[str, Any]]:
        """Every request as of step ``upto`` (default: the newest finished step), over every session."""
        return self.book.after(self.num_steps() - 1 if upto is None else upto)

    def title(self) -> str:
        restarts = len(self._segments) - 1
        return self.current.title() + (f" · restarted {restarts}x" if restarts else "")
