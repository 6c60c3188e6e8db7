"""Export a trace as Chrome trace-event JSON, the format ui.perfetto.dev (and chrome://tracing) opens.

Tracks, all in one process:

* ``engine`` (tid 1): one complete ("X") slice per scheduler step, with the layers nested inside it.
  Steps are laid end to end from each event's ``elapsed_ms``; a layer's slice comes from the
  event's ``site_times_ms`` (ms since the step began, per site) when recorded, else the step's
  time is shared equally between the layers (per-layer times are not measured then).
* one track per request (tid 100 + its prompt index): its prefill chunks and decode steps.
* counters ("C"): KV blocks used / free / cached, and tokens in the step's batch.

Times are whole microseconds (the recorder keeps ms to 3 decimals, so nothing is lost), and every
slice edge is computed once and shared by the slices on both sides of it: Perfetto turns float
microseconds into nanoseconds by rounding (older builds: truncating), and slices whose edges were
rounded separately can overlap by 1 ns, which moves them to an overflow track.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any

from minillama.trace.format import TraceError
from minillama.trace.reader import TraceReader

PID = 1
ENGINE_TID = 1
REQUEST_TID0 = 100
_LAYER_INPUT = re.compile(r"^layers\.(\d+)\.input$")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _us(ms: float) -> int:
    """A time in ms as whole microseconds: every slice edge goes through here exactly once."""
    return int(round(ms * 1000.0))


def _clean(x: Any) -> Any:
    """Strict JSON for the viewer: NaN and infinities become None, and control characters U+FFFD
    (JSON would write them as \\u escapes, which older Perfetto importers reject)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, str):
        return _CONTROL.sub("\ufffd", x)
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x


def _layer_edges(ev: dict[str, Any], t0: int, t1: int, num_layers: int) -> list[tuple[int, int, int]]:
    """(layer, start, end) in µs for each layer of a step spanning [t0, t1]: nested in the step and
    never overlapping each other, whatever the recorded site times say."""
    times = ev.get("site_times_ms")
    if isinstance(times, dict) and times:
        starts = {int(m.group(1)): t for site, t in times.items()
                  if (m := _LAYER_INPUT.match(str(site))) and _finite(t)}
        if starts:
            out, prev = [], t0
            ordered = sorted(starts)
            dur_ms = (t1 - t0) / 1000.0
            for n, layer in enumerate(ordered):
                end_ms = times.get(f"layers.{layer}.output")
                if not _finite(end_ms):
                    end_ms = starts[ordered[n + 1]] if n + 1 < len(ordered) else times.get("final_norm", dur_ms)
                a = min(max(t0 + _us(float(starts[layer])), prev), t1)
                b = min(max(t0 + _us(float(end_ms)) if _finite(end_ms) else a, a), t1)
                out.append((layer, a, b))
                prev = b
            return out
    if num_layers <= 0:
        return []
    # equal shares: edge k is computed once and is both layer k-1's end and layer k's start
    edges = [t0 + (t1 - t0) * k // num_layers for k in range(num_layers + 1)]
    return [(layer, edges[layer], edges[layer + 1]) for layer in range(num_layers)]


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def build_trace_events(reader: TraceReader) -> dict[str, Any]:
    """The Chrome trace-event document for ``reader`` (a dict ready for ``json.dump``)."""
    num_layers = reader.num_layers
    model = os.path.basename(str((reader.manifest.get("model") or {}).get("path") or "model").rstrip("/"))
    order = reader.request_order()
    index = {sid: k for k, sid in enumerate(order)}
    prompts = {int(r["seq_id"]): r.get("prompt") for r in reader.manifest.get("requests") or []
               if isinstance(r, dict) and "seq_id" in r}
    events: list[dict[str, Any]] = [
        {"ph": "M", "pid": PID, "name": "process_name", "args": {"name": f"minillama ({model})"}},
        {"ph": "M", "pid": PID, "tid": ENGINE_TID, "name": "thread_name", "args": {"name": "engine (steps, layers)"}},
        {"ph": "M", "pid": PID, "tid": ENGINE_TID, "name": "thread_sort_index", "args": {"sort_index": 0}},
    ]
    named: set[int] = set()

    def request_tid(sid: int) -> int:
        k = index.setdefault(sid, len(index))
        tid = REQUEST_TID0 + k
        if tid not in named:
            named.add(tid)
            label = f"request {k} (seq {sid})"
            prompt = prompts.get(sid)
            if isinstance(prompt, str) and prompt:
                label += ": " + (prompt if len(prompt) <= 40 else prompt[:37] + "...")
            events.append({"ph": "M", "pid": PID, "tid": tid, "name": "thread_name", "args": {"name": label}})
            events.append({"ph": "M", "pid": PID, "tid": tid, "name": "thread_sort_index", "args": {"sort_index": 1 + k}})
        return tid

    t_end = 0  # µs where the previous step ended: steps never overlap on the engine track
    texts: dict[str, str] = {}
    for i, ev in enumerate(reader.steps()):
        dur = ev.get("elapsed_ms")
        dur = float(dur) if _finite(dur) and dur > 0 else 0.0
        t0 = max(_us(float(ev["start_ms"])), t_end) if _finite(ev.get("start_ms")) else t_end
        t1 = t0 + _us(dur)
        batch = ev.get("batch") or {}
        phase = ev.get("phase") or batch.get("phase") or "step"
        seqs = batch.get("seqs") or []
        events.append({"ph": "X", "pid": PID, "tid": ENGINE_TID, "name": f"step {ev.get('step', i)} ({phase})",
                       "cat": "step", "ts": t0, "dur": t1 - t0,
                       "args": _clean({"step": ev.get("step", i), "phase": phase, "num_seqs": len(seqs),
                                       "num_tokens": batch.get("num_tokens"), "preempted": batch.get("preempted"),
                                       "missing_sites": ev.get("missing_sites")})})
        for layer, a, b in _layer_edges(ev, t0, t1, num_layers):
            events.append({"ph": "X", "pid": PID, "tid": ENGINE_TID, "name": f"layer {layer}", "cat": "layer",
                           "ts": a, "dur": b - a, "args": {"layer": layer}})
        sampled = ev.get("sampled") or {}
        for s in seqs:
            sid = int(s["seq_id"])
            a, b = s.get("chunk") or [s.get("num_computed", 0), s.get("num_computed", 0) + s.get("num_new", 0)]
            prompt_len = int(s.get("prompt_len", 0))
            if b - a == 1 and a >= prompt_len:
                name = f"decode token {a - prompt_len + 2}"  # the prefill sampled token 1
            else:
                name = f"prefill [{a}:{b})" + ("" if b >= s.get("len", b) else " chunk")
            text = (ev.get("texts") or {}).get(str(sid))
            piece = None
            if text is not None:
                before = texts.get(str(sid), "")
                piece = text[len(before):] if text.startswith(before) else text
                texts[str(sid)] = text
            events.append({"ph": "X", "pid": PID, "tid": request_tid(sid), "name": name, "cat": "request",
                           "ts": t0, "dur": t1 - t0,
                           "args": _clean({"seq_id": sid, "step": ev.get("step", i), "chunk": [a, b],
                                           "num_cached": s.get("num_cached"), "block_table": s.get("block_table"),
                                           "sampled": sampled.get(str(sid)), "text": piece})})
        for sid, reason in ev.get("finished") or []:
            events.append({"ph": "i", "s": "t", "pid": PID, "tid": request_tid(int(sid)), "name": f"finished ({reason})",
                           "ts": t1})
        for sid in batch.get("preempted") or []:
            events.append({"ph": "i", "s": "t", "pid": PID, "tid": request_tid(int(sid)), "name": "preempted",
                           "ts": t0})
        if batch.get("num_blocks") is not None and batch.get("num_free_blocks") is not None:
            total, free = int(batch["num_blocks"]), int(batch["num_free_blocks"])
            cached = sum(1 for blk in (batch.get("blocks") or {}).values() if isinstance(blk, dict) and blk.get("cached"))
            events.append({"ph": "C", "pid": PID, "name": "KV blocks", "ts": t0,
                           "args": {"used": total - free, "free": free, "cached in use": cached}})
        if batch.get("num_tokens") is not None:
            events.append({"ph": "C", "pid": PID, "name": "batch tokens", "ts": t0,
                           "args": {"tokens": int(batch["num_tokens"])}})
        t_end = t1
    return {"traceEvents": [_clean(e) for e in events], "displayTimeUnit": "ms",
            "otherData": _clean({"source": reader.path, "status": reader.status, "steps": reader.num_steps,
                                 "note": "layer slices share each step's time equally unless site_times_ms "
                                         "was recorded"})}


def export_perfetto(reader: TraceReader, out_path: str | os.PathLike) -> int:
    """Write ``reader`` as Chrome trace-event JSON to ``out_path``; returns the number of trace events."""
    out_path = os.fspath(out_path)
    parent = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(parent):
        raise TraceError(f"cannot write {out_path}: folder {parent} does not exist; create it or choose another path")
    doc = build_trace_events(reader)
    tmp = out_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, allow_nan=False, ensure_ascii=False)
    os.replace(tmp, out_path)
    return len(doc["traceEvents"])
