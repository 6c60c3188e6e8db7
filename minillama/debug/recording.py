"""Start recording a live session at any moment without losing what came before.

A recording that starts mid-run must first say what the requests already running are (their prompt
ids, the text generated so far) and keep the keys already cached, or replay cannot show their
prompts nor rebuild their attention weights. The recorder does this at the first step that begins
after ``set_sink`` (``catchup.blocks`` / ``catchup.k``, traces/README.md); but when the session is
paused inside a step, that step began before the recording and is the first one written.
``start_recording`` catches that open step up too, the way the recorder would have.
"""

from __future__ import annotations

from typing import Any


def start_recording(session: Any, path: str, max_bytes: int | None = None) -> dict[str, int]:
    """Record every following step of ``session`` to ``path``; returns what was caught up (requests, blocks)."""
    session.start_recording(path, max_bytes)
    return catch_up_open_step(session)


def catch_up_open_step(session: Any) -> dict[str, int]:
    """List the running and waiting requests, and their cached keys, in the step open now (if any).

    Then the recorder need not catch up again at the next step (``_catch_up``): the trace's first
    step already holds it all.
    """
    rec = session.recorder
    open_steps = list(rec._open.values())
    if not open_steps:
        return {"requests": 0, "blocks": 0}
    sched = session.llm.scheduler
    listed = list(dict.fromkeys([*sched.running, *sched.waiting]))
    first = min(open_steps, key=lambda st: st.step)
    added = 0
    for seq in listed:
        key = str(seq.seq_id)
        if key not in first.prompts:
            first.prompts[key] = {"token_ids": seq.token_ids[: seq.num_prompt_tokens],
                                  "generated": [t for t in seq.completion_token_ids if t >= 0]}
            added += 1
    keys = rec._cached_keys(listed)
    first.full.update(keys)
    rec._catch_up = False
    blocks = keys.get("catchup.blocks")
    return {"requests": added, "blocks": 0 if blocks is None else int(blocks.numel())}
