"""The trace format on disk: round trips, damaged and foreign folders, size caps, the CLI around it.

Fixture traces are recorded by the real engine on a tiny random Llama (``tests/traces.py``).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct

import numpy as np
import pytest
import torch

from minillama import LLM, hooks
from minillama.debug.recorder import Recorder
from minillama.trace import TraceError, TraceReader, TraceWriter
from minillama.trace.cli import cmd_info  # noqa: F401  (the command exists)
from minillama.trace.safetensors_blob import encode
from tests.traces import record_trace

PROMPTS = ["w5 w6 w7 w8 w9", "w10 w11"]


def one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text and "Traceback" not in text, text
    return text


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, tiny_llama_dir) -> str:
    path = tmp_path_factory.mktemp("rec") / "t"
    return record_trace(path, tiny_llama_dir, PROMPTS, max_tokens=4, shadow="torch", max_num_batched_tokens=4,
                        full=["layers.1.*", "logits", "layers.*.attn.out@shadow"])


def test_round_trip_is_bit_exact(tiny_llama_dir, tmp_path):
    """Every full tensor read back equals, bit for bit, what the recorder saw."""
    seen: dict[tuple[int, str], torch.Tensor] = {}
    step = {"n": -1}

    def spy(site, tensor, info):
        if site == "step.begin":
            step["n"] = info["step"]
        elif tensor is not None and site in ("layers.1.mlp.out", "layers.1.attn.q", "logits"):
            seen[(step["n"], site)] = tensor.detach().clone()

    hooks.attach(spy)
    try:
        path = record_trace(tmp_path / "t", tiny_llama_dir, PROMPTS, max_tokens=3, full=["layers.1.*", "logits"])
    finally:
        hooks.detach(spy)
    r = TraceReader(path)
    first = r.step(0)["step"]
    assert seen and r.version == 2
    for (k, site), t in seen.items():
        back = r.tensor(k - first, site)
        assert back.dtype == t.dtype and torch.equal(back.view(torch.uint8), t.contiguous().view(torch.uint8)), site


def test_a_blob_is_safetensors_as_the_library_reads_it():
    """The writer's own blob encoder against the safetensors package: same tensors, bit for bit."""
    from safetensors.torch import load

    g = torch.Generator().manual_seed(0)
    tensors = {"bf16": torch.randn(3, 5, generator=g).bfloat16(), "f32": np.arange(7, dtype=np.float32),
               "i64": np.arange(12, dtype=np.int64).reshape(3, 4)[:, ::2], "empty": np.zeros((0, 4), np.int32),
               "scalar": torch.tensor(2.5, dtype=torch.float64), "i32": torch.arange(6, dtype=torch.int32)[::2],
               "np0d": np.array(7, dtype=np.int64), "odd": np.arange(3, dtype=np.float32),
               "flags": np.array([True, False])}
    pieces = encode(tensors)
    blob = b"".join(bytes(p) for p in pieces)
    back = load(blob)
    assert set(back) == set(tensors)
    (n,) = struct.unpack_from("<Q", blob)
    header = json.loads(blob[8: 8 + n])
    assert n % 8 == 0 and header["np0d"]["shape"] == [] and header["scalar"]["shape"] == []
    for k, e in header.items():  # every tensor starts at a multiple of its element size
        assert e["data_offsets"][0] % back[k].element_size() == 0, k
    for k, v in tensors.items():
        want = v if isinstance(v, torch.Tensor) else torch.from_numpy(np.array(v))
        assert back[k].dtype == want.dtype and back[k].shape == want.shape and torch.equal(back[k], want), k
    assert encode({}) == []


def test_reader_api_on_a_recorded_trace(recorded):
    r = TraceReader(recorded)
    assert r.status == "complete" and r.num_steps >= 4 and r.num_layers == 3
    assert [e["name"] for e in r.catalog][:2] == ["embed", "layers.0.input"]
    ev = r.step(0)
    assert ev["phase"] == "prefill" and ev["batch"]["seqs"][0]["chunk"] == [0, 4], "a budget of 4 chunks the prompt"
    whole = r.stats(0, "layers.1.mlp.out")
    parts = [r.stats(0, "layers.1.mlp.out", s["seq_id"]) for s in ev["batch"]["seqs"]]
    assert sum(p["count"] for p in parts) == whole["count"]
    t = r.tensor(0, "layers.1.mlp.out").double()
    assert whole["mean"] == pytest.approx(t.mean().item(), rel=1e-5, abs=1e-7)
    assert whole["max"] == t.max().item() and whole["absmax"] == t.abs().max().item()
    sh = r.shadow(1)
    assert set(sh) == {"0", "1", "2"} and all(m["max_abs"] == 0.0 for m in sh.values()), "torch against torch"
    assert r.tensor(1, "layers.0.attn.out@shadow") is not None
    reqs = r.requests()
    assert [q["prompt"] for q in reqs.values()] == PROMPTS and all(len(q["token_ids"]) == 4 for q in reqs.values())
    assert "sampled" in r.tensor_keys(1) and r.tensor(1, "logits").shape[0] == len(r.step(1)["sampled"])


def test_writer_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(TraceError, match="not empty"):
        TraceWriter(tmp_path / "busy", {})
    TraceWriter(tmp_path / "empty", {}).close()  # an existing empty folder is fine


@pytest.mark.parametrize("frac", [0.1, 0.5, 0.93, 0.999])
def test_a_trace_cut_short_opens_up_to_its_last_complete_step(recorded, tmp_path, frac):
    cut = tmp_path / "cut"
    shutil.copytree(recorded, cut)
    data = (cut / "events.jsonl").read_bytes()
    (cut / "events.jsonl").write_bytes(data[: int(len(data) * frac)])
    full, r = TraceReader(recorded), TraceReader(cut)
    assert r.status.startswith("truncated") and 0 <= r.num_steps <= full.num_steps
    for i in range(r.num_steps):
        assert r.step(i)["step"] == full.step(i)["step"]
        assert r.stats(i, "embed") == full.stats(i, "embed")


def test_damaged_data_ends_in_one_line(recorded, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(recorded, bad)
    with open(bad / "data.bin", "r+b") as f:
        f.seek(8)  # inside the first blob's header
        f.write(b"\xff\xfe{{{{")
    with pytest.raises(TraceError) as e:
        TraceReader(bad).stats(0, "embed")
    assert "damaged" in one_line(e)
    gone = tmp_path / "gone"
    shutil.copytree(recorded, gone)
    os.remove(gone / "data.bin")
    with pytest.raises(TraceError) as e:
        TraceReader(gone).step(0)
    assert "data.bin" in one_line(e)
    lies = tmp_path / "lies"
    shutil.copytree(recorded, lies)
    text = (lies / "events.jsonl").read_text().replace('"data": [0,', '"data": [99999999,', 1)
    (lies / "events.jsonl").write_text(text)
    with pytest.raises(TraceError) as e:
        TraceReader(lies).step(0)
    assert "outside data.bin" in one_line(e)


class _Boom:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_foreign_and_corrupt_folders_fail_in_one_line(recorded, tmp_path):
    marker = str(tmp_path / "UNPICKLED")
    evil = pickle.dumps({"format": "minillama-trace", "x": _Boom(marker)})
    cases, expect = {}, {}

    def case(name: str, files: dict[str, bytes] | None, want: str) -> None:
        path = tmp_path / name
        if files is not None:
            path.mkdir()
            for rel, data in files.items():
                (path / rel).write_bytes(data)
        cases[name], expect[name] = str(path), want

    case("missing", None, "does not exist")
    case("empty", {}, "is empty")
    case("random", {"manifest.json": os.urandom(256)}, "not valid JSON")
    case("pickle_manifest", {"manifest.json": evil}, "not valid JSON")
    case("pickle_dir", {"data.pkl": evil}, "no manifest.json")
    case("other_json", {"manifest.json": b'{"name": "something else"}'}, "not a minillama trace")
    case("list_json", {"manifest.json": b"[1, 2]"}, "not a minillama trace")
    case("future", {"manifest.json": b'{"format": "minillama-trace", "version": 99}'}, "upgrade minillama")
    case("no_events", {"manifest.json": b'{"format": "minillama-trace", "version": 2}'}, "no events.jsonl")
    (tmp_path / "model.pkl").write_bytes(evil)
    cases["pickle_file"], expect["pickle_file"] = str(tmp_path / "model.pkl"), "is a file"
    for name, path in cases.items():
        with pytest.raises(TraceError) as e:
            TraceReader(path)
        assert expect[name] in one_line(e), (name, str(e.value))
    swapped = tmp_path / "swapped"  # a pickle in place of the data file
    shutil.copytree(recorded, swapped)
    (swapped / "data.bin").write_bytes(evil)
    with pytest.raises(TraceError) as e:
        TraceReader(swapped).stats(0, "embed")
    one_line(e)
    assert not os.path.exists(marker)


def test_size_cap_stops_cleanly(tiny_llama_dir, tmp_path):
    from minillama.debug.manifest import build_manifest
    from minillama.trace.background import BackgroundWriter

    llm = LLM(tiny_llama_dir, device="cpu", num_kvcache_blocks=64, max_model_len=256)
    rec = Recorder(llm)
    rec.set_sink(BackgroundWriter(TraceWriter(tmp_path / "cap", build_manifest(llm, rec), max_bytes=30000)))
    rec.attach()
    try:
        llm.generate([llm.tokenizer.encode(p) for p in PROMPTS], None)
    finally:
        rec.detach()
    r = TraceReader(tmp_path / "cap")
    assert r.status.startswith("stopped: size cap of 30000 bytes") and r.num_steps >= 1
    assert r.size_bytes <= 30000
    assert r.stats(r.num_steps - 1, "embed") is not None


def test_trace_info_on_a_recorded_trace(recorded, capsys):
    from minillama.cli import main

    assert main(["trace", "info", recorded]) == 0
    out = capsys.readouterr().out
    assert "complete" in out and "w5 w6" in out and "shadow torch" in out


def test_events_are_json_lines_with_type_first(recorded):
    with open(os.path.join(recorded, "events.jsonl"), encoding="utf-8") as f:
        lines = [json.loads(line) for line in f]
    assert all(next(iter(rec)) == "type" for rec in lines)
    assert lines[-1] == {"type": "end", "reason": "finished", "steps": len(lines) - 1}
    assert all("batch" not in rec for rec in lines), "batches travel as tables in the blob"
    blobs = [rec["data"] for rec in lines if "data" in rec]
    assert blobs and all(at % 8 == 0 for at, _ in blobs), "each blob starts 8-byte aligned in data.bin"
    assert all(a + n <= b for (a, n), (b, _) in zip(blobs, blobs[1:], strict=False)), "blobs follow one another"


@pytest.mark.slow
def test_record_then_read_back_on_the_builtin_model(tmp_path, capsys):
    from minillama.cli import main

    out = tmp_path / "rec"
    rc = main(["record", "--out", str(out), "--prompt", "What is 2+2?", "--max-tokens", "3", "--device", "cpu",
               "--shadow", "--full", "logits"])
    assert rc == 0
    r = TraceReader(out)
    assert r.status == "complete" and r.manifest["shadow"] == "reference"
    logits = r.tensor(r.num_steps - 1, "logits")
    st = r.stats(r.num_steps - 1, "logits")
    assert logits is not None and st["shape"] == list(logits.shape)
    assert r.shadow(0)["0"]["budget_ratio"] < 4
