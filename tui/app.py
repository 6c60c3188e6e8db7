"""minillama-tui: step through the engine live, or replay a recorded trace, in the terminal.

    minillama-tui [--model PATH] [--backend torch|flash-attn] [--shadow [BACKEND]] [--prompt "..."]...
    minillama-tui traces/NAME [--compare traces/OTHER]

A bad trace path, or a backend / shadow / device that cannot run here, ends in one line and exit
code 2 before anything loads. The app holds one ``DebugScreen`` (``screen.py``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from typing import Any

from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen

from minillama.debug.sources import LiveOptions

from .screen import DebugScreen


class DebuggerApp(App[None]):
    """The debugger. ``trace`` (and ``compare``) to replay, else ``options`` (and an ``llm``) to go live."""

    CSS_PATH = "app.tcss"
    TITLE = "minillama-tui"
    AUTO_FOCUS = None
    BINDINGS = [Binding("ctrl+p", "command_palette", "palette", show=False)]

    def __init__(self, trace: str | None = None, compare: str | None = None, options: LiveOptions | None = None,
                 llm: Any = None, record_dir: str = "traces") -> None:
        super().__init__()
        self.source = {"trace": trace, "compare": compare, "options": options or LiveOptions(), "llm": llm,
                       "record_dir": record_dir}
        self.main: DebugScreen | None = None

    def on_mount(self) -> None:
        self.main = DebugScreen(self.source)
        self.push_screen(self.main)

    def action_help(self) -> None:
        from .screens.help import HelpScreen

        self.push_screen(HelpScreen())

    async def action_quit(self) -> None:
        self.shutdown()
        self.exit()

    def shutdown(self) -> None:
        """Stop the engine's worker (and close a recording) without waiting on the UI."""
        run = getattr(self.main, "run", None)
        if run is not None:
            run.session.on_pause = run.session.on_event = None
            run.session.stop()

    def on_unmount(self) -> None:
        self.shutdown()

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        main = self.main
        if main is None:
            return
        yield SystemCommand("Breakpoint: NaN or Inf anywhere", "Stop at the first site whose tensor has NaN/Inf",
                            lambda: main.add_breakpoint("*", "nan"))
        yield SystemCommand("Breakpoint: shadow attention over the error budget",
                            "Stop after the attention of a layer the judging rule calls over (ratio > 2)",
                            lambda: main.add_breakpoint("layers.*.attn.out", "shadow"))
        yield SystemCommand("Breakpoint: absmax above 100", "Stop at a site whose |values| exceed 100",
                            lambda: main.add_breakpoint("*", "absmax", 100.0))
        yield SystemCommand("Breakpoint: every step", "Stop at the start of every step",
                            lambda: main.add_breakpoint("step"))
        yield SystemCommand("Clear all breakpoints", "Remove every breakpoint", main.clear_breakpoints)
        yield SystemCommand("First over the budget (f)", "Jump to the first layer the judging rule calls over",
                            main.action_find)
        yield SystemCommand("Locate the largest difference (l)", "Move the slice to the largest |a - b|",
                            main.action_locate)
        yield SystemCommand("Next site (.)", "Run (or move) to the next hook site", main.action_next_site)
        yield SystemCommand("Back one site (,)", "Move to the previous hook site", main.action_back_site)
        yield SystemCommand("First step (g)", "Go to the first recorded step", main.action_first)
        yield SystemCommand("Last step / live head (G)", "Go to the end of the newest step", main.action_last)
        if main.live:
            yield SystemCommand("Record on/off (r)", "Write the live session to a trace folder", main.action_record)
            yield SystemCommand("Type a prompt (/)", "Send a new request to the live engine", main.action_prompt)
            yield SystemCommand("Restart engine (R)", "A new session on the same engine; history is kept",
                                main.action_restart)
        for name, what in (("inspector", "inspector (i)"), ("kv", "KV cache (k)"), ("attention", "attention (a)"),
                           ("diff", "diff (d)"), ("requests", "requests (w)"), ("heatmap", "heatmap (h)"),
                           ("compare", "A/B (x)")):
            if name != "compare" or main.ctx.compare is not None:
                yield SystemCommand(f"View: {what}", f"Show the {what} view", lambda n=name: main.action_view(n))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line of ``minillama-tui``."""
    p = argparse.ArgumentParser(prog="minillama-tui", description="Step through the minillama engine live, or "
                                "replay a recorded trace (no model, no GPU).")
    p.add_argument("trace", nargs="?", help="a trace folder to replay (omit to run the engine live)")
    p.add_argument("--compare", metavar="TRACE_B", help="a second trace of the same prompts, replayed in lockstep")
    p.add_argument("--model", default=None, help="model folder or .gguf (default: built-in SmolLM2-135M-Instruct)")
    p.add_argument("--backend", default="torch", help="attention backend: torch or flash-attn")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--shadow", nargs="?", const="reference", default=None, metavar="BACKEND",
                   help="run a second attention beside the active one at every layer (default: the float64 "
                        "reference) to fill the diff and attention views")
    p.add_argument("--prompt", action="append", default=None, help="a prompt (repeatable; default: three demos)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens to generate per request")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--max-num-batched-tokens", type=int, default=64,
                   help="the step's token budget (small, so chunked prefill is visible)")
    p.add_argument("--num-kvcache-blocks", type=int, default=64, help="KV cache blocks (small values preempt)")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--full", action="append", default=None, metavar="PATTERN",
                   help="sites kept in full (default: attention q, k, outputs and the logits)")
    p.add_argument("--record-dir", default="traces", help="where r writes recordings (default: traces)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """The ``minillama-tui`` entry point: checks its arguments (exit 2, one line), then runs the app."""
    a = parse_args(argv)
    from minillama.debug.sources import OptionError, check_options, open_trace
    from minillama.trace.format import TraceError

    opts = LiveOptions(model=a.model, backend=a.backend, device=a.device, shadow=a.shadow, max_tokens=a.max_tokens,
                       temperature=a.temperature, max_num_batched_tokens=a.max_num_batched_tokens,
                       num_kvcache_blocks=a.num_kvcache_blocks, max_model_len=a.max_model_len)
    if a.prompt:
        opts.prompts = list(a.prompt)
    if a.full:
        opts.full_sites = tuple(a.full)
    try:
        if a.trace is not None:
            for path in (a.trace, a.compare):
                if path is not None:
                    open_trace(path)
        elif a.compare is not None:
            raise OptionError("--compare needs a trace to compare with: minillama-tui TRACE_A --compare TRACE_B")
        else:
            check_options(opts)
    except (TraceError, OptionError) as e:
        print(f"minillama-tui: {e}", file=sys.stderr)
        return 2
    DebuggerApp(trace=a.trace, compare=a.compare, options=opts, record_dir=a.record_dir).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
