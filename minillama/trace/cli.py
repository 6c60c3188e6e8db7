"""``minillama diff | trace info | trace export-perfetto``: recorded traces from the shell (no model code).

``minillama.cli`` calls ``add_commands`` when this module imports. User mistakes raise ``ValueError``
subclasses (``TraceError``), which the main CLI prints as one line with exit code 2.
"""

from __future__ import annotations

import argparse
from collections import Counter

from minillama.trace.reader import TraceError, TraceReader


def human_bytes(n: float) -> str:
    """``1.5 MB`` style sizes (decimal units)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


# ---- diff -----------------------------------------------------------------------------------------
def cmd_diff(a: argparse.Namespace) -> int:
    """``diff A B`` aligned by request (exit 1 when a request changed) or ``diff --shadow A``."""
    import json

    from minillama.trace.diff import diff_traces
    from minillama.trace.render import render_diff
    from minillama.trace.shadow_diff import diff_shadow, render_shadow

    if a.threshold is not None and not a.threshold >= 0:
        raise TraceError(f"--threshold must be a number >= 0, got {a.threshold}")
    if a.shadow:
        if len(a.traces) != 1:
            raise TraceError(f"diff --shadow takes one trace, got {len(a.traces)}: use `minillama diff --shadow DIR`")
        res = diff_shadow(TraceReader(a.traces[0]), a.threshold)
        render_shadow(res)
        return res.exit_code
    if len(a.traces) != 2:
        raise TraceError(f"diff takes two traces, got {len(a.traces)}: use `minillama diff A B`, or "
                         "`minillama diff --shadow A` for one trace recorded with --shadow")
    res = diff_traces(TraceReader(a.traces[0]), TraceReader(a.traces[1]), a.threshold)
    if a.json:
        print(json.dumps(res.to_json(), indent=1))
    else:
        render_diff(res)
    return res.exit_code


# ---- trace info / export-perfetto -----------------------------------------------------------------
def cmd_info(a: argparse.Namespace) -> int:
    """A rich summary of one trace."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    r = TraceReader(a.dir)
    m = r.manifest
    console = Console()
    t = Table(title=f"trace {escape(r.path)}", show_header=False)
    model = m.get("model") or {}
    cfg = m.get("model_config") or {}
    t.add_row("status", r.status)
    t.add_row("format", f"{m.get('format')} v{m.get('version')}, created {m.get('created', '?')}")
    t.add_row("model", escape(f"{model.get('name', '?')} ({model.get('format', '?')})"))
    if cfg:
        t.add_row("architecture", f"{cfg.get('num_hidden_layers')} layers, hidden {cfg.get('hidden_size')}, "
                                  f"{cfg.get('num_attention_heads')} heads, {cfg.get('num_key_value_heads')} kv heads, "
                                  f"vocab {cfg.get('vocab_size')}")
    shadow = m.get("shadow")
    t.add_row("engine", f"backend {m.get('backend', '?')}" + (f", shadow {shadow}" if shadow else "")
              + f", {m.get('device', '?')}, {m.get('dtype', '?')}")
    if m.get("sampling"):
        s = m["sampling"]
        t.add_row("sampling", ", ".join(f"{k} {v}" for k, v in s.items() if v is not None))
    rec = m.get("recording") or {}
    t.add_row("recording", "stats for every site" + (f"; full tensors for {', '.join(rec['full_sites'])}"
                                                      if rec.get("full_sites") else "")
              + (f"; cap {human_bytes(rec['max_bytes'])}" if rec.get("max_bytes") else ""))
    phases: Counter[str] = Counter()
    elapsed, full_steps, missing = 0.0, 0, 0
    for ev in r.steps():
        phases[ev.get("phase", "?")] += 1
        elapsed += float(ev.get("elapsed_ms") or 0.0)
        full_steps += bool(ev.get("tensor_file") or ev.get("data"))
        missing += bool(ev.get("missing_sites"))
    t.add_row("steps", f"{r.num_steps} (" + ", ".join(f"{n} {p}" for p, n in phases.items()) + f"), "
              f"{elapsed:.1f} ms recorded; {full_steps} with full tensors")
    if missing:
        t.add_row("missing sites", f"[red]{missing} steps missed some hook sites[/] (see missing_sites)")
    t.add_row("size", human_bytes(r.size_bytes))
    versions = m.get("versions") or {}
    t.add_row("versions", escape(", ".join(f"{k} {v}" for k, v in versions.items())))
    console.print(t)
    reqs = r.requests()
    if reqs:
        rt = Table(title="requests")
        for col in ("#", "seq", "prompt", "tokens", "finish", "text"):
            rt.add_column(col, overflow="fold")
        for k, (sid, q) in enumerate(reqs.items()):
            prompt = str(q["prompt"] if q["prompt"] is not None else "?")
            rt.add_row(str(k), str(sid), escape(prompt[:60] + ("..." if len(prompt) > 60 else "")),
                       str(len(q["token_ids"])), str(q["finish_reason"] or "-"), escape(q["text"]))
        console.print(rt)
    return 0


def cmd_export_perfetto(a: argparse.Namespace) -> int:
    """Write Chrome trace-event JSON for ui.perfetto.dev."""
    from minillama.trace.perfetto import export_perfetto

    n = export_perfetto(TraceReader(a.dir), a.out)
    print(f"wrote {a.out} ({n} trace events): open it at https://ui.perfetto.dev")
    return 0


# ---- wiring ---------------------------------------------------------------------------------------
def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``diff`` and ``trace`` (``info``, ``export-perfetto``) to the main CLI."""
    d = sub.add_parser("diff", help="which layer first changed each request: two traces aligned by request "
                                    "(or one trace's shadow records)")
    d.add_argument("traces", nargs="+", metavar="TRACE", help="two trace folders (one with --shadow)")
    d.add_argument("--shadow", action="store_true", help="per-layer table of one trace's shadow-backend records")
    d.add_argument("--threshold", type=float, default=None,
                   help="largest max |A-B| of a request's rows that still passes (default: any bit difference "
                        "fails; sizes from statistics are lower bounds); with --shadow: gate on max_abs instead "
                        "of the error budget; exit code 1 when exceeded")
    d.add_argument("--json", action="store_true", help="print the result as JSON (for CI)")
    d.set_defaults(fn=cmd_diff)

    t = sub.add_parser("trace", help="inspect or export a recorded trace")
    tsub = t.add_subparsers(dest="trace_cmd", required=True)
    i = tsub.add_parser("info", help="model, prompts, steps, status, size and answers of a trace")
    i.add_argument("dir", metavar="DIR")
    i.set_defaults(fn=cmd_info)
    e = tsub.add_parser("export-perfetto", help="write Chrome trace-event JSON for ui.perfetto.dev")
    e.add_argument("dir", metavar="DIR")
    e.add_argument("out", metavar="OUT.json")
    e.set_defaults(fn=cmd_export_perfetto)
