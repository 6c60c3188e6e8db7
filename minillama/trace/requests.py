"""The one request fold: what each request asked and answered, step by step, from step events.

Live sessions and recorded traces both produce step events (traces/README.md); folding them in
order gives every request's prompt, generated ids and text, and finish reason as of any step.
Format 1 events carried whole texts and id lists per step; format 2 events carry only the new token
(``sampled``) and its text (``pieces``), and list a request's prompt (and what it had generated
already, for a recording started mid-run) the first time it appears.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Request:
    """One request as of the last folded step."""

    seq_id: int
    index: int | None = None  # position in the recording's prompt order, when known
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    first_step: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"seq_id": self.seq_id, "index": self.index, "prompt": self.prompt,
                "prompt_token_ids": self.prompt_token_ids, "token_ids": list(self.token_ids), "text": self.text,
                "finish_reason": self.finish_reason, "first_step": self.first_step}


def _ids(x: Any) -> list[int] | None:
    return [int(t) for t in x] if isinstance(x, list) else None


class RequestFold:
    """Folds step events in order. ``manifest_requests``: the manifest's ``requests`` list (prompt order)."""

    def __init__(self, manifest_requests: Any = ()) -> None:
        self.requests: dict[int, Request] = {}
        self.steps = 0
        for k, r in enumerate(manifest_requests if isinstance(manifest_requests, list) else []):
            if isinstance(r, dict) and isinstance(r.get("seq_id"), int):
                q = self._get(r["seq_id"])
                q.index = r.get("index", k) if isinstance(r.get("index", k), int) else k
                q.prompt = r.get("prompt") if isinstance(r.get("prompt"), str) else None
                q.prompt_token_ids = _ids(r.get("prompt_token_ids"))

    def _get(self, sid: Any) -> Request:
        sid = int(sid)
        if sid not in self.requests:
            self.requests[sid] = Request(sid)
        return self.requests[sid]

    def add(self, ev: dict[str, Any], step_index: int | None = None) -> None:
        """Fold one step event (events must come in recording order)."""
        at = self.steps if step_index is None else step_index
        self.steps += 1
        for s in (ev.get("batch") or {}).get("seqs", []):
            q = self._get(s["seq_id"])
            q.first_step = at if q.first_step is None else q.first_step
        for sid, p in (ev.get("prompts") or {}).items():
            q = self._get(sid)
            if not isinstance(p, dict):
                continue
            q.prompt = q.prompt if q.prompt is not None else p.get("text")
            q.prompt_token_ids = q.prompt_token_ids or _ids(p.get("token_ids"))
            if p.get("generated") and not q.token_ids:  # recorded from mid-run: what came before
                q.token_ids = _ids(p["generated"]) or []
                q.text = str(p.get("text_so_far") or "")
        whole = ev.get("token_ids") or {}  # format 1
        for sid, toks in whole.items():
            self._get(sid).token_ids = _ids(toks) or []
        for sid, tok in (ev.get("sampled") or {}).items():
            if sid not in whole:
                self._get(sid).token_ids.append(int(tok))
        for sid, text in (ev.get("texts") or {}).items():  # format 1
            self._get(sid).text = str(text)
        for sid, piece in (ev.get("pieces") or {}).items():
            self._get(sid).text += str(piece)
        for sid, reason in ev.get("finished") or []:
            self._get(sid).finish_reason = reason

    def snapshot(self) -> dict[int, dict[str, Any]]:
        """Every request so far as plain dicts, in prompt order (then by first appearance)."""
        order = sorted(self.requests.values(), key=lambda q: (q.index is None, q.index or 0,
                                                              q.first_step if q.first_step is not None else 1 << 60,
                                                              q.seq_id))
        return {q.seq_id: q.as_dict() for q in order}
