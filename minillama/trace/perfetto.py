"""Export a trace as Chrome trace-event JSON, the format ui.perfetto.dev (and chrome://tracing) opens.

Tracks, all in one process:

* ``engine`` (tid 1): one complete ("X") slice per scheduler step, with the layers nested inside it.
  Steps are laid end to end from each event's ``elapsed_ms``; a layer's slice comes from the
  event's ``site_times_ms`` (ms since the step began, per site) when recorded, else the step's
  time is shared equally between the layers (per-layer times are not measured then).
* one track per request (tid 100 + its prompt index): its prefill chunks and decode steps.
* counters ("C"): KV blocks used / free / cached, and tokens in the step's batch.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any

from minillama.trace.reader import TraceError, TraceReader

PID = 1
ENGINE_TID = 1
REQUEST_TID0 = 100
_LAYER_INPUT = re.compile(r"^layers\.(\d+)\.input$")


def _us(ms: float) -> float:
    return round(ms * 1000.0, 3)


def _clean(x: Any) -> Any:
    """Strict JSON for the viewer: NaN and infinities become None."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x


def _layer_slices(ev: dict[str, Any], start_ms: float, dur_ms: float, num_layers: int) -> list[tuple[int, float, float]]:
    """(layer, start ms, duration ms) for each layer of a step."""
    times = ev.get("site_times_ms")
    if isinstance(times, dict) and times:
        starts = {int(m.group(1)): float(t) for s, t in times.items() if (m := _LAYER_INPUT.match(s))}
        if starts:
            out = []
            ordered = sorted(starts)
            for n, layer in enumerate(ordered):
                t0 = starts[layer]
                if f"layers.{layer}.output" in times:
                    t1 = float(times[f"layers.{layer}.output"])
                elif n + 1 < len(ordered):
                    t1 = starts[ordered[n + 1]]
                else:
                    t1 = float(times.get("final_norm", dur_ms))
                out.append((layer, start_ms + t0, max(t1 - t0, 0.0)))
            return out
    if num_layers <= 0:
        return []
    width = dur_ms / num_layers
    return [(layer, start_ms + layer * width, width) for layer in range(num_layers)]


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

    t_ms = 0.0
    texts: dict[str, str] = {}
    for i, ev in enumerate(reader.steps()):
        dur = float(ev.get("elapsed_ms") or 0.0)
        if not math.isfinite(dur) or dur < 0:
            dur = 0.0
        start = float(ev["start_ms"]) if isinstance(ev.get("start_ms"), int | float) else t_ms
        batch = ev.get("batch") or {}
        phase = ev.get("phase") or batch.get("phase") or "step"
        seqs = batch.get("seqs") or []
        events.append({"ph": "X", "pid": PID, "tid": ENGINE_TID, "name": f"step {ev.get('step', i)} ({phase})",
                       "cat": "step", "ts": _us(start), "dur": _us(dur),
                       "args": _clean({"step": ev.get("step", i), "phase": phase, "num_seqs": len(seqs),
                                       "num_tokens": batch.get("num_tokens"), "preempted": batch.get("preempted"),
                                       "missing_sites": ev.get("missing_sites")})})
        for layer, l0, ld in _layer_slices(ev, start, dur, num_layers):
            events.append({"ph": "X", "pid": PID, "tid": ENGINE_TID, "name": f"layer {layer}", "cat": "layer",
                           "ts": _us(l0), "dur": _us(ld), "args": {"layer": layer}})
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
                           "ts": _us(start), "dur": _us(dur),
                           "args": _clean({"seq_id": sid, "step": ev.get("step", i), "chunk": [a, b],
                                           "num_cached": s.get("num_cached"), "block_table": s.get("block_table"),
                                           "sampled": sampled.get(str(sid)), "text": piece})})
        for sid, reason in ev.get("finished") or []:
            events.append({"ph": "i", "s": "t", "pid": PID, "tid": request_tid(int(sid)), "name": f"finished ({reason})",
                           "ts": _us(start + dur)})
        for sid in batch.get("preempted") or []:
            events.append({"ph": "i", "s": "t", "pid": PID, "tid": request_tid(int(sid)), "name": "preempted",
                           "ts": _us(start)})
        if "num_blocks" in batch and "num_free_blocks" in batch:
            total, free = int(batch["num_blocks"]), int(batch["num_free_blocks"])
            cached = sum(1 for blk in (batch.get("blocks") or {}).values() if isinstance(blk, dict) and blk.get("cached"))
            events.append({"ph": "C", "pid": PID, "name": "KV blocks", "ts": _us(start),
                           "args": {"used": total - free, "free": free, "cached in use": cached}})
        if batch.get("num_tokens") is not None:
            events.append({"ph": "C", "pid": PID, "name": "batch tokens", "ts": _us(start),
                           "args": {"tokens": int(batch["num_tokens"])}})
        t_ms = start + dur
    return {"traceEvents": events, "displayTimeUnit": "ms",
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
