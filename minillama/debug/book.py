"""The request fold at any step, fast in both directions: ``RequestFold`` with checkpoints.

Moving the cursor back one step must not fold the whole run again: every ``EVERY`` finished steps a
copy of the fold is kept, so the requests as of step ``i`` cost at most ``EVERY`` events to fold,
whichever way the cursor moves. Steps in progress are never folded (they are still changing).
"""

from __future__ import annotations

import copy
import threading
from typing import Any

from minillama.trace.requests import RequestFold

EVERY = 32


class RequestBook:
    """``after(i)``: every request (prompt, ids, text, finish reason) as of the end of timeline step ``i``."""

    def __init__(self, tl: Any, manifest_requests: Any = ()) -> None:
        self.tl = tl
        self._manifest = manifest_requests
        self._checkpoints: dict[int, RequestFold] = {-1: RequestFold(manifest_requests)}
        # the last fold of each thread: a background fold and the UI thread's do not undo each other's work
        self._last: dict[int, tuple[int, RequestFold]] = {}
        self._lock = threading.Lock()
        #: seq id -> what is known of a request failed by an engine error: ``reason``, ``at`` (the first step
        #: index after it), ``prompt_token_ids`` and ``prompt`` (it may never have finished a step)
        self.failed: dict[int, dict[str, Any]] = {}

    def after(self, i: int) -> dict[int, dict[str, Any]]:
        """Requests as they stood after step ``i`` (``i < 0``: only what the manifest lists)."""
        i = max(i, -1)
        first = int(getattr(self.tl, "first_step", lambda: 0)())
        with self._lock:
            fold, at = self._start(i)
            for k in range(at + 1, i + 1):
                ev = self.tl.event(k)
                if ev is None and k < first:
                    continue  # a live history forgot this step (it was folded when it happened, if watched)
                if ev is None or ev.get("in_progress"):
                    break
                fold.add(ev, k)
                if (k + 1) % EVERY == 0 and k not in self._checkpoints:
                    self._checkpoints[k] = copy.deepcopy(fold)
                at = k
            self._last.pop(threading.get_ident(), None)
            self._last[threading.get_ident()] = (at, fold)
            while len(self._last) > 4:  # threads come and go (workers): keep the recent ones' folds
                self._last.pop(next(iter(self._last)))
            out = fold.snapshot()
        for sid, f in self.failed.items():
            if i < f["at"]:
                continue
            r = out.get(sid) or {"seq_id": sid, "index": None, "prompt": f.get("prompt"), "token_ids": [], "text": "",
                                 "prompt_token_ids": f.get("prompt_token_ids"), "first_step": f["at"]}
            if r.get("finish_reason"):
                continue
            out[sid] = {**r, "finish_reason": f"error ({f['reason']})"}
        return out

    def before(self, i: int) -> dict[int, dict[str, Any]]:
        """Requests as they stood when step ``i`` began: after step ``i - 1``, plus what step ``i`` says about
        requests it lists first (their prompts, and for a recording begun mid-run, the text generated so far),
        but not the tokens it samples."""
        out = self.after(i - 1)
        ev = self.tl.event(i) if i >= 0 else None
        if not ev or not ev.get("prompts"):
            return out
        with self._lock:
            fold = self._fold_of(out)
            fold.add({"batch": ev.get("batch") or {}, "prompts": ev["prompts"]}, i)
            return {**out, **fold.snapshot()}

    def _fold_of(self, snapshot: dict[int, dict[str, Any]]) -> RequestFold:
        """A fold holding ``snapshot``'s requests (to fold a partial event on top of them)."""
        from minillama.trace.requests import Request

        fold = RequestFold()
        for sid, r in snapshot.items():
            fold.requests[sid] = Request(**{k: (list(v) if isinstance(v, list) else v) for k, v in r.items()})
        return fold

    def _start(self, i: int) -> tuple[RequestFold, int]:
        """A fold to continue from: the last one if it is not past ``i``, else the nearest checkpoint."""
        at = max(k for k in self._checkpoints if k <= i)
        last = self._last.get(threading.get_ident())
        if last is not None and at <= last[0] <= i:
            return last[1], last[0]
        return copy.deepcopy(self._checkpoints[at]), at
