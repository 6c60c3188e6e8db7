"""Requests: every request seen so far, its prompt and the text generated up to the cursor."""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.text import Text

from tui.format import head, seq_label
from tui.state import ViewState
from tui.widgets.base import TimelineView
from tui.widgets.where import seq_role


class RequestsView(TimelineView):
    """The long form of the where panel: prompts and generated texts, in the batch or not."""

    TITLE = "requests"

    def render_state(self, state: ViewState) -> RenderableType:
        if not state.requests and not state.seqs:
            return Text("No request has run yet.", style="dim")
        in_batch = {s["seq_id"]: s for s in state.seqs}
        waiting = set(state.batch.get("waiting") or [])
        ids = sorted(set(state.requests) | set(in_batch) | waiting)
        parts: list[RenderableType] = []
        for sid in ids:
            r = state.requests.get(sid, {})
            t = Text()
            t.append_text(seq_label(sid))
            if sid in in_batch:
                t.append(f"  in this step: {seq_role(in_batch[sid])}", style="bold")
            elif sid in waiting:
                t.append("  waiting", style="yellow")
            elif r.get("finish"):
                t.append(f"  finished ({r['finish']})", style="dim")
            t.append(f"  {r.get('tokens', 0)} tokens generated", style="dim")
            prompt = r.get("prompt") or ""
            user = prompt.split("<|im_start|>user\n")[-1].split("<|im_end|>")[0] if "<|im_start|>" in prompt else prompt
            t.append("\n  prompt: ", style="dim")
            t.append(head(user, max(10, (self.width - 12) * 2)) if user else "(before the recording)", style="italic")
            t.append("\n  text:   ", style="dim")
            t.append(r.get("text") or "", style="")
            parts.append(t)
            parts.append(Text(""))
        return Group(*parts)
