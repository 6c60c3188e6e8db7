"""The ``minillama-tui`` command line: its options are checked here, before torch, Textual or a model load.

``app`` (which imports all of those) is imported only once the arguments are good, so a typo in
``--backend`` costs a fraction of a second instead of the ~10 s of starting the engine first. Then,
still before anything loads: a trace (and its ``--compare`` partner) must open, and the backend, the
shadow and the device must be able to run here. Every refusal is one line and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from minillama import __version__, progress
from minillama.cli import Parser
from minillama.options import backend_arg, device_arg, positive_int, temperature

EPILOG = """examples:
  minillama-tui                                        live, built-in model, paused before step 0
  minillama-tui --shadow reference --prompt "Why is the sky blue?" --prompt "Name a prime."
  minillama-tui traces/h200-flash-attn-vs-torch        replay a recorded trace (no model, no GPU)
  minillama-tui traces/A --compare traces/B            two runs of the same prompts, in lockstep

keys: s / n / . step / layer / site, S / p / , back, c continue, b breakpoint, f first over the budget,
l locate, r record, / prompt, views i k a d w h x, ? help, q quit"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check ``minillama-tui``'s arguments; a bad one exits 2 with one line on stderr."""
    p = Parser(prog="minillama-tui", epilog=EPILOG,
               description="Step through the minillama engine live, or replay a recorded trace (no model, no GPU).")
    p.add_argument("--version", action="version", version=f"minillama-tui {__version__}")
    p.add_argument("trace", nargs="?", metavar="TRACE",
                   help="a trace folder to replay (omit it to run the engine live)")
    p.add_argument("--compare", default=None, metavar="TRACE_B",
                   help="a second trace of the same prompts, replayed in lockstep with TRACE (A/B)")
    p.add_argument("--model", default=None, metavar="PATH",
                   help="model folder or .gguf (default: built-in SmolLM2-135M-Instruct)")
    p.add_argument("--backend", type=backend_arg, default="torch", help="attention backend: torch, triton or flash-attn")
    p.add_argument("--device", type=device_arg, default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--shadow", nargs="?", const="reference", default=None, metavar="BACKEND",
                   help="run a second attention beside the active one at every layer (default: the float64 "
                        "reference) to fill the diff and attention views")
    p.add_argument("--prompt", action="append", default=None,
                   help="a prompt (repeatable; default: three demo questions)")
    p.add_argument("--max-tokens", type=positive_int, default=32, metavar="N", help="tokens to generate per request")
    p.add_argument("--temperature", type=temperature, default=0.0, metavar="T", help="0 = greedy")
    p.add_argument("--max-num-batched-tokens", type=positive_int, default=64, metavar="N",
                   help="the step's token budget (small, so chunked prefill is visible)")
    p.add_argument("--num-kvcache-blocks", type=positive_int, default=64, metavar="N",
                   help="KV cache blocks (small values preempt)")
    p.add_argument("--max-model-len", type=positive_int, default=1024, metavar="N",
                   help="longest prompt + answer in tokens")
    p.add_argument("--full", action="append", default=None, metavar="PATTERN",
                   help="sites kept in full (default: attention q, k, outputs, the shadow's, and the logits)")
    p.add_argument("--record-dir", default="traces", metavar="DIR", help="where r writes recordings")
    a = p.parse_args(argv)
    for path in (a.trace, a.compare):
        if path is not None and not os.path.isdir(path):
            p.error(f"trace folder {path} does not exist or is not a folder: give a folder written by `minillama "
                    "record` or the debugger's r key, or leave it out to run live")
    if a.compare is not None and a.trace is None:
        p.error("--compare needs a trace to compare with: minillama-tui TRACE_A --compare TRACE_B")
    for text in [*(a.prompt or []), a.model or ""]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            p.error(f"{text.encode('utf-8', 'replace').decode()!r} is not valid UTF-8: pass UTF-8 text")
    return a


def check_sources(a: argparse.Namespace, opts) -> str | None:
    """Why the traces cannot open or the engine options cannot run here (None: go ahead). No model loads."""
    from minillama.debug.sources import OptionError, check_options, open_trace
    from minillama.trace.format import TraceError

    try:
        if a.trace is not None:
            for path in (a.trace, a.compare):
                if path is not None:
                    open_trace(path)
        else:
            check_options(opts)
    except (TraceError, OptionError) as e:
        return str(e)
    return None


def main(argv: list[str] | None = None) -> int:
    """The ``minillama-tui`` entry point: 0 after a normal quit, 2 for a bad argument (before anything
    loads), 1 if the trace or the engine failed to load after all."""
    try:
        a = parse_args(argv)
    except SystemExit as e:  # --help, --version, or a bad option (already printed as one line)
        return e.code if isinstance(e.code, int) else 2
    from minillama.debug.sources import LiveOptions

    opts = LiveOptions(model=a.model, backend=a.backend, device=a.device, shadow=a.shadow,
                       max_tokens=a.max_tokens, temperature=a.temperature,
                       max_num_batched_tokens=a.max_num_batched_tokens, num_kvcache_blocks=a.num_kvcache_blocks,
                       max_model_len=a.max_model_len)
    if a.prompt:
        opts.prompts = list(a.prompt)
    if a.full:
        opts.full_sites = tuple(a.full)
    why = check_sources(a, opts)
    if why is not None:
        print(f"minillama-tui: error: {why}", file=sys.stderr)
        return 2
    from .app import DebuggerApp

    app = DebuggerApp(trace=a.trace, compare=a.compare, options=opts, record_dir=a.record_dir)
    progress.set_quiet(True)  # Textual owns the terminal: bars on stderr would tear its screen
    try:
        app.run()
    finally:
        progress.set_quiet(False)
    return 1 if app.failed else 0


if __name__ == "__main__":
    sys.exit(main())
