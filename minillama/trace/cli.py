"""``minillama diff | trace info | trace export-perfetto``: recorded traces from the shell (no model code).

``minillama.cli`` calls ``add_commands`` when this module imports. User mistakes raise ``ValueError``
subclasses (``TraceError``), which the main CLI prints as one line with exit code 2.
"""

from __future__ import annotations

import argparse
from collections import Counter

from minillama.trace.format import TraceError
from minillama.trace.reader import TraceReader


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
        if a.json:
            print(json.dumps(res.to_json(), indent=1))
        else:
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
def trace_facts(r: TraceReader) -> dict:
    """What ``trace info`` says about a trace, as plain data."""
    m = r.manifest
    model = m.get("model") if isinstance(m.get("model"), dict) else {"name": m.get("model")}
    cfg = m.get("model_config") or {}
    phases: Counter[str] = Counter()
    elapsed, with_data, missing = 0.0, 0, 0
    for ev in r.steps():
        phases[str(ev.get("phase", "?"))] += 1
        elapsed += float(ev.get("elapsed_ms") or 0.0)
        with_data += bool(ev.get("tensor_file") or ev.get("data"))
        missing += bool(ev.get("missing_sites"))
    rec = m.get("recording") if isinstance(m.get("recording"), dict) else {}
    return {
        "path": r.path, "status": r.status, "format": m.get("format"), "version": m.get("version"),
        "created": m.get("created"), "model": model.get("name"), "model_format": model.get("format"),
        "layers": cfg.get("num_hidden_layers"), "hidden": cfg.get("hidden_size"),
        "heads": cfg.get("num_attention_heads"), "kv_heads": cfg.get("num_key_value_heads"),
        "vocab": cfg.get("vocab_size"), "backend": m.get("backend"), "shadow": m.get("shadow"),
        "device": m.get("device"), "dtype": m.get("dtype"), "sampling": m.get("sampling"),
        "full_sites": rec.get("full_sites") or [], "max_bytes": rec.get("max_bytes"), "steps": r.num_steps,
        "phases": dict(phases), "recorded_ms": round(elapsed, 3), "steps_with_tensors": with_data,
        "steps_missing_sites": missing, "size_bytes": r.size_bytes, "versions": m.get("versions") or {},
        "requests": [{"seq_id": sid, "prompt": q["prompt"], "tokens": len(q["token_ids"]),
                      "finish": q["finish_reason"], "text": q["text"]} for sid, q in r.requests().items()],
    }


def cmd_info(a: argparse.Namespace) -> int:
    """A summary of one trace: a table on a terminal, every value whole when piped, or ``--json``."""
    import json
    import sys

    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    f = trace_facts(TraceReader(a.dir))
    if getattr(a, "json", False):
        print(json.dumps(f, ensure_ascii=False, default=str))
        return 0
    console = Console() if sys.stdout.isatty() else Console(width=100_000, no_color=True)
    t = Table(title=Text(f"trace {f['path']}"), show_header=False)
    arch = (f"{f['layers']} layers, hidden {f['hidden']}, {f['heads']} heads, {f['kv_heads']} kv heads, "
            f"vocab {f['vocab']}") if f["layers"] is not None else "?"
    engine = f"backend {f['backend']}" + (f", shadow {f['shadow']}" if f["shadow"] else "") + \
        f", {f['device']}, {f['dtype']}"
    rows = [("status", f["status"]), ("format", f"{f['format']} v{f['version']}, created {f['created']}"),
            ("model", f"{f['model']} ({f['model_format']})"), ("architecture", arch), ("engine", engine),
            ("sampling", ", ".join(f"{k} {v}" for k, v in (f["sampling"] or {}).items() if v is not None) or "-"),
            ("recording", "per-request statistics for every site" + (
                f"; full tensors for {', '.join(map(str, f['full_sites']))}" if f["full_sites"] else "")
             + (f"; cap {human_bytes(f['max_bytes'])}" if isinstance(f["max_bytes"], int) else "")),
            ("steps", f"{f['steps']} (" + ", ".join(f"{n} {p}" for p, n in f["phases"].items())
             + f"), {f['recorded_ms']:.1f} ms recorded; {f['steps_with_tensors']} with tensors"),
            ("size", human_bytes(f["size_bytes"])),
            ("versions", ", ".join(f"{k} {v}" for k, v in f["versions"].items()))]
    if f["steps_missing_sites"]:
        rows.insert(8, ("missing sites", f"{f['steps_missing_sites']} steps missed some hook sites (see missing_sites)"))
    for key, value in rows:  # trace strings are text, never markup
        t.add_row(key, Text(str(value)))
    console.print(t)
    if f["requests"]:
        rt = Table(title="requests")
        for col in ("#", "seq", "prompt", "tokens", "finish", "text"):
            rt.add_column(col, overflow="fold")
        for k, q in enumerate(f["requests"]):
            prompt = str(q["prompt"] if q["prompt"] is not None else "?")
            rt.add_row(str(k), str(q["seq_id"]), Text(prompt[:60] + ("..." if len(prompt) > 60 else "")),
                       str(q["tokens"]), Text(str(q["finish"] or "-")), Text(q["text"]))
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
    i.add_argument("dir", metavar="DIR", help="a trace folder")
    i.add_argument("--json", action="store_true", help="print the same facts as one JSON object")
    i.set_defaults(fn=cmd_info)
    e = tsub.add_parser("export-perfetto", help="write Chrome trace-event JSON for ui.perfetto.dev")
    e.add_argument("dir", metavar="DIR")
    e.add_argument("out", metavar="OUT.json")
    e.set_defaults(fn=cmd_export_perfetto)
