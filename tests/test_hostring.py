"""The ring of host slots shared with the trace writer process (``debug/hostring.py``), and steps lent
through it: a slot is reused only once both sides let it go, the writer reads a slot only once its
stamp landed, and a writer process that dies never blocks the engine."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
import torch

from minillama import LLM, SamplingParams
from minillama.debug.hostring import RING, HostRing, RingView
from minillama.debug.manifest import build_manifest
from minillama.debug.recorder import Recorder
from minillama.trace import TraceReader
from minillama.trace.writer import TraceWriter
from tests.traces import record_trace

pytestmark = pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="the shared ring needs memfd (Linux)")
SHAPES = [((4, 3), torch.int64), ((5, 2), torch.int32)]


class _Holder:  # what the ring holds a slot for: a snapshot, here one that never needs copying out
    def copy_out(self) -> None:
        raise AssertionError("nothing held here should be copied out")


def test_a_lent_slot_is_reused_only_once_the_writer_gives_it_back():
    ring = HostRing(SHAPES, torch.device("cpu"), shared=True)
    assert ring.shared and ring.layout()["total"] > RING * 4096
    uses = {}
    for _ in range(RING):
        slot, use = ring.acquire()
        h = _Holder()
        ring.hold(slot, h)
        ring.lend(slot, use)
        ring.release(slot, h)  # this side is done: only the writer holds it now
        uses[slot] = use
    got = []
    th = threading.Thread(target=lambda: got.append(ring.acquire()), daemon=True)
    th.start()
    time.sleep(0.05)
    assert th.is_alive() and not got, "every slot is lent: the engine waits for the writer"
    ring.released[3] = uses[3] - 1
    time.sleep(0.02)
    assert th.is_alive(), "an older use given back does not free the slot"
    ring.released[3] = uses[3]
    th.join(5)
    assert got and got[0][0] == 3 and got[0][1] == max(uses.values()) + 1 and ring.waits == 1


def test_a_slot_held_here_and_lent_is_free_only_when_both_let_go():
    ring = HostRing(SHAPES, torch.device("cpu"), shared=True)
    slot, use = ring.acquire()
    h = _Holder()
    ring.hold(slot, h)
    ring.lend(slot, use)
    ring.released[slot] = use  # the writer is done first
    ring._reclaim()
    assert slot not in ring._free, "still held here"
    ring.release(slot, h)
    assert slot in ring._free


def test_a_writer_that_is_gone_gives_every_lent_slot_back():
    ring = HostRing(SHAPES, torch.device("cpu"), shared=True)
    for _ in range(RING):
        slot, use = ring.acquire()
        ring.lend(slot, use)
    alive = [True]
    ring.remote_alive = lambda: alive[0]
    threading.Timer(0.05, lambda: alive.__setitem__(0, False)).start()
    slot, _ = ring.acquire()  # would wait forever for a writer that cannot answer
    assert ring.num_lent() == 0 and 0 <= slot < RING


def test_the_writer_reads_a_slot_once_its_stamp_is_there_and_sees_what_was_written():
    ring = HostRing(SHAPES, torch.device("cpu"), shared=True)
    view = RingView({**ring.layout(), "fd": os.dup(ring.fd)})  # the writer process's side, mapped a second time
    slot, use = ring.acquire()
    req, rows = ring.slots[slot]
    assert view.read(slot, use, stop=lambda: True) is None, "not stamped yet: the reader gives up when told"
    req.copy_(torch.arange(12).view(4, 3))
    rows.fill_(-7)
    ring.stamp(slot, use)
    got = view.read(slot, use, stop=lambda: True)
    assert got is not None and np.array_equal(got[0], np.arange(12).reshape(4, 3)) and (got[1] == -7).all()
    ring.lend(slot, use)
    view.release(slot, use)
    assert ring.released[slot] == use


def _count_sender_steps(monkeypatch) -> list:
    from minillama.debug.writer_process import ProcessWriter

    calls: list = []
    real = ProcessWriter._send_step
    monkeypatch.setattr(ProcessWriter, "_send_step", lambda self, *a: (calls.append(a), real(self, *a))[1])
    return calls


def test_a_writer_process_is_lent_every_step_and_writes_them_all(tiny_llama_dir, tmp_path, monkeypatch):
    """No step's tables cross the pipe: each goes as a message naming its slot, written by the engine's
    thread; the trace still holds every step with its statistics (a thread's trace is compared with a
    process's in test_recording)."""
    calls = _count_sender_steps(monkeypatch)
    r = TraceReader(record_trace(tmp_path / "t", tiny_llama_dir, ["w10 w11 w12", "w20 w21"], max_tokens=8,
                                 writer="process"))
    assert r.status == "complete" and r.num_steps >= 8
    assert not calls, "every step was lent"
    for i in range(r.num_steps):
        assert np.isfinite(r.tables(i)["stats"]).all()


def test_a_writer_process_killed_mid_recording_never_blocks_the_engine(tiny_llama_dir, tmp_path):
    """Its lent slots come back once it is gone, so the engine runs past a ring's worth of steps;
    the trace reads to its last written step."""
    from minillama.debug.writer_process import ProcessWriter

    llm = LLM(tiny_llama_dir, device="cpu", num_kvcache_blocks=64, max_model_len=256)
    rec = Recorder(llm)
    sink = ProcessWriter(TraceWriter(tmp_path / "t", build_manifest(llm, rec)), rec)
    rec.set_sink(sink)
    rec.attach()
    try:
        llm.add_request(llm.tokenizer.encode("w10 w11"), SamplingParams(temperature=0, max_tokens=3 * RING,
                                                                          ignore_eos=True))
        for _ in range(3):
            llm.step()
        sink.flush()
        os.kill(sink._proc.pid, signal.SIGKILL)
        sink._proc.wait(10)
        t = time.monotonic()
        while llm.has_unfinished():
            llm.step()
        assert time.monotonic() - t < 30
    finally:
        rec.detach()
    r = TraceReader(tmp_path / "t")
    assert r.num_steps >= 3 and rec.buffer.ring.num_lent() == 0
