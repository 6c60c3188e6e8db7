"""``minillama record | diff | trace info | trace export-perfetto``: recorded traces from the shell.

``minillama.cli`` calls ``add_commands`` when this module imports. User mistakes raise ``ValueError``
subclasses (``TraceError``), which the main CLI prints as one line with exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import os
import platform
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from minillama.trace.reader import TraceError, TraceReader

ArgsFn = Callable[[argparse.ArgumentParser], None]


# ---- the manifest ---------------------------------------------------------------------------------
def _version_of(dist: str, module: str) -> str | None:
    """A package's installed version without importing it (None when it is not importable)."""
    if importlib.util.find_spec(module) is None:
        return None
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def software_versions() -> dict[str, str | None]:
    """minillama, torch, python, and transformers / flash_attn when importable."""
    import torch

    import minillama

    out: dict[str, str | None] = {"minillama": getattr(minillama, "__version__", "unknown"), "torch": torch.__version__,
                                  "python": platform.python_version(), "safetensors": _version_of("safetensors",
                                                                                                  "safetensors")}
    for dist, module in (("transformers", "transformers"), ("flash-attn", "flash_attn")):
        v = _version_of(dist, module)
        if v is not None:
            out[module] = v
    return out


def build_manifest(llm, *, prompts: Sequence[str | list[int]] = (), params=None, shadow: str | None = None,
                   full_sites: Sequence[str] = (), seqs: Sequence[Any] | None = None, chat: bool | None = None,
                   max_bytes: int | None = None) -> dict[str, Any]:
    """What a trace needs to say about the run: model, prompts, sampling, engine, versions, recording mode.

    ``seqs`` (the engine's Sequence objects, one per prompt) ties each prompt to its ``seq_id``.
    """
    import torch

    src = llm.model_source
    requests = []
    for k, seq in enumerate(seqs or []):
        prompt = prompts[k] if k < len(prompts) else None
        requests.append({"index": k, "seq_id": seq.seq_id, "prompt": prompt, "chat": chat,
                         "prompt_token_ids": list(seq.token_ids[: seq.num_prompt_tokens])})
    device = str(llm.device)
    device_name = torch.cuda.get_device_name(llm.device) if llm.device.type == "cuda" else platform.processor() or "cpu"
    return {
        "model": {"name": os.path.basename(str(src.path).rstrip("/")), "path": str(src.path), "format": src.format},
        "model_config": llm.model_config.to_dict(),
        "requests": requests,
        "sampling": dataclasses.asdict(params) if params is not None else None,
        "backend": llm.backend.name,
        "shadow": shadow,
        "device": device,
        "device_name": device_name,
        "dtype": str(llm.dtype).removeprefix("torch."),
        "recording": {"stats": True, "full_sites": list(full_sites), "max_bytes": max_bytes,
                      "always_full": ["sampled", "batch.block_tables", "batch.slot_mapping"]
                      + (["layers.*.attn.out", "layers.*.attn.out@shadow", "layers.*.attn.out@ref"] if shadow else [])},
        "engine_config": dataclasses.asdict(llm.config),
        "num_kvcache_blocks": getattr(llm, "num_kvcache_blocks", None),
        "versions": software_versions(),
        "command": " ".join(["minillama", *sys.argv[1:]]) if sys.argv and "minillama" in sys.argv[0] else None,
    }


# ---- record ---------------------------------------------------------------------------------------
def _check_out(path: str) -> None:
    """Fail before loading the model if the output folder is taken."""
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise TraceError(f"{path} exists and is not empty: choose another --out or delete it")


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def cmd_record(a: argparse.Namespace) -> int:
    """Generate for the prompts while recording every step to a trace folder."""
    from rich.console import Console
    from rich.markup import escape

    from minillama.cli import make_llm, sampling_params
    from minillama.debug.recorder import Recorder
    from minillama.trace.writer import TraceWriter

    if a.max_bytes is not None and a.max_bytes <= 0:
        raise TraceError(f"--max-bytes must be a positive number of bytes, got {a.max_bytes}: leave it out for no cap")
    _check_out(a.out)
    params = sampling_params(a)
    llm = make_llm(a)
    shadow = a.shadow
    if shadow == "auto":
        shadow = "reference" if llm.backend.name == "torch" else "torch"
    recorder = Recorder(llm, shadow=shadow, full_sites=a.full)
    shadow_name = recorder.shadow.name if recorder.shadow is not None else None
    tok = llm.tokenizer
    ids = [tok.encode(p) if a.raw else tok.encode_chat([{"role": "user", "content": p}]) for p in a.prompt]
    seqs = [llm.add_request(x, params) for x in ids]
    manifest = build_manifest(llm, prompts=a.prompt, params=params, shadow=shadow_name, full_sites=a.full, seqs=seqs,
                              chat=not a.raw, max_bytes=a.max_bytes)
    writer = TraceWriter(a.out, manifest, a.max_bytes)
    recorder.sink = writer
    recorder.attach()
    reason = "finished"
    start = time.perf_counter()
    try:
        while llm.has_unfinished() and not writer.stopped:
            llm.step()
    except KeyboardInterrupt:
        reason = "interrupted by the user"
        raise
    except Exception as e:
        reason = "error: " + (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise
    finally:
        writer.close(reason)  # first, so the end line carries our reason
        recorder.detach(reason)
    dt = time.perf_counter() - start
    reader = TraceReader(a.out)
    console = Console()
    console.print(f"recorded [bold]{escape(a.out)}[/]: {reader.num_steps} steps in {dt:.2f} s, "
                  f"{_human_bytes(reader.size_bytes)}, {reader.status}"
                  + (f", shadow {shadow_name}" if shadow_name else ""))
    for k, (_sid, r) in enumerate(reader.requests().items()):
        text = r["text"].replace("\n", " ")
        console.print(f"  [dim]request {k}:[/] {escape(text[:100] + ('...' if len(text) > 100 else ''))}")
    console.print(f"[dim]next: minillama trace info {escape(a.out)} | minillama diff {escape(a.out)} OTHER[/]")
    return 0


# ---- diff -----------------------------------------------------------------------------------------
def cmd_diff(a: argparse.Namespace) -> int:
    """``diff A B`` (exit 1 when over the threshold) or ``diff --shadow A``."""
    from minillama.trace.diff import DEFAULT_THRESHOLD, diff_shadow, diff_traces, render_diff, render_shadow

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
    res = diff_traces(TraceReader(a.traces[0]), TraceReader(a.traces[1]),
                      DEFAULT_THRESHOLD if a.threshold is None else a.threshold)
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
              + (f"; cap {_human_bytes(rec['max_bytes'])}" if rec.get("max_bytes") else ""))
    phases: Counter[str] = Counter()
    elapsed, full_steps, missing = 0.0, 0, 0
    for ev in r.steps():
        phases[ev.get("phase", "?")] += 1
        elapsed += float(ev.get("elapsed_ms") or 0.0)
        full_steps += bool(ev.get("tensor_file"))
        missing += bool(ev.get("missing_sites"))
    t.add_row("steps", f"{r.num_steps} (" + ", ".join(f"{n} {p}" for p, n in phases.items()) + f"), "
              f"{elapsed:.1f} ms recorded; {full_steps} with full tensors")
    if missing:
        t.add_row("missing sites", f"[red]{missing} steps missed some hook sites[/] (see missing_sites)")
    t.add_row("size", _human_bytes(r.size_bytes))
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
def add_commands(sub: argparse._SubParsersAction, engine_args: ArgsFn, sampling_args: ArgsFn) -> None:
    """Add ``record``, ``diff`` and ``trace`` (``info``, ``export-perfetto``) to the main CLI."""
    r = sub.add_parser("record", help="generate while recording every step to a trace folder")
    r.add_argument("--out", required=True, help="new (or empty) trace folder, e.g. traces/NAME")
    r.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    r.add_argument("--raw", action="store_true", help="send prompts as is, without the chat template")
    r.add_argument("--shadow", nargs="?", const="auto", default=None, metavar="BACKEND",
                   help="redo each layer's attention with BACKEND (default: torch, or the float64 reference only "
                        "when the active backend is torch) and record the differences")
    r.add_argument("--full", nargs="+", action="extend", default=[], metavar="SITE_PATTERN",
                   help="save full tensors of matching sites (fnmatch, e.g. 'layers.2.*' 'logits'); "
                        "other sites keep statistics only")
    r.add_argument("--max-bytes", type=int, default=None, metavar="N",
                   help="stop recording cleanly before the trace grows past N bytes")
    engine_args(r)
    sampling_args(r)
    r.set_defaults(fn=cmd_record)

    d = sub.add_parser("diff", help="compare two traces layer by layer, or one trace's shadow records")
    d.add_argument("traces", nargs="+", metavar="TRACE", help="two trace folders (one with --shadow)")
    d.add_argument("--shadow", action="store_true", help="per-layer table of one trace's shadow-backend records")
    d.add_argument("--threshold", type=float, default=None,
                   help="max abs difference allowed at any site (default 1e-3; with --shadow: gate on "
                        "max_abs instead of the error budget); exit code 1 when exceeded")
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
