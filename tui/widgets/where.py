"""Where we are: step, phase, layer and site, why we stopped, and the requests with their growing text."""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.text import Text

from tui.format import head, seq_colour, seq_label, tail
from tui.navigation import BEGIN
from tui.state import ViewState
from tui.widgets.base import TimelineView

MODE_STYLE = {"live head": "bold black on green", "history (read-only)": "bold black on yellow",
              "replay": "bold white on blue", "running": "bold black on cyan", "idle": "bold white on grey37",
              "loading": "bold white on grey37", "opening": "bold white on grey37",
              "not loaded": "bold white on red"}


def seq_role(s: dict) -> str:
    """``decode @41`` or ``prefill 0-37/37`` (with prefix-cache hits)."""
    a, b = s["chunk"]
    if s["num_new"] == 1 and s["num_computed"] == s["len"] - 1 and s["len"] > s["prompt_len"]:
        return f"decode @{a}"
    role = f"prefill {a}-{b}/{s['prompt_len']}"
    if s.get("num_cached"):
        role += f" hit {s['num_cached']}"
    return role


class WhereView(TimelineView):
    """The always-visible status panel at the top."""

    TITLE = "where"
    can_focus = False

    def render_state(self, state: ViewState) -> RenderableType:
        w = self.width
        line = Text()
        line.append(f" {state.mode.upper()} ", style=MODE_STYLE.get(state.mode, "reverse"))
        if state.event is None:
            line.append({"loading": "  starting the engine (loading the model takes a few seconds)…",
                         "opening": "  opening the trace…", "not loaded": "  nothing to show",
                         "idle": "  all requests finished"}.get(state.mode, "  no step yet"))
        else:
            layer = state.layer
            line.append(f"  step {state.event.get('step', state.step)}", style="bold")
            if state.event.get("step", state.step) != state.step:
                line.append(f" (#{state.step} in trace)", style="dim")
            line.append(f" · {state.event.get('phase', '?')}")
            line.append(f" · layer {layer}" if layer is not None else " · -")
            line.append(" · ")
            line.append("start of step" if state.site == BEGIN else state.site, style="bold cyan")
        if state.reason:
            line.append("  ")
            line.append(state.reason, style="bold red" if state.reason.startswith("breakpoint") else "italic")
        if state.recording:
            line.append("  ● REC ", style="bold white on red")
            line.append(head(state.recording, 40), style="red")
        rows: list[RenderableType] = [line]
        b = state.batch
        if b:
            info = Text()
            info.append(f"batch {len(state.seqs)} seqs/{b.get('num_tokens', '?')} tok", style="bold")
            info.append(f" · KV free {b.get('num_free_blocks', '?')}/{b.get('num_blocks', '?')}")
            info.append(f" · prefix hits {b.get('prefix_hit_tokens_total', 0)} tok")
            info.append(f" · preemptions {b.get('preemptions_total', 0)}")
            if b.get("preempted"):
                info.append(f" (now: {', '.join(f'#{s}' for s in b['preempted'])})", style="bold red")
            if b.get("waiting"):
                info.append(" · waiting " + " ".join(f"#{s}" for s in b["waiting"]), style="yellow")
            rows.append(info)
        bps = [bp.describe() for bp in state.breakpoints if bp.enabled]
        if bps:
            rows.append(Text("breakpoints: " + ", ".join(bps), style="magenta"))
        in_batch = {s["seq_id"] for s in state.seqs}
        role_w = max((len(seq_role(s)) for s in state.seqs), default=0)
        for s in state.seqs:
            r = state.requests.get(s["seq_id"], {})
            t = Text()
            t.append_text(seq_label(s["seq_id"]))
            if s["seq_id"] == state.seq_id:
                t.append("◂", style=seq_colour(s["seq_id"]))
            else:
                t.append(" ")
            role = seq_role(s)
            t.append(f" {role:<{role_w}} ", style="dim")
            if r.get("finish"):
                t.append(f"✓ {r['finish']} ", style="bold green")
            text = r.get("text", "")
            room = w - t.cell_len - 3
            mid_run = s["seq_id"] not in state.requests and state.event.get("step", state.step) != state.step
            empty = "(recording began mid-run)" if mid_run else "(no tokens yet)"
            t.append('"' + tail(text, max(room, 4)) + '"' if text else empty, style="" if text else "dim italic")
            rows.append(t)
        done = [(sid, r) for sid, r in sorted(state.requests.items()) if r.get("finish") and sid not in in_batch]
        if done:
            t = Text("finished: ", style="dim")
            for sid, r in done:
                t.append_text(seq_label(sid))
                t.append(f" {r['finish']} ({r.get('tokens', 0)} tok)  ", style="dim")
            rows.append(t)
        return Group(*rows)
