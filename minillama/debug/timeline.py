"""One timeline, two sources: a live debug session or a recorded trace.

Views ask "what happened at step s, site x" and "which requests exist" without knowing whether
the answer comes from memory or from disk.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class Timeline(Protocol):
    live: bool
    num_layers: int

    def num_steps(self) -> int: ...
    def event(self, step: int) -> dict[str, Any] | None: ...
    def tensor(self, step: int, site: str) -> torch.Tensor | None: ...
    def requests(self, upto_step: int | None = None) -> dict[str, dict[str, Any]]: ...
    def title(self) -> str: ...


def _requests_from(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for ev in events:
        for sid, p in ev.get("prompts", {}).items():
            out.setdefault(sid, {"prompt": p.get("text", ""), "text": "", "finish": None, "tokens": 0})
        for sid, text in ev.get("texts", {}).items():
            r = out.setdefault(sid, {"prompt": "", "text": "", "finish": None, "tokens": 0})
            r["text"] = text
            r["tokens"] = len(ev.get("token_ids", {}).get(sid, []))
        for sid, reason in ev.get("finished", []):
            out.setdefault(str(sid), {"prompt": "", "text": "", "finish": None, "tokens": 0})["finish"] = reason
    return out


class LiveTimeline:
    """Timeline over a running ``DebugSession``; the step in progress is the last one."""

    live = True

    def __init__(self, session) -> None:
        self.session = session
        self.num_layers = session.llm.model_config.num_hidden_layers

    def num_steps(self) -> int:
        return len(self.session.events) + (1 if self.session.current_event is not None else 0)

    def event(self, step: int) -> dict[str, Any] | None:
        events = self.session.events
        if 0 <= step < len(events):
            return events[step]
        cur = self.session.current_event
        if cur is not None and step == len(events):
            return cur
        return None

    def tensor(self, step: int, site: str) -> torch.Tensor | None:
        return self.session.tensor(step, site)

    def requests(self, upto_step: int | None = None) -> dict[str, dict[str, Any]]:
        events = self.session.events if upto_step is None else self.session.events[: upto_step + 1]
        cur = self.session.current_event
        if cur is not None and (upto_step is None or upto_step >= len(self.session.events)):
            events = [*events, cur]
        return _requests_from(events)

    def title(self) -> str:
        llm = self.session.llm
        shadow = self.session.recorder.shadow
        extra = f", shadow {shadow.name}" if shadow else ""
        return f"live: {llm.model_source.path.split('/')[-1]} on {llm.device} ({llm.backend.name}{extra})"


class TraceTimeline:
    """Timeline over a recorded trace (``minillama.trace.reader.TraceReader``); needs no model or GPU."""

    live = False

    def __init__(self, reader) -> None:
        self.reader = reader
        self.num_layers = reader.num_layers

    def num_steps(self) -> int:
        return self.reader.num_steps

    def event(self, step: int) -> dict[str, Any] | None:
        if 0 <= step < self.reader.num_steps:
            return self.reader.step(step)
        return None

    def tensor(self, step: int, site: str) -> torch.Tensor | None:
        return self.reader.tensor(step, site)

    def requests(self, upto_step: int | None = None) -> dict[str, dict[str, Any]]:
        n = self.reader.num_steps if upto_step is None else min(upto_step + 1, self.reader.num_steps)
        return _requests_from([self.reader.step(i) for i in range(n)])

    def title(self) -> str:
        m = self.reader.manifest
        backend = m.get("backend", "?")
        shadow = m.get("shadow")
        return f"replay: {self.reader.path} ({backend}{', shadow ' + str(shadow) if shadow else ''})"
