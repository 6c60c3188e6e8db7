"""Trace folders: writer/reader round trip, crash safety, hostile files, size cap, diff, Perfetto export.

Unit tests use synthetic events (no model); one module-scoped end-to-end run records the built-in
model through ``minillama record`` and reads it back.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minillama.debug.records import content_hash, tensor_stats
from minillama.trace import TraceError, TraceReader, TraceWriter, diff_shadow
from minillama.trace.perfetto import export_perfetto
from minillama.trace.render import LAYER_PARTS
from minillama.trace.shadow_diff import render_shadow

NUM_LAYERS = 3
PROMPTS = [[1, 5, 6, 7, 8], [1, 9, 10]]
PLANT_SKIP = object()


# ---- synthetic traces -----------------------------------------------------------------------------
def _site_names() -> list[str]:
    return ["embed", *[f"layers.{i}.{p}" for i in range(NUM_LAYERS) for p in LAYER_PARTS], "final_norm", "logits"]


def _token(step: int, req: int) -> int:
    return 100 + 7 * step + req


def synthetic_steps(num_steps: int, seq_ids: tuple[int, int], *, plant_site: str | None = None,
                    plant_step: int = 0, token_change: tuple[int, int] | None = None,
                    shadow: dict[int, dict[int, dict]] | None = None):
    """(event, tensors) per step for two requests: a prefill of both prompts, then decodes.

    Values depend only on (step, site), never on seq ids, so two traces with different seq ids are
    equal. ``plant_site`` adds 0.01 to that site and every later site of ``plant_step``.
    """
    texts = {sid: "" for sid in seq_ids}
    done = [0, 0]
    for step in range(num_steps):
        if step == 0:
            chunks = [(0, len(p)) for p in PROMPTS]
            phase = "prefill"
        else:
            chunks = [(len(p) + step - 1, len(p) + step) for p in PROMPTS]
            phase = "decode"
        seqs, start, rows = [], 0, []
        for k, (sid, (a, b)) in enumerate(zip(seq_ids, chunks, strict=True)):
            seqs.append({"seq_id": sid, "prompt_len": len(PROMPTS[k]), "len": b, "num_computed": a, "num_new": b - a,
                         "chunk": [a, b], "num_cached": 0, "block_table": [2 * k, 2 * k + 1], "preemptions": 0,
                         "samples": True})
            rows.append([sid, start, start + b - a])
            start += b - a
        num_tokens = start
        batch = {"step": step, "phase": phase, "num_tokens": num_tokens, "seqs": seqs, "block_size": 4,
                 "num_blocks": 16, "num_free_blocks": 12, "blocks": {str(b): {"ref": 1, "cached": b == 0}
                                                                     for b in range(4)}, "preempted": []}
        gen = torch.Generator().manual_seed(1000 + step)
        sites, tensors = {}, {}
        planted = False
        for name in _site_names():
            shape = (2, 16) if name == "logits" else (num_tokens, 8)
            t = torch.randn(shape, generator=gen)
            if plant_site is not None and step == plant_step and (planted or name == plant_site):
                planted = True
                t = t + 0.01
            rec = tensor_stats(t)
            rec["rows"] = rows if name != "logits" else [[sid, k, k + 1] for k, sid in enumerate(seq_ids)]
            sites[name] = rec
            tensors[name] = t
        sampled = {}
        for k, sid in enumerate(seq_ids):
            tok = _token(step, k)
            if token_change == (step, k):
                tok += 1
            sampled[str(sid)] = tok
            texts[sid] += f" t{tok}"
            done[k] += 1
        tensors["sampled"] = torch.tensor(list(sampled.values()))
        sites["sampled"] = {**tensor_stats(tensors["sampled"]), "rows": [[sid, k, k + 1] for k, sid in enumerate(seq_ids)]}
        finished = [[sid, "length"] for sid in seq_ids] if step == num_steps - 1 else []
        ev = {"type": "step", "step": step, "phase": phase, "batch": batch, "sites": sites,
              "shadow": {str(layer): rec for layer, rec in (shadow or {}).get(step, {}).items()},
              "sampled": sampled, "finished": finished, "texts": {str(s): texts[s] for s in seq_ids},
              "missing_sites": [], "elapsed_ms": 10.0 + step,
              "site_times_ms": {n: 0.1 * j for j, n in enumerate(_site_names())} if step % 2 else {}}
        yield ev, tensors


def manifest_for(seq_ids: tuple[int, int], prompts=PROMPTS) -> dict:
    return {"model": {"name": "synthetic", "path": "/nowhere/synthetic", "format": "none"},
            "model_config": {"num_hidden_layers": NUM_LAYERS, "hidden_size": 8},
            "requests": [{"index": k, "seq_id": sid, "prompt": f"prompt {k}", "prompt_token_ids": p}
                         for k, (sid, p) in enumerate(zip(seq_ids, prompts, strict=True))],
            "backend": "torch", "shadow": None, "device": "cpu", "dtype": "float32"}


def write_trace(path, num_steps: int = 4, seq_ids=(10, 11), full: bool = True, prompts=PROMPTS, **kw) -> str:
    w = TraceWriter(path, manifest_for(seq_ids, prompts))
    for ev, tensors in synthetic_steps(num_steps, seq_ids, **kw):
        if not full:
            tensors = {}
        assert w.write_step(ev, tensors)
    w.close("finished")
    return str(path)


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg, msg
    return msg


# ---- writer + reader ------------------------------------------------------------------------------
def test_round_trip_is_bit_exact(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "layers.0.output": torch.randn(5, 7, generator=gen),
        "layers.0.attn.out": torch.randn(5, 3, 4, generator=gen).to(torch.bfloat16),
        "layers.0.attn.out@ref": torch.randn(5, 3, 4, generator=gen, dtype=torch.float64),
        "half": torch.randn(4, generator=gen).half(),
        "sampled": torch.tensor([3, 1 << 40, -2], dtype=torch.int64),
        "batch.block_tables": torch.tensor([[0, 1], [2, -1]], dtype=torch.int32),
        "non_contiguous": torch.randn(6, 4, generator=gen).t(),
        "flags": torch.tensor([True, False]),
        "scalar": torch.tensor(2.5),
    }
    event = {"type": "step", "step": 0, "phase": "prefill", "batch": {"seqs": []},
             "sites": {"layers.0.output": {**tensor_stats(tensors["layers.0.output"]), "rows": [[0, 0, 5]]},
                       "nan_site": {"mean": math.nan, "absmax": math.inf}},
             "sampled": {"0": 3}, "texts": {"0": "héllo ✓"}, "elapsed_ms": 1.5}
    w = TraceWriter(tmp_path / "t", {"note": "x"})
    assert w.write_step(event, tensors)
    assert w.write_step({**event, "step": 1}, {})
    w.close("finished")
    r = TraceReader(tmp_path / "t")
    assert r.num_steps == 2 and r.status == "complete"
    assert r.manifest["note"] == "x" and r.manifest["format"] == "minillama-trace" and r.manifest["version"] == 1
    for name, t in tensors.items():
        back = r.tensor(0, name)
        assert back is not None and back.dtype == t.dtype and back.shape == t.shape, name
        assert content_hash(back) == content_hash(t.contiguous()), name
        assert torch.equal(back, t), name
    ev = r.step(0)
    assert ev["texts"] == {"0": "héllo ✓"} and ev["sites"]["layers.0.output"]["full"] is True
    assert math.isnan(ev["sites"]["nan_site"]["mean"])
    assert r.stats(0, "layers.0.output")["hash"] == content_hash(tensors["layers.0.output"])
    assert r.tensor(0, "not.there") is None and r.tensor(1, "layers.0.output") is None
    assert r.tensor_file(1) is None and sorted(r.tensor_keys(0)) == sorted(tensors)
    assert os.listdir(tmp_path / "t" / "tensors") == ["step_000000.safetensors"]
    lines = (tmp_path / "t" / "events.jsonl").read_text().splitlines()
    assert json.loads(lines[-1]) == {"type": "end", "reason": "finished", "steps": 2}
    assert all(line.startswith('{"type": ') for line in lines)


def test_reader_api_on_synthetic_trace(tmp_path):
    path = write_trace(tmp_path / "a", num_steps=4)
    r = TraceReader(path)
    assert r.num_layers == NUM_LAYERS and len(r) == 4
    assert r.site_names(0)[:2] == ["embed", "layers.0.input"]
    assert [ev["phase"] for ev in r.steps()] == ["prefill", "decode", "decode", "decode"]
    assert r.step(-1)["step"] == 3
    with pytest.raises(IndexError):
        r.step(4)
    reqs = r.requests()
    assert list(reqs) == [10, 11]
    assert reqs[10]["prompt"] == "prompt 0" and reqs[10]["token_ids"] == [_token(s, 0) for s in range(4)]
    assert reqs[11]["text"].endswith(f"t{_token(3, 1)}") and reqs[11]["finish_reason"] == "length"
    assert r.shadow(0) == {}


def test_writer_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(TraceError) as e:
        TraceWriter(tmp_path / "busy", {})
    assert "choose another --out or delete it" in one_line(e)
    (tmp_path / "empty").mkdir()
    TraceWriter(tmp_path / "empty", {}).close()  # an existing empty folder is fine


@pytest.fixture(scope="module")
def base_trace(tmp_path_factory) -> str:
    return write_trace(tmp_path_factory.mktemp("base") / "t", num_steps=5)


@pytest.fixture(scope="module")
def cut_dir(tmp_path_factory, base_trace) -> str:
    d = tmp_path_factory.mktemp("cut") / "t"
    shutil.copytree(base_trace, d)
    return str(d)


@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frac=st.floats(0.0, 1.0))
def test_truncated_events_open_up_to_the_last_complete_step(base_trace, cut_dir, frac):
    data = open(os.path.join(base_trace, "events.jsonl"), "rb").read()
    cut = int(frac * len(data))
    with open(os.path.join(cut_dir, "events.jsonl"), "wb") as f:
        f.write(data[:cut])
    # a line is complete when all of its bytes before the newline survived
    complete, start = [], 0
    for line in data.split(b"\n")[:-1]:
        if start + len(line) <= cut:
            complete.append(json.loads(line))
        start += len(line) + 1
    r = TraceReader(cut_dir)
    steps = [c for c in complete if c["type"] == "step"]
    assert r.num_steps == len(steps)
    if r.num_steps:
        assert r.step(r.num_steps - 1) == steps[-1]
        assert r.tensor(r.num_steps - 1, "logits") is not None
    ended = any(c["type"] == "end" for c in complete)
    assert r.status == ("complete" if ended else "truncated (recording did not finish)")


def test_missing_or_corrupt_tensor_file(tmp_path):
    path = write_trace(tmp_path / "a", num_steps=3)
    r = TraceReader(path)
    os.remove(os.path.join(path, "tensors", "step_000001.safetensors"))
    with pytest.raises(TraceError) as e:
        r.tensor(1, "embed")
    assert "missing" in one_line(e)
    with open(os.path.join(path, "tensors", "step_000002.safetensors"), "wb") as f:
        f.write(os.urandom(300))
    with pytest.raises(TraceError) as e:
        r.tensor(2, "embed")
    assert "not a valid safetensors" in one_line(e)
    # a truncated file: the header is fine but the data is cut short
    p0 = os.path.join(path, "tensors", "step_000000.safetensors")
    blob = open(p0, "rb").read()
    with open(p0, "wb") as f:
        f.write(blob[: len(blob) // 2])
    with pytest.raises(TraceError) as e:
        r.tensor(0, "logits")
    one_line(e)
    assert r.step(0)["step"] == 0  # events stay readable


class _Boom:
    """Unpickling this would create a marker file: the reader must never unpickle."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_foreign_and_corrupt_folders_fail_in_one_line(tmp_path):
    marker = str(tmp_path / "UNPICKLED")
    evil = pickle.dumps({"format": "minillama-trace", "x": _Boom(marker)})
    cases = {}
    cases["missing"] = str(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    cases["empty"] = str(tmp_path / "empty")
    (tmp_path / "random").mkdir()
    (tmp_path / "random" / "manifest.json").write_bytes(os.urandom(256))
    cases["random"] = str(tmp_path / "random")
    (tmp_path / "pickle_manifest").mkdir()
    (tmp_path / "pickle_manifest" / "manifest.json").write_bytes(evil)
    cases["pickle_manifest"] = str(tmp_path / "pickle_manifest")
    (tmp_path / "model.pkl").write_bytes(evil)
    cases["pickle_file"] = str(tmp_path / "model.pkl")
    (tmp_path / "pickle_dir").mkdir()
    (tmp_path / "pickle_dir" / "data.pkl").write_bytes(evil)
    cases["pickle_dir"] = str(tmp_path / "pickle_dir")
    (tmp_path / "other_json").mkdir()
    (tmp_path / "other_json" / "manifest.json").write_text('{"name": "something else"}')
    cases["other_json"] = str(tmp_path / "other_json")
    (tmp_path / "list_json").mkdir()
    (tmp_path / "list_json" / "manifest.json").write_text("[1, 2]")
    cases["list_json"] = str(tmp_path / "list_json")
    (tmp_path / "future").mkdir()
    (tmp_path / "future" / "manifest.json").write_text('{"format": "minillama-trace", "version": 99}')
    cases["future"] = str(tmp_path / "future")
    (tmp_path / "no_events").mkdir()
    (tmp_path / "no_events" / "manifest.json").write_text('{"format": "minillama-trace", "version": 1}')
    cases["no_events"] = str(tmp_path / "no_events")
    expect = {"missing": "does not exist", "empty": "is empty", "random": "not valid JSON",
              "pickle_manifest": "not valid JSON", "pickle_file": "is a file", "pickle_dir": "no manifest.json",
              "other_json": "not a minillama trace", "list_json": "not a minillama trace",
              "future": "upgrade minillama", "no_events": "no events.jsonl"}
    for name, path in cases.items():
        with pytest.raises(TraceError) as e:
            TraceReader(path)
        assert expect[name] in one_line(e), (name, str(e.value))
        assert isinstance(e.value, ValueError)
    # a pickle in place of a step's tensor file
    path = write_trace(tmp_path / "t", num_steps=1)
    with open(os.path.join(path, "tensors", "step_000000.safetensors"), "wb") as f:
        f.write(evil)
    with pytest.raises(TraceError) as e:
        TraceReader(path).tensor(0, "embed")
    one_line(e)
    assert not os.path.exists(marker)


def test_tensor_file_outside_the_folder_is_refused(tmp_path):
    path = write_trace(tmp_path / "t", num_steps=1)
    ev_path = os.path.join(path, "events.jsonl")
    text = open(ev_path).read().replace("tensors/step_000000.safetensors", "../../etc/passwd")
    open(ev_path, "w").write(text)
    with pytest.raises(TraceError) as e:
        TraceReader(path).tensor(0, "embed")
    assert "outside the trace folder" in one_line(e)


def test_size_cap_stops_cleanly(tmp_path):
    steps = list(synthetic_steps(5, (10, 11)))
    probe = TraceWriter(tmp_path / "probe", manifest_for((10, 11)))
    for ev, t in steps[:2]:
        probe.write_step(ev, t)
    cap = probe.bytes_written + 300  # two steps fit, the third does not
    probe.close()
    w = TraceWriter(tmp_path / "t", manifest_for((10, 11)), max_bytes=cap)
    results = [w.write_step(ev, t) for ev, t in steps]
    assert results == [True, True, False, False, False]
    w.close("finished")
    w.close("again")
    r = TraceReader(tmp_path / "t")
    assert r.num_steps == 2
    assert r.status == f"stopped: size cap of {cap} bytes reached after step 1"
    assert r.size_bytes <= cap
    last = open(tmp_path / "t" / "events.jsonl").read().splitlines()[-1]
    assert json.loads(last)["type"] == "stopped"
    assert sorted(os.listdir(tmp_path / "t" / "tensors")) == ["step_000000.safetensors", "step_000001.safetensors"]


def test_a_failing_write_stops_instead_of_crashing(tmp_path):
    (ev, t), (ev2, t2) = synthetic_steps(2, (10, 11))
    w = TraceWriter(tmp_path / "t", manifest_for((10, 11)))
    assert w.write_step(ev, t)
    assert w.write_step(ev2, {"bad": "not a tensor"}) is False  # type: ignore[dict-item]
    w.close("finished")
    r = TraceReader(tmp_path / "t")
    assert r.num_steps == 1 and r.status.startswith("stopped: writing step 1 failed")


def test_opening_a_large_trace_is_fast(tmp_path):
    path = write_trace(tmp_path / "t", num_steps=2, full=False)
    ev_path = os.path.join(path, "events.jsonl")
    lines = open(ev_path, "rb").read().splitlines(keepends=True)
    step_line = lines[1]
    reps = (150 << 20) // len(step_line)  # ~150 MB of step lines
    with open(ev_path, "wb") as f:
        chunk = step_line * 1000
        for _ in range(reps // 1000):
            f.write(chunk)
        f.write(lines[-1])
    t0 = time.perf_counter()
    r = TraceReader(path)
    dt = time.perf_counter() - t0
    assert r.num_steps == reps // 1000 * 1000 and r.status == "complete"
    assert r.step(r.num_steps // 2)["phase"] == "decode"
    assert dt < 2.0, f"opening took {dt:.2f} s"


# ---- diff: request-aligned diffs are tested in tests/test_diff.py on traces the engine records -------
def test_diff_shadow_table(tmp_path, capsys):
    from minillama.cli import main

    def rec(ratio: float, max_abs: float) -> dict:
        return {"backend": "flash-attn", "max_abs": max_abs, "rel": max_abs / 10, "err_active": max_abs / 2,
                "err_shadow": max_abs, "budget": 1e-3, "budget_ratio": 1.0, "budget_ratio_shadow": ratio}

    shadow = {s: {layer: rec(1.0, 1e-4) for layer in range(NUM_LAYERS)} for s in range(4)}
    shadow[2][1] = rec(3.5, 5e-3)
    shadow[3][2] = rec(2.5, 2e-4)
    path = write_trace(tmp_path / "s", shadow=shadow)
    res = diff_shadow(TraceReader(path))
    assert [lay.layer for lay in res.layers] == [0, 1, 2]
    assert res.first_over is not None and res.first_over.layer == 1 and res.first_over.first_step_over == 2
    assert res.layers[1].max_abs == 5e-3 and res.layers[1].step_of_max == 2
    assert res.layers[1].budget_ratio_shadow == 3.5 and res.exit_code == 1
    assert diff_shadow(TraceReader(path), threshold=1e-2).exit_code == 0
    first = diff_shadow(TraceReader(path), threshold=1e-4 * 1.5).first_over
    assert first is not None and first.layer == 1
    render_shadow(res)
    assert main(["diff", "--shadow", path]) == 1
    assert "first layer over" in capsys.readouterr().out
    plain = write_trace(tmp_path / "plain")
    with pytest.raises(TraceError) as e:
        diff_shadow(TraceReader(plain))
    assert "--shadow" in one_line(e)


# ---- perfetto -------------------------------------------------------------------------------------
def _strict_json(path: str) -> dict:
    def refuse(x: str):
        raise ValueError(f"not strict JSON: {x}")

    with open(path) as f:
        return json.load(f, parse_constant=refuse)


def test_perfetto_export(tmp_path, capsys):
    from minillama.cli import main

    path = write_trace(tmp_path / "t", num_steps=4)
    out = str(tmp_path / "t.json")
    n = export_perfetto(TraceReader(path), out)
    doc = _strict_json(out)
    events = doc["traceEvents"]
    assert len(events) == n and doc["displayTimeUnit"] == "ms"
    steps = [e for e in events if e["ph"] == "X" and e.get("cat") == "step"]
    layers = [e for e in events if e["ph"] == "X" and e.get("cat") == "layer"]
    assert len(steps) == 4 and len(layers) == 4 * NUM_LAYERS
    for s in steps:  # layers nest inside their step
        inner = [lay for lay in layers if s["ts"] <= lay["ts"] and lay["ts"] + lay["dur"] <= s["ts"] + s["dur"] + 1e-3]
        assert len(inner) == NUM_LAYERS
    assert steps[1]["ts"] == pytest.approx(steps[0]["ts"] + steps[0]["dur"])
    counters = [e for e in events if e["ph"] == "C"]
    assert any(e["name"] == "KV blocks" and e["args"]["used"] == 4 for e in counters)
    names = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    request_tids = {e["tid"] for e in events if e["ph"] == "X" and e.get("cat") == "request"}
    assert len(request_tids) == 2 and all(t in names for t in request_tids)
    assert {names[t].split(":")[0] for t in request_tids} == {"request 0 (seq 10)", "request 1 (seq 11)"}
    req0 = sorted((e for e in events if e["ph"] == "X" and e.get("tid") == min(request_tids)), key=lambda e: e["ts"])
    assert req0[0]["name"] == "prefill [0:5)" and req0[1]["name"] == "decode token 2"
    assert all(e["ph"] in {"X", "C", "M", "i"} for e in events)
    assert main(["trace", "export-perfetto", path, str(tmp_path / "cli.json")]) == 0
    _strict_json(str(tmp_path / "cli.json"))
    assert main(["trace", "export-perfetto", path, str(tmp_path / "no" / "dir.json")]) == 2


def test_trace_info_on_synthetic_trace(tmp_path, capsys):
    from minillama.cli import main

    path = write_trace(tmp_path / "t", num_steps=3)
    assert main(["trace", "info", path]) == 0
    out = capsys.readouterr().out
    assert "complete" in out and "1 prefill" in out and "2 decode" in out and "prompt 1" in out
    assert main(["trace", "info", str(tmp_path / "missing")]) == 2


# ---- end to end with the built-in model -----------------------------------------------------------
@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    pytest.importorskip("minillama.debug.recorder")
    from minillama.cli import main

    out = str(tmp_path_factory.mktemp("e2e") / "trace")
    rc = main(["record", "--out", out, "--prompt", "Say hi.", "--max-tokens", "4", "--device", "cpu",
               "--max-model-len", "512", "--full", "layers.1.*", "logits"])
    assert rc == 0
    return out


@pytest.mark.slow
def test_record_then_read_back(recorded, capsys):
    from minillama.cli import main

    r = TraceReader(recorded)
    assert r.status == "complete" and r.manifest["backend"] == "torch" and r.manifest["shadow"] is None
    assert r.manifest["model_config"]["num_hidden_layers"] == r.num_layers == 30
    assert r.manifest["recording"]["full_sites"] == ["layers.1.*", "logits"]
    assert r.manifest["versions"]["torch"] == torch.__version__
    assert r.manifest["engine_config"]["max_model_len"] == 512
    reqs = r.requests()
    (sid, req), = reqs.items()
    assert req["prompt"] == "Say hi." and len(req["token_ids"]) == r.num_steps <= 4 and req["text"]
    assert r.step(0)["phase"] == "prefill" and r.step(0)["missing_sites"] == []
    for i in range(r.num_steps):
        t = r.tensor(i, "layers.1.output")
        stats = r.stats(i, "layers.1.output")
        assert t is not None and list(t.shape) == stats["shape"] and content_hash(t) == stats["hash"]
        assert r.tensor(i, "layers.2.output") is None and r.stats(i, "layers.2.output")["full"] is False
    assert r.tensor(0, "logits") is not None
    capsys.readouterr()
    assert main(["trace", "info", recorded]) == 0
    out = capsys.readouterr().out
    assert "Say hi." in out and "complete" in out
    assert main(["diff", recorded, recorded]) == 0  # a trace against itself: every request bit-identical
    assert main(["trace", "export-perfetto", recorded, recorded + ".json"]) == 0
    _strict_json(recorded + ".json")
    # the folder is taken now: refused before the model loads
    t0 = time.perf_counter()
    assert main(["record", "--out", recorded, "--prompt", "x", "--device", "cpu"]) == 2
    assert time.perf_counter() - t0 < 2
    assert "choose another --out" in capsys.readouterr().err
