"""One timeline, two sources: a live debug session or a recorded trace.

Views ask "what happened at step i", "what were the statistics of site x for request r", "what did
the shadow say", "which requests exist" and step forward or back, without knowing whether the
answer comes from memory or from disk. Both sources hold the same step events and the same
per-request tables (``trace/README.md``), read with the same functions (``trace.tables``), and fold
requests with the one ``RequestFold``.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch

from minillama.trace import tables as _tables
from minillama.trace.requests import RequestFold


class Timeline(Protocol):
    live: bool
    num_layers: int
    dtype: str

    def num_steps(self) -> int: ...
    def event(self, i: int) -> dict[str, Any] | None: ...
    def site_names(self, i: int) -> list[str]: ...
    def stats(self, i: int, site: str, seq_id: int | None = None) -> dict[str, Any] | None: ...
    def shadow(self, i: int, seq_id: int | None = None) -> dict[str, Any]: ...
    def tensor(self, i: int, site: str) -> torch.Tensor | None: ...
    def requests(self, upto: int | None = None) -> dict[int, dict[str, Any]]: ...
    def title(self) -> str: ...


def _req_index(event: dict[str, Any], seq_id: int | None) -> int | None:
    if seq_id is None:
        return None
    for k, s in enumerate(event["batch"]["seqs"]):
        if s["seq_id"] == seq_id:
            return k
    return None


class _Folded:
    """The request fold, kept incrementally over a growing list of events."""

    def __init__(self, manifest_requests: Any = ()) -> None:
        self._manifest = manifest_requests
        self._fold = RequestFold(manifest_requests)
        self._upto = -1
        self._cache: dict[int, dict[int, dict[str, Any]]] = {}

    def requests(self, source, upto: int | None) -> dict[int, dict[str, Any]]:
        last = source.num_steps() - 1 if upto is None else min(upto, source.num_steps() - 1)
        if last < self._upto:  # going back: fold again from the start (cached per step)
            if last in self._cache:
                return self._cache[last]
            fold = RequestFold(self._manifest)
            for i in range(last + 1):
                ev = source.event(i)
                if ev is not None:
                    fold.add(ev, i)
            self._cache[last] = fold.snapshot()
            return self._cache[last]
        for i in range(self._upto + 1, last + 1):
            ev = source.event(i)
            if ev is not None and not ev.get("in_progress"):
                self._fold.add(ev, i)
        self._upto = last
        return self._fold.snapshot()


class TraceTimeline:
    """Timeline over a recorded trace (``minillama.trace.TraceReader``); needs no model or GPU."""

    live = False

    def __init__(self, reader) -> None:
        self.reader = reader
        self.num_layers = reader.num_layers
        self.dtype = str(reader.manifest.get("dtype", "float32"))
        self._fold = _Folded(reader.manifest.get("requests"))

    def num_steps(self) -> int:
        return self.reader.num_steps

    def event(self, i: int) -> dict[str, Any] | None:
        return self.reader.step(i) if 0 <= i < self.reader.num_steps else None

    def site_names(self, i: int) -> list[str]:
        return self.reader.site_names(i)

    def stats(self, i: int, site: str, seq_id: int | None = None) -> dict[str, Any] | None:
        try:
            return self.reader.stats(i, site, seq_id)
        except KeyError:
            return None

    def shadow(self, i: int, seq_id: int | None = None) -> dict[str, Any]:
        try:
            return self.reader.shadow(i, seq_id)
        except KeyError:
            return {}

    def tensor(self, i: int, site: str) -> torch.Tensor | None:
        return self.reader.tensor(i, site)

    def requests(self, upto: int | None = None) -> dict[int, dict[str, Any]]:
        return self._fold.requests(self, upto)

    def title(self) -> str:
        m = self.reader.manifest
        shadow = m.get("shadow")
        return f"replay: {self.reader.path} ({m.get('backend', '?')}{', shadow ' + str(shadow) if shadow else ''})"


class LiveTimeline:
    """Timeline over a running ``DebugSession`` (its recorded history, then the step in progress), or over a
    bare ``Recorder``'s history."""

    live = True

    def __init__(self, source) -> None:
        self.session = source if hasattr(source, "recorder") else None
        self.recorder = source.recorder if self.session is not None else source
        llm = self.recorder.llm
        self.llm = llm
        self.num_layers = llm.model_config.num_hidden_layers
        self.dtype = str(llm.dtype).removeprefix("torch.")
        self.catalog = [s.to_json() for s in self.recorder.catalog]
        self._slot = {s["name"]: k for k, s in enumerate(self.catalog)}
        self._fold = _Folded()

    def _records(self) -> list:
        return list(self.recorder.history) if self.recorder.keep_history else []

    def _current(self) -> dict[str, Any] | None:
        return self.session.current_event if self.session is not None else None

    def num_steps(self) -> int:
        """Steps recorded so far (the oldest may have left the history), plus the one in progress."""
        return self.recorder.num_records + (1 if self._current() is not None else 0)

    def first_step(self) -> int:
        """The oldest index still in the history."""
        recs = self._records()
        return recs[0].index if recs else self.recorder.num_records

    def _record(self, i: int):
        recs = self._records()
        k = i - recs[0].index if recs else -1
        return recs[k] if 0 <= k < len(recs) else None

    def event(self, i: int) -> dict[str, Any] | None:
        rec = self._record(i)
        if rec is not None:
            return self.recorder.event_of(rec)
        return self._current() if i == self.recorder.num_records else None

    def engine_step(self, i: int) -> int:
        """The engine's step number of timeline index ``i``."""
        ev = self.event(i)
        return int(ev["step"]) if ev is not None else i

    def catalog_names(self) -> list[str]:
        return [s["name"] for s in self.catalog]

    def site_names(self, i: int) -> list[str]:
        ev = self.event(i)
        if ev is None:
            return []
        if ev.get("in_progress"):
            kept = self.session._tensors.get(ev["step"], {})
            return [s for s in self.catalog_names() if s in kept]
        missing = set(ev.get("missing_sites") or ())
        return [s["name"] for s in self.catalog if s["name"] not in missing
                and not (s["rows"] == "samples" and not ev.get("sampled"))]

    def _tables(self, i: int) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
        rec = self._record(i)
        if rec is not None:
            ev = self.recorder.event_of(rec)
            tabs = rec.tables(self.recorder.shadow is not None)
            return (ev, tabs) if tabs is not None else None
        ev = self._current()
        if ev is not None and i == self.recorder.num_records:
            tabs = self.session.peek_tables()
            return (ev, tabs) if tabs is not None else None
        return None

    def stats(self, i: int, site: str, seq_id: int | None = None) -> dict[str, Any] | None:
        got = self._tables(i)
        slot = self._slot.get(site)
        if got is None or slot is None or site not in self.site_names(i):
            return None
        ev, tabs = got
        req = _req_index(ev, seq_id)
        if seq_id is not None and req is None:
            return None
        out = _tables.site_stats(tabs, self.catalog[slot], slot, ev["batch"], req)
        out["full"] = self.tensor(i, site) is not None
        return out

    def shadow(self, i: int, seq_id: int | None = None) -> dict[str, Any]:
        got = self._tables(i)
        shadow = self.recorder.shadow
        if got is None or shadow is None or got[1].get("shadow") is None:
            return {}
        ev, tabs = got
        req = _req_index(ev, seq_id)
        per_row = int(np.prod(self.catalog[self._slot["layers.0.attn.out"]]["shape"]))
        fired = set(self.site_names(i)) if ev.get("in_progress") else None
        out = {}
        for layer in range(tabs["shadow"].shape[1]):
            if fired is not None and f"layers.{layer}.attn.out" not in fired:
                continue
            m = _tables.layer_metrics(tabs["shadow"], ev["batch"], layer, per_row, self.dtype,
                                      shadow.backend is not None, req)
            if m:
                out[str(layer)] = {"backend": shadow.name, **m}
        return out

    def tensor(self, i: int, site: str) -> torch.Tensor | None:
        ev = self.event(i)
        if ev is None:
            return None
        if self.session is not None:
            return self.session.tensor(int(ev["step"]), site)
        rec = self._record(i)
        return rec.full.get(site) if rec is not None else None

    def requests(self, upto: int | None = None) -> dict[int, dict[str, Any]]:
        return self._fold.requests(self, upto)

    def title(self) -> str:
        llm = self.llm
        shadow = self.recorder.shadow
        extra = f", shadow {shadow.name}" if shadow else ""
        name = llm.model_source.path.split("/")[-1] if llm.model_source is not None else "random weights"
        return f"live: {name} on {llm.device} ({llm.backend.name}{extra})"
