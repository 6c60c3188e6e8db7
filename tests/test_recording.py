"""Recording at engine speed on CPU: the background writer, crashes, overlapped steps, bad input."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from minillama import LLM, SamplingParams
from minillama.cli import main as cli_main
from minillama.debug.manifest import build_manifest
from minillama.debug.recorder import Recorder
from minillama.trace import TraceReader
from minillama.trace.background import BackgroundWriter
from minillama.trace.format import T_STATS
from minillama.trace.writer import TraceWriter
from tests.traces import record_trace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["w10 w11 w12 w13 w14", "w20 w21", "w30 w31 w32"]


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return tiny_llama_dir


def _hashes(reader: TraceReader) -> list[tuple]:
    """Per step, per request and site: the content hash (what a request-aligned diff compares)."""
    out = []
    for i in range(reader.num_steps):
        ev = reader.step(i)
        for s in ev["batch"]["seqs"]:
            for name in reader.site_names(i):
                st = reader.stats(i, name, s["seq_id"])
                if st is not None and st["count"]:
                    out.append((ev["step"] - reader.step(0)["step"], s["chunk"][0], name, st["hash"]))
    return out


def test_overlapped_steps_record_the_same_as_synchronous_steps(tiny, tmp_path):
    """A recorder allows overlapped steps; on CPU both orders compute the same bits."""
    a = record_trace(tmp_path / "sync", tiny, PROMPTS, max_tokens=5, async_scheduling=False)
    b = record_trace(tmp_path / "async", tiny, PROMPTS, max_tokens=5, async_scheduling=True)
    ra, rb = TraceReader(a), TraceReader(b)
    assert ra.num_steps == rb.num_steps and ra.status == rb.status == "complete"
    assert [r["token_ids"] for r in ra.requests().values()] == [r["token_ids"] for r in rb.requests().values()]
    assert _hashes(ra) == _hashes(rb)
    assert all(not ra.step(i)["missing_sites"] for i in range(ra.num_steps))


def test_a_recording_started_mid_run_lists_what_came_before(tiny, tmp_path):
    llm = LLM(tiny, device="cpu", num_kvcache_blocks=64, max_model_len=256)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    seqs = [llm.add_request(llm.tokenizer.encode(p), params) for p in PROMPTS]
    for _ in range(3):
        llm.step()  # prefill and two tokens before anyone records
    computed = {s.block_table[0] for s in seqs}  # one block each holds all their tokens so far
    rec = Recorder(llm)
    rec.set_sink(BackgroundWriter(TraceWriter(tmp_path / "late", build_manifest(llm, rec))))
    rec.attach()
    try:
        while llm.has_unfinished():
            llm.step()
    finally:
        rec.detach()
    r = TraceReader(tmp_path / "late")
    reqs = r.requests()
    for seq in seqs:
        q = reqs[seq.seq_id]
        assert q["prompt_token_ids"] == seq.token_ids[: seq.num_prompt_tokens]
        assert q["prompt"] and q["token_ids"] == seq.completion_token_ids, "the tokens from before, then the rest"
        assert q["text"] == llm.tokenizer.decode(seq.completion_token_ids)
    keys = r.tensor(0, "catchup.k")
    blocks = r.tensor(0, "catchup.blocks").tolist()
    assert keys.shape[:2] == (llm.model_config.num_hidden_layers, len(blocks))
    assert set(blocks) == computed, "the blocks holding the tokens computed so far"


def test_a_recording_that_starts_with_the_run_saves_no_cached_keys(tiny, tmp_path):
    """The first step's blocks are allocated but still empty: nothing to catch up."""
    r = TraceReader(record_trace(tmp_path / "fresh", tiny, PROMPTS, max_tokens=2))
    assert "catchup.k" not in r.tensor_keys(0) and r.step(0)["phase"] == "prefill"


def test_a_writer_process_writes_the_trace_the_writer_thread_writes(tiny, tmp_path):
    """The same run, written by a thread or by a process of its own: the same steps, text and tables."""
    def run(kind):
        llm = LLM(tiny, device="cpu", num_kvcache_blocks=64, max_model_len=256)
        return TraceReader(record_trace(tmp_path / kind, tiny, PROMPTS, max_tokens=6, shadow="reference",
                                        full=["layers.1.attn.q", "logits"], llm=llm, writer=kind))

    a, b = run("thread"), run("process")
    assert a.num_steps == b.num_steps > 3 and a.status == b.status == "complete"
    assert [(q["prompt"], q["token_ids"], q["text"]) for q in a.requests().values()] == \
        [(q["prompt"], q["token_ids"], q["text"]) for q in b.requests().values()]
    assert _hashes(a) == _hashes(b)
    for i in range(a.num_steps):
        ea, eb = a.step(i), b.step(i)
        assert list(ea["pieces"].values()) == list(eb["pieces"].values())
        assert ea["batch"]["seqs"][0]["chunk"] == eb["batch"]["seqs"][0]["chunk"]
        for site in ("layers.1.attn.q", "logits"):
            assert np.array_equal(np.asarray(a.tensor(i, site)), np.asarray(b.tensor(i, site)))
        assert a.shadow(i) == b.shadow(i)


def test_a_writer_process_flushes_on_request(tiny, tmp_path):
    from minillama.debug.writer_process import ProcessWriter

    llm = LLM(tiny, device="cpu", num_kvcache_blocks=64, max_model_len=256)
    rec = Recorder(llm)
    sink = ProcessWriter(TraceWriter(tmp_path / "t", build_manifest(llm, rec)), rec)
    rec.set_sink(sink)
    rec.attach()
    try:
        for p in PROMPTS:
            llm.add_request(llm.tokenizer.encode(p), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        for _ in range(3):
            llm.step()
        sink.flush()
        assert sink.num_steps == 3 and TraceReader(tmp_path / "t").num_steps == 3, "written and synced"
    finally:
        rec.detach()
    assert TraceReader(tmp_path / "t").status == "complete", "closed with its end line"


def test_a_step_the_writer_process_cannot_take_stops_the_trace_not_the_engine(tiny, tmp_path, monkeypatch):
    from minillama.debug import writer_process

    calls = {"n": 0}
    real = writer_process._pack_tensor

    def pack(t):
        calls["n"] += 1
        if calls["n"] > 3:
            raise TypeError("cannot hand this over")
        return real(t)

    monkeypatch.setattr(writer_process, "_pack_tensor", pack)
    r = TraceReader(record_trace(tmp_path / "t", tiny, PROMPTS, max_tokens=6, writer="process"))
    assert r.status.startswith("stopped: handing a step to the trace writer failed (TypeError")
    assert r.num_steps == 3 and len(r.requests()) == len(PROMPTS)


def test_host_tensors_cross_to_the_writer_process_bit_for_bit():
    import pickle

    import torch

    from minillama.debug.writer_main import _pack_tensor, _unpack_tensor

    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.int64, torch.int32):
        t = (torch.randn(5, 3) * 100).to(dtype)
        back = _unpack_tensor(pickle.loads(pickle.dumps(_pack_tensor(t), protocol=5)))
        assert back.dtype == dtype and back.shape == t.shape and torch.equal(back.view(-1), t.view(-1))


_CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from tests.traces import record_trace
    from minillama.attention import get_backend
    # thousands of steps: the parent kills it long before it could finish
    record_trace({out!r}, {model!r}, ["w%d w%d w%d" % (i % 400 + 4, i % 300 + 5, i % 200 + 6) for i in range(400)],
                 max_tokens=240, max_num_seqs=8, max_num_batched_tokens=16, full=["layers.1.*"], writer={writer!r})
""")


@pytest.mark.slow
@pytest.mark.parametrize("writer", ["thread", "process"])
def test_killed_recordings_open_to_their_last_finished_step(tiny, tmp_path, writer):
    rng = random.Random(7)
    for k in range(3):
        out = tmp_path / f"killed{k}"
        child = subprocess.Popen([sys.executable, "-c", _CHILD.format(root=ROOT, out=str(out), model=tiny,
                                                                      writer=writer)],
                                 cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not (out / "events.jsonl").exists() and time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.3, 2.5))
        child.send_signal(signal.SIGKILL)
        child.wait()
        r = TraceReader(out)
        assert r.status.startswith("truncated")
        for i in range(r.num_steps):  # every step it kept reads whole: batch, statistics, tensors
            ev = r.step(i)
            assert ev["batch"]["seqs"]
            assert r.stats(i, "layers.1.mlp.out") is not None
            assert r.tensor(i, "layers.1.mlp.out") is not None
        assert len(r.requests()) >= 1


def test_a_full_pattern_that_matches_nothing_is_one_line(tiny, tmp_path, capsys):
    rc = cli_main(["record", "--out", str(tmp_path / "t"), "--prompt", "w5 w6", "--raw", "--model", tiny,
                   "--device", "cpu", "--full", "layer.*.attn.q"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "matches no site" in err


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_a_size_cap_mid_run_leaves_a_readable_trace(tiny, tmp_path, capsys, writer):
    rc = cli_main(["record", "--out", str(tmp_path / "cap"), "--prompt", "w4 w5 w6", "--prompt", "w7", "--raw",
                   "--model", tiny, "--device", "cpu", "--max-tokens", "30", "--ignore-eos", "--max-bytes", "40000",
                   "--trace-writer", writer])
    assert rc == 0
    r = TraceReader(tmp_path / "cap")
    assert r.status.startswith("stopped: size cap") and 0 < r.num_steps < 31
    assert r.stats(r.num_steps - 1, "logits") is not None
    assert "stopped" in capsys.readouterr().out


def test_a_slow_stop_still_ends_the_trace_with_its_reason(tiny, tmp_path, monkeypatch):
    """The engine sees the writer stopped before the writer's thread has written its "stopped" line;
    detaching must wait for that line (a race CI's busy machine found)."""
    real_stop = TraceWriter._stop

    def slow_stop(self, reason):
        self.stopped = True
        time.sleep(0.3)
        real_stop(self, reason)

    monkeypatch.setattr(TraceWriter, "_stop", slow_stop)
    rc = cli_main(["record", "--out", str(tmp_path / "cap"), "--prompt", "w4 w5 w6", "--raw", "--model", tiny,
                   "--device", "cpu", "--max-tokens", "30", "--ignore-eos", "--max-bytes", "30000"])
    assert rc == 0 and TraceReader(tmp_path / "cap").status.startswith("stopped: size cap")


def test_a_size_cap_below_the_manifest_is_refused_before_writing(tiny, tmp_path, capsys):
    rc = cli_main(["record", "--out", str(tmp_path / "cap"), "--prompt", "w4 w5", "--raw", "--model", tiny,
                   "--device", "cpu", "--max-tokens", "3", "--max-bytes", "100"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "leaves no room for a step" in err
    assert not (tmp_path / "cap").exists()


def test_a_failing_disk_stops_the_trace_not_the_engine(tiny, tmp_path, monkeypatch):
    llm = LLM(tiny, device="cpu", num_kvcache_blocks=64, max_model_len=256)
    rec = Recorder(llm)
    writer = TraceWriter(tmp_path / "full", build_manifest(llm, rec))
    real = writer._data.write

    def write(data):  # the disk fills once three steps are in
        if writer.num_steps >= 3:
            raise OSError(28, "No space left on device")
        return real(data)

    monkeypatch.setattr(writer._data, "write", write)
    rec.set_sink(BackgroundWriter(writer))
    rec.attach()
    try:
        out = llm.generate([llm.tokenizer.encode(p) for p in PROMPTS],
                           SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    finally:
        rec.detach()
    assert all(len(o.token_ids) == 8 for o in out), "generation goes on"
    r = TraceReader(tmp_path / "full")
    assert r.num_steps == 3 and "No space left" in r.status
    assert r.stats(2, "embed") is not None


def test_the_shipped_format_1_trace_still_opens():
    r = TraceReader(os.path.join(ROOT, "traces", "h200-flash-attn-vs-torch"))
    assert r.version == 1 and r.num_steps > 0
    st = r.stats(0, "layers.0.attn.out")
    assert st is not None and st["shape"][0] == r.step(0)["batch"]["num_tokens"]
    assert r.stats(0, "layers.0.attn.out", seq_id=r.step(0)["batch"]["seqs"][0]["seq_id"]) is None
    assert r.shadow(0)["0"]["budget_ratio"] > 0


def test_a_recorder_without_a_writer_does_not_keep_every_step(tiny):
    """With no trace, steps the history dropped are passed, not kept unfinished: the backlog stays
    bounded over a long run, and the steps still in the history decode the same text as one
    recorded with nothing dropped (the tiny model's tokenizer: one piece per token id)."""
    def run(history: int) -> tuple[Recorder, list]:
        llm = LLM(tiny, device="cpu", num_kvcache_blocks=64, max_model_len=256)
        rec = Recorder(llm, history=history)
        with rec:
            params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
            llm.generate([llm.tokenizer.encode(p) for p in PROMPTS], [params] * len(PROMPTS))
        return rec, list(rec.history)

    short, kept = run(2)
    assert len(short.finisher._unfinished) <= short._keep < 40
    full, every = run(64)
    assert len(every) >= 40 > short._keep
    def pieces(rec: Recorder, records: list) -> list[list[str]]:  # seq ids differ between the two engines
        return [[p for _, p in sorted(rec.event_of(r)["pieces"].items(), key=lambda kv: int(kv[0]))] for r in records]

    tail = pieces(full, every[-2:])
    assert pieces(short, kept) == tail and all(all(p) for p in tail)


def test_switching_recording_off_still_writes_what_was_queued(tiny):
    """The UI switches recording off (``set_sink(None)``, then the writer drains) while the engine
    runs on: steps still queued for the writer keep their tables though they leave a short history,
    and a view holding a step that left it reads no tables rather than an error."""
    class Behind:  # a trace writer that has not caught up yet
        def __init__(self):
            self.queued = []

        def submit(self, fn):
            self.queued.append(fn)
            return True

        def close(self, reason):
            pass

    llm = LLM(tiny, device="cpu", num_kvcache_blocks=64, max_model_len=256)
    rec, sink = Recorder(llm, history=2), Behind()
    rec.set_sink(sink)
    rec.attach()
    try:
        llm.add_request(llm.tokenizer.encode("w5 w6 w7"), SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
        for _ in range(3):
            llm.step()
        rec.set_sink(None)
        for _ in range(3):
            llm.step()
        written = [fn() for fn in sink.queued]  # what the writer's thread would store, after the fact
        assert len(written) == 3 and all(T_STATS in tensors for _, tensors in written)
        rec.sink_closed()
        old = rec.history[0]
        for _ in range(3):
            llm.step()
        assert old not in rec.history and old.tables(False) is None and not old.snapshot.any_bad()
    finally:
        rec.detach()


def test_a_request_retired_after_a_passed_step_flushes_nothing_stale():
    """A request's decoder holds half a character; the next step is passed unfinished; the request then
    retires without sampling: no stale U+FFFD from the old decoder, and nothing left behind."""
    from types import SimpleNamespace

    from minillama.debug.finishing import StepFinisher

    tok = LLM(None, device="cpu", num_kvcache_blocks=8, max_model_len=64).tokenizer
    emoji, hi = tok.encode("😀"), tok.encode(" hi")
    assert len(emoji) > 1, "the test needs a character split over tokens"

    def step(n, sampled, finished=(), prompts=None):
        return SimpleNamespace(step=n, event={"prompts": prompts or {}, "sampled": sampled, "finished": list(finished)},
                               raw_batch={"seqs": np.zeros((1, 8), np.int64), "kv": {}, "preempted": [], "waiting": []})

    f = StepFinisher(tok, keep=1)
    steps = [step(0, {"5": hi[0]}, prompts={"5": {"token_ids": [1], "generated": []}}), step(1, {"5": emoji[0]}),
             step(2, {"5": hi[0]}), step(3, {}, finished=[[5, "error"]])]
    f.add(steps[0])
    f.upto(steps[0])
    f.add(steps[1])
    f.upto(steps[1])  # step 1 leaves half the emoji held back
    f.add(steps[2])
    f.add(steps[3])  # step 2 is passed unfinished (keep=1)
    f.upto(steps[3])
    assert steps[3].event["pieces"] == {} and not f._passed and not f._decoders


def test_a_session_on_an_engine_without_a_tokenizer_runs_past_the_backlog():
    """A random-weight engine built from a bare ModelConfig (token ids only, as the benchmarks use)
    passes its dropped steps too; the session runs every step to the end."""
    from minillama.config import ModelConfig
    from minillama.debug.breakpoints import Breakpoint
    from minillama.debug.session import DebugSession

    cfg = ModelConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, max_position_embeddings=256, rms_norm_eps=1e-5,
                      rope_theta=10000.0, rope_scaling=None, tie_word_embeddings=True, bos_token_id=1,
                      eos_token_ids=[2])
    llm = LLM(cfg, device="cpu", num_kvcache_blocks=32, max_model_len=128)
    s = DebugSession(llm, breakpoints=[Breakpoint("*", "nan")], pause_at_start=False, keep_steps=2).start()
    try:
        assert s.wait(60)
        s.submit([1, 5, 7], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), chat=False)
        deadline = time.monotonic() + 60
        while llm.num_steps < 30 and time.monotonic() < deadline and s.error is None:
            s.wait(1)
        assert s.wait(60) and s.idle and s.error is None and not s.paused
        assert llm.num_steps >= 30 and len(s.recorder.finisher._unfinished) <= s.recorder._keep < 30
    finally:
        s.stop()


def test_a_writer_process_that_cannot_start_says_so(tiny, tmp_path, monkeypatch):
    """Waiting for it (the CLI): one error naming the fix. Not waiting (a live session, whose UI must not
    stall): the engine goes on and the trace ends with a stopped line saying the same."""

    from minillama.debug.writer_process import ProcessWriter
    from minillama.trace.format import TraceError

    monkeypatch.setattr(sys, "executable", "/bin/false")
    llm = LLM(tiny, device="cpu", num_kvcache_blocks=64, max_model_len=256)
    rec = Recorder(llm)
    with pytest.raises(TraceError, match=r"did not start \(exit code 1\): record with --trace-writer thread"):
        ProcessWriter(TraceWriter(tmp_path / "a", build_manifest(llm, rec)), rec)
    assert TraceReader(tmp_path / "a").status.startswith("stopped: the trace writer process did not start")

    sink = ProcessWriter(TraceWriter(tmp_path / "b", build_manifest(llm, rec)), rec, wait=False)
    rec.set_sink(sink)
    rec.attach()
    try:
        llm.add_request(llm.tokenizer.encode(PROMPTS[0]), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        while llm.has_unfinished():
            llm.step()
    finally:
        rec.detach()
    r = TraceReader(tmp_path / "b")
    assert r.status.startswith("stopped: the trace writer process did not start (exit code 1)")
    assert "--trace-writer thread" in r.status and r.num_steps == 0


def test_a_writer_process_that_never_gets_ready_is_given_up(tiny, tmp_path, monkeypatch):
    from minillama.debug import writer_process
    from minillama.trace.format import TraceError

    hang = tmp_path / "hang"
    hang.write_text("#!/bin/sh\nexec sleep 60\n")
    hang.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(hang))
    monkeypatch.setattr(writer_process, "STARTUP_S", 1.0)
    llm = LLM(tiny, device="cpu", num_kvcache_blocks=64, max_model_len=256)
    rec = Recorder(llm)
    t = time.monotonic()
    with pytest.raises(TraceError, match=r"did not start \(exit code -9\)"):
        writer_process.ProcessWriter(TraceWriter(tmp_path / "t", build_manifest(llm, rec)), rec)
    assert time.monotonic() - t < 30
    assert TraceReader(tmp_path / "t").status.startswith("stopped: the trace writer process did not start")


def test_auto_picks_the_writer_thread_on_the_cpu(tiny, tmp_path):
    from minillama.debug.writer_process import ProcessWriter, trace_sink
    from minillama.trace.background import BackgroundWriter

    llm = LLM(tiny, device="cpu", num_kvcache_blocks=64, max_model_len=256)
    rec = Recorder(llm)
    sink = trace_sink(TraceWriter(tmp_path / "t", build_manifest(llm, rec)), rec)
    assert isinstance(sink, BackgroundWriter) and not isinstance(sink, ProcessWriter)
    sink.close()


def test_the_sender_writes_a_message_larger_than_the_pipe_whole():
    """``_write_all`` gathers its parts into one call at a time and goes on after a partial write."""
    import threading

    from minillama.debug.writer_process import _write_all

    parts = [b"head", bytes(range(256)) * 9000, np.arange(300_000, dtype=np.int64), b"tail"]
    want = b"".join(bytes(memoryview(p).cast("B")) for p in parts)
    r, w = os.pipe()
    got = bytearray()
    reader = threading.Thread(target=lambda: [got.extend(c) for c in iter(lambda: os.read(r, 1 << 16), b"")])
    reader.start()
    _write_all(w, parts)  # several MiB: the pipe takes part of it at a time
    os.close(w)
    reader.join(10)
    os.close(r)
    assert bytes(got) == want


def test_the_senders_mailbox_wakes_it_for_a_batch_of_steps_or_at_once_for_control():
    import time

    from minillama.debug import writer_process as wp

    box = wp._Mailbox(depth=64)
    for i in range(wp.WAKE_STEPS - 1):
        box.put(("step", i))
    t = time.perf_counter()
    assert box.take() == [("step", i) for i in range(wp.WAKE_STEPS - 1)]  # after the timeout, all of them
    assert time.perf_counter() - t >= wp.WAKE_S * 0.9
    box.put(("flush",), urgent=True)
    t = time.perf_counter()
    assert box.take() == [("flush",)] and time.perf_counter() - t < wp.WAKE_S / 2
    for i in range(wp.WAKE_STEPS):
        box.put(("step", i))
    t = time.perf_counter()
    assert len(box.take()) == wp.WAKE_STEPS and time.perf_counter() - t < wp.WAKE_S / 2
    gone = wp._Mailbox(depth=2, alive=lambda: False)  # a full box whose sender is gone never blocks a put
    for i in range(5):
        gone.put(("step", i))
    assert len(gone.take()) == 5
