"""Every Perfetto export obeys the rules of Perfetto's JSON importer, checked here event by event.

The rules (trace_processor's JSON tokenizer and parser): strict JSON; integer pid/tid; a known
``ph``; complete events (``"X"``) on one track (pid, tid) either nest or do not overlap once their
µs floats become integer ns (llround in current builds, truncation in older ones: both are
checked); counters (``"C"``) carry numeric args only; strings carry no control characters (older
importers reject the ``\\u`` escapes JSON writes for them).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import pytest

from minillama.trace.perfetto import build_trace_events, export_perfetto
from minillama.trace.reader import TraceReader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = {"X", "B", "E", "i", "I", "C", "M", "b", "e", "n", "s", "t", "f"}
METADATA = {"process_name", "thread_name", "thread_sort_index", "process_sort_index", "process_labels"}


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _ns(us: float, rounding: str) -> int:
    return round(us * 1000) if rounding == "round" else int(us * 1000)  # int() truncates toward zero


def check_perfetto(doc: dict[str, Any]) -> int:
    """Assert ``doc`` imports into Perfetto without dropped or overflowed events; returns the event count."""
    text = json.dumps(doc, allow_nan=False, ensure_ascii=False)  # raises on NaN / Infinity
    assert "\\u" not in text, "a string needs a \\u escape (control character)"
    events = doc["traceEvents"]
    assert isinstance(events, list) and events
    tracks: dict[tuple[int, int], list[tuple[float, float, str]]] = {}
    for e in events:
        assert e.get("ph") in PHASES, e
        assert isinstance(e.get("name"), str), e
        assert isinstance(e.get("pid"), int) and not isinstance(e["pid"], bool), e
        if "tid" in e:
            assert isinstance(e["tid"], int) and not isinstance(e["tid"], bool), e
        if e["ph"] == "M":
            assert e["name"] in METADATA and isinstance(e.get("args"), dict), e
            continue
        assert _number(e.get("ts")) and e["ts"] >= 0, e
        if e["ph"] == "X":
            assert "tid" in e and _number(e.get("dur")) and e["dur"] >= 0, e
            tracks.setdefault((e["pid"], e["tid"]), []).append((e["ts"], e["dur"], e["name"]))
        elif e["ph"] == "C":
            assert isinstance(e.get("args"), dict) and e["args"], e
            assert all(_number(v) for v in e["args"].values()), e
        elif e["ph"] in ("i", "I"):
            assert e.get("s", "t") in ("t", "p", "g"), e
    for rounding in ("round", "trunc"):
        for track, slices in tracks.items():
            spans = sorted(((_ns(ts, rounding), _ns(ts, rounding) + _ns(dur, rounding), name)
                            for ts, dur, name in slices), key=lambda s: (s[0], -s[1]))
            stack: list[tuple[int, int, str]] = []
            for start, end, name in spans:
                while stack and stack[-1][1] <= start:
                    stack.pop()
                if stack:  # starts inside an open slice: it must end inside it too
                    assert end <= stack[-1][1], (f"track {track}: {name} [{start}, {end}] overlaps "
                                                 f"{stack[-1][2]} [{stack[-1][0]}, {stack[-1][1]}] ({rounding})")
                stack.append((start, end, name))
    return len(events)


class FakeReader:
    """The few TraceReader members the export reads, for edge cases a real recording rarely hits."""

    path, status = "fake", "finished"

    def __init__(self, steps: list[dict[str, Any]], num_layers: int, prompts: dict[int, str]) -> None:
        self._steps, self.num_layers, self.num_steps = steps, num_layers, len(steps)
        self.manifest = {"model": {"path": "/m/tiny"},
                         "requests": [{"seq_id": sid, "prompt": p} for sid, p in prompts.items()]}

    def request_order(self) -> list[int]:
        return sorted({int(s["seq_id"]) for ev in self._steps for s in ev["batch"]["seqs"]})

    def steps(self):
        return iter(self._steps)


def _step(i: int, elapsed: float, seqs: list[int], **extra: Any) -> dict[str, Any]:
    batch = {"phase": "decode", "num_tokens": len(seqs), "num_blocks": 8, "num_free_blocks": 5, "blocks": {},
             "seqs": [{"seq_id": s, "chunk": [4 + i, 5 + i], "prompt_len": 4, "len": 5 + i} for s in seqs]}
    return {"step": i, "elapsed_ms": elapsed, "batch": batch, "sampled": {str(s): 7 for s in seqs},
            "texts": {str(s): "ab" * (i + 1) for s in seqs}, "finished": [], **extra}


def test_equal_layer_shares_tile_each_step_exactly():
    """No site times: a step's time is split between 30 layers; shares must not overlap by 1 ns."""
    steps = [_step(i, 10.001 + i / 3, [0, 1]) for i in range(20)]
    doc = build_trace_events(FakeReader(steps, 30, {0: "a", 1: "b"}))
    check_perfetto(doc)
    events = doc["traceEvents"]
    for step in (e for e in events if e.get("cat") == "step"):
        layers = sorted((e for e in events if e.get("cat") == "layer" and step["ts"] <= e["ts"] < step["ts"] + step["dur"]),
                        key=lambda e: e["ts"])
        assert len(layers) == 30 and layers[0]["ts"] == step["ts"]
        assert all(a["ts"] + a["dur"] == b["ts"] for a, b in zip(layers, layers[1:], strict=False))
        assert layers[-1]["ts"] + layers[-1]["dur"] == step["ts"] + step["dur"]


def test_odd_recordings_still_import_cleanly():
    """Site times out of order or past the step's end, NaN, explicit overlapping start times,
    control characters in prompts and texts: all still nest."""
    odd_sites = {"layers.0.input": 0.2, "layers.1.input": 0.1, "layers.1.output": 99.0, "layers.2.input": float("nan")}
    steps = [_step(0, 2.0, [3], site_times_ms=odd_sites), _step(1, 1.5, [3], start_ms=1.0),
             _step(2, float("nan"), [3, 4], start_ms=-5.0), _step(3, 0.0004, [4])]
    steps[1]["texts"] = {"3": "bell\x07 and escape\x1b[0m"}
    check_perfetto(build_trace_events(FakeReader(steps, 3, {3: "tab\there\x00", 4: "ok"})))


def _real_traces(tmp_path, tiny_llama_dir) -> list[str]:
    from tests.traces import record_trace

    out = [record_trace(tmp_path / "tiny", tiny_llama_dir, ["w5 w6 w7 w8", "w9"], max_tokens=5,
                        max_num_batched_tokens=3, shadow="torch")]  # chunked prefill, a shadow, format 2
    recorded = os.path.join(ROOT, "traces", "h200-flash-attn-vs-torch")
    if os.path.isdir(recorded):
        out.append(recorded)
    return out


def test_exports_of_real_traces_import_cleanly(tmp_path, tiny_llama_dir):
    for path in _real_traces(tmp_path, tiny_llama_dir):
        out = tmp_path / (os.path.basename(path) + ".json")
        n = export_perfetto(TraceReader(path), out)
        with open(out, encoding="utf-8") as f:
            assert check_perfetto(json.load(f)) == n


def test_the_checker_catches_what_perfetto_rejects():
    ok = {"traceEvents": [{"ph": "X", "pid": 1, "tid": 1, "name": "a", "ts": 0, "dur": 10},
                          {"ph": "X", "pid": 1, "tid": 1, "name": "b", "ts": 2, "dur": 3}]}
    check_perfetto(ok)
    bad = [{"ph": "X", "pid": 1, "tid": 1, "name": "c", "ts": 9.999, "dur": 2},  # crosses a's end
           {"ph": "C", "pid": 1, "name": "kv", "ts": 1, "args": {"used": "3"}},
           {"ph": "X", "pid": "1", "tid": 1, "name": "d", "ts": 1, "dur": 1},
           {"ph": "X", "pid": 1, "tid": 2, "name": "e\x01", "ts": 1, "dur": 1}]
    for event in bad:
        with pytest.raises(AssertionError):
            check_perfetto({"traceEvents": ok["traceEvents"] + [event]})
    # the 1 ns overlap of edges rounded separately (what the export used to write)
    touching = {"traceEvents": [{"ph": "X", "pid": 1, "tid": 1, "name": "l0", "ts": 0.333, "dur": 0.3335},
                                {"ph": "X", "pid": 1, "tid": 1, "name": "l1", "ts": 0.666, "dur": 0.333}]}
    with pytest.raises(AssertionError, match="overlaps"):
        check_perfetto(touching)
