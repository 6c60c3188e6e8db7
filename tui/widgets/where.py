"""Where we are: the mode, step, phase, layer and site, why we stopped, and the batch with its texts."""

from __future__ import annotations

from typing import Any

from rich.console import Group, RenderableType
from rich.text import Text

from minillama.debug.navigation import BEGIN

from ..format import plural, seq_colour, seq_label, tail
from .base import View

MODE_STYLE = {"live head": "bold black on #5fd75f", "history": "bold black on #ffd75f",
              "replay": "bold black on #87d7ff", "A/B replay": "bold black on #87d7ff",
              "running": "bold black on #5fd7d7", "idle": "bold black on #bcbcbc", "loading": "bold black on #bcbcbc",
              "stopped": "bold white on #d70000", "failed": "bold white on #d70000"}


def seq_role(s: dict[str, Any]) -> str:
    """``decode @41``, ``prefill 0-37/37 hit 16`` or ``recompute 0-40/40`` (a request preempted and run again)."""
    a, b = s["chunk"]
    again = s.get("recompute")
    if again is None:  # format 1 has no flag: a chunk past the prompt's end in a preempted request
        again = s.get("preemptions", 0) > 0 and s["num_new"] > 1 and b > s["prompt_len"]
    if again:
        return f"recompute {a}-{b}/{s['len']} after preemption"
    if s["num_new"] == 1 and a >= s["prompt_len"]:
        return f"decode @{a}"
    role = f"prefill {a}-{b}/{s['prompt_len']}"
    return role + (f" hit {s['num_cached']}" if s.get("num_cached") else "")


class WhereView(View):
    """The always-visible status panel at the top."""

    TITLE = "where"
    can_focus = False

    def waiting(self) -> RenderableType:
        return self._line(None)

    def _line(self, ev: dict[str, Any] | None) -> Text:
        ctx = self.ctx
        line = Text()
        line.append(f" {ctx.mode.upper()} ", style=MODE_STYLE.get(ctx.mode, "reverse"))
        if ev is None:
            line.append({"loading": "  starting (loading the model takes a few seconds)…",
                         "failed": "  nothing to show"}.get(ctx.mode, "  no step yet"))
        else:
            step = int(ev.get("step", self.pos.step))
            line.append(f"  step {step}", style="bold")
            if step != self.pos.step:
                line.append(f" (#{self.pos.step} here)", style="dim")
            line.append(f" · {ev.get('phase', '?')} · ")
            line.append(f"layer {self.cur_layer} · " if self.cur_layer is not None else "")
            line.append("start of step" if self.pos.site == BEGIN else self.pos.site, style="bold #87d7ff")
        if ctx.reason:
            line.append("  ")
            line.append(ctx.reason, style="bold #ff5f5f" if ctx.reason.startswith(("breakpoint", "over"))
                        else "italic")
        if ctx.recording:
            line.append("  ● REC ", style="bold white on #d70000")
            line.append(tail(ctx.recording, 40), style="#ff8787")
        return line

    def render_view(self) -> RenderableType:
        ev = self.event
        rows: list[RenderableType] = [self._line(ev)]
        b = self.step_batch
        seqs = b.get("seqs") or []
        if b:
            info = Text()
            info.append(f"batch {plural(len(seqs), 'request')}, {plural(int(b.get('num_tokens') or 0), 'token')}",
                        style="bold")
            info.append(f" · KV free {b.get('num_free_blocks', '?')}/{b.get('num_blocks', '?')}")
            info.append(f" · prefix hits {b.get('prefix_hit_tokens_total') or 0} tok")
            info.append(f" · preemptions {b.get('preemptions_total') or 0}")
            if b.get("preempted"):
                info.append(" (now: " + ", ".join(f"#{s}" for s in b["preempted"]) + ")", style="bold #ff5f5f")
            if b.get("waiting"):
                info.append(" · waiting " + " ".join(f"#{s}" for s in b["waiting"]), style="#ffd75f")
            if self.ctx.queued:
                info.append(f" · queued {self.ctx.queued} (joins at the next step)", style="#ffd75f")
            rows.append(info)
        bps = [bp.describe() for bp in self.ctx.breakpoints if bp.enabled]
        if bps:
            rows.append(Text("breakpoints: " + ", ".join(bps), style="#d787ff"))
        reqs = self.requests_now()
        role_w = max((len(seq_role(s)) for s in seqs), default=0)
        for s in seqs:
            r = reqs.get(s["seq_id"], {})
            t = Text()
            t.append_text(seq_label(s["seq_id"]))
            t.append("◂" if s["seq_id"] == self.seq_id else " ", style=seq_colour(s["seq_id"]))
            t.append(f" {seq_role(s):<{role_w}} ", style="dim")
            text = r.get("text") or ""
            room = max(self.size.width - t.cell_len - 6, 4)
            t.append('"' + tail(text, room) + '"' if text else "(no tokens yet)", style="" if text else "dim italic")
            rows.append(t)
        in_batch = {s["seq_id"] for s in seqs}
        done = [(sid, r) for sid, r in reqs.items() if r.get("finish_reason") and sid not in in_batch]
        if done:
            t = Text("finished: ", style="dim")
            for sid, r in done[-8:]:
                t.append_text(seq_label(sid))
                t.append(f" {r['finish_reason']} ({plural(len(r.get('token_ids') or []), 'token')})  ", style="dim")
            rows.append(t)
        return Group(*rows)
