"""A trace writer in a process of its own, so its Python never holds the engine's GIL.

``BackgroundWriter`` (trace/background.py) runs on a thread of the engine's process: its text
decoding, table decoding, JSON and encoding hold the GIL that a busy engine thread needs, and
each time it gives the GIL up and takes it back the engine thread waits its turn. ``ProcessWriter``
keeps only the hand-over on that side, and ``python -m minillama.debug.writer_main`` finishes each
step (``finishing.trace_step``, with its own decoders) and writes it with the same ``TraceWriter``.
The trace is the same either way.

The hand-over: where the ring of pinned slots is shared memory (``hostring``: a memfd the process
inherits), the engine's thread lends a step's slot and writes a message of a kilobyte or so itself,
straight into the pipe when the pipe has room and nothing waits before it. The process waits for
the slot's stamp, reads the tables out as the message arrives (ahead of the writing) and gives the
slot back. No thread of the engine's process then wakes, waits for the copies or copies the tables.
Else (a step with full tensors still in flight, a ring lent out, a private ring) a sender thread
waits for the step's device copies and pipes its raw tables, pickled.

Status comes back as lines: ``ready``, ``steps N`` (at most every ``writer_main.SYNC_EVERY_S``,
and at flush, stop and close), ``stopped REASON``, ``flushed``, ``closed``. If the engine's process
dies, the writer sees the pipe close, syncs what it has and exits: the trace reads to its last
written step, as with the thread.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

try:
    import fcntl
    import termios
except ImportError:  # not on POSIX: the pipe is never asked for room, and only the sender writes to it
    pass

from minillama.debug.hostring import RING
from minillama.debug.writer_main import _frame, _pack_tensor
from minillama.trace.format import TraceError
from minillama.trace.writer import TraceWriter

#: How long the writer process may take to start.
STARTUP_S = 120.0
#: Steps the sender is woken for at once (or after ``WAKE_S``): each wake takes the GIL from a busy
#: engine thread, so fewer wakes a step cost it less.
WAKE_STEPS = 4
WAKE_S = 0.05
#: Slots of the ring never lent (the steps in flight need them): past that, steps go through the pipe.
LEND_SPARE = 4
#: Bytes left free in the pipe when the engine's thread writes to it (a write it fills would block).
ROOM_SLACK = 64 << 10


class _Mailbox:
    """What the engine hands the sender: appended without waking it, until ``WAKE_STEPS`` wait, a
    message is urgent (init, flush, close), or ``WAKE_S`` passed; bounded at ``depth`` (a put then
    waits for room, as ``queue.Queue`` would, while ``alive()`` says the sender still takes them)."""

    def __init__(self, depth: int, alive: Callable[[], bool] = lambda: True) -> None:
        self._items: deque[tuple] = deque()
        self.pending = 0  # put and not yet handled by the sender (a message written now would pass them)
        self._count = threading.Lock()  # pending changes on the engine's, the sender's and a UI thread
        self._wake = threading.Event()
        self._depth = depth
        self._alive = alive

    def put(self, item: tuple, urgent: bool = False) -> None:
        with self._count:
            self.pending += 1
        self._items.append(item)
        if urgent or len(self._items) >= WAKE_STEPS:
            self._wake.set()
        while len(self._items) > self._depth and self._alive():  # the writer fell far behind: wait for it
            self._wake.set()
            time.sleep(0.001)

    def take(self) -> list[tuple]:
        """Everything put so far (waits until woken, or ``WAKE_S``)."""
        self._wake.wait(WAKE_S)
        self._wake.clear()  # before draining: a put after this wakes the next take
        out = []
        while self._items:
            out.append(self._items.popleft())
        return out

    def done(self) -> None:
        """One item taken is handled."""
        with self._count:
            self.pending -= 1


class ProcessWriter:
    """A ``TraceWriter`` driven from another process (see the module docstring). The recorder hands it
    ``submit_record(rec, event)``; ``close``, ``flush``, ``num_steps``, ``stopped`` and ``path`` are
    ``BackgroundWriter``'s."""

    takes_records = True

    def __init__(self, writer: TraceWriter, recorder: Any, depth: int = 256, wait: bool = True) -> None:
        """``wait``: return once the process has started (a second or two: it imports torch), or raise
        ``TraceError`` saying why it did not; else return at once, and steps recorded meanwhile wait
        in the pinned ring (the engine copies out those it needs the slot of) and the queue."""
        self.path = writer.path
        self._recorder = recorder
        shadow = recorder.shadow is not None
        layout = recorder.buffer.share_ring()  # the slots this process lends the writer's (None: tables piped)
        state = writer.release()
        import minillama

        root = os.path.dirname(os.path.dirname(os.path.abspath(minillama.__file__)))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])}
        # a session of its own: a Ctrl-C at the terminal interrupts the engine, which then closes the trace,
        # not the writer in the middle of a step
        self._proc = subprocess.Popen([sys.executable, "-m", "minillama.debug.writer_main"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                                      start_new_session=True, pass_fds=(layout["fd"],) if layout else ())
        self._fd = self._proc.stdin.fileno()
        self._pipe_size = _widen_pipe(self._fd)
        self._pipe_lock = threading.Lock()  # one message at a time, whichever thread writes it
        self._ring = recorder.buffer.ring if layout else None
        if self._ring is not None:
            self._ring.remote_alive = lambda: self._proc.poll() is None
        self.num_steps = 0
        self.num_lent = self.num_piped = 0  # steps handed over in place, and through the sender
        self.stopped = False
        self.closed = False
        self.stop_reason: str | None = None
        self._ready = threading.Event()
        self._state, self._never_started = state, False
        self._started = threading.Event()  # the start is over, either way
        self._queue = _Mailbox(depth, lambda: self._sender.is_alive())
        # the sender hands the writer's state over and waits for the process before the first step
        self._queue.put(("init", ("init", state, recorder.llm.tokenizer, shadow, recorder.buffer.num_sites,
                                  recorder.buffer.shadow_shape, layout)), urgent=True)
        self._flushes: deque[threading.Event] = deque()
        self._sender = threading.Thread(target=self._send_steps, name="minillama-trace-sender", daemon=True)
        self._reader = threading.Thread(target=self._read_status, name="minillama-trace-status", daemon=True)
        self._sender.start()
        self._reader.start()
        if wait:
            if not self._started.wait(STARTUP_S + 5):  # the sender is stuck handing the state over
                self._proc.kill()
                self._started.wait(10)
            if self._never_started:
                reason = self.stop_reason
                self.close()
                raise TraceError(reason or "the trace writer process did not start")

    def submit_record(self, rec: Any, event: dict[str, Any]) -> bool:
        """Queue one recorded step (``event``: its event as the engine made it, not shared with views):
        lent in place when it can be (``_lendable``), else through the sender."""
        if self.stopped or self.closed:
            return False
        r = self._recorder
        keep = r.keep_history or r.on_record is not None  # a view or a breakpoint may read the tables later
        if self._lendable(rec, keep):
            try:
                if rec.snapshot.lend(lambda ref: self._post(("step", rec.step, rec.index, event, rec.raw_batch,
                                                             {"lent": ref}, {k: _pack_tensor(v) for k, v in
                                                                             rec.full.items()})), keep):
                    self.num_lent += 1
                    return True
            except (OSError, ValueError):  # the process is gone
                self._gone()
                return False
            except Exception as e:  # as the sender would: the trace ends with a line saying why, the engine goes on
                self.stop_reason = f"handing a step to the trace writer failed ({type(e).__name__}: {e})"
                self.stopped = True
                self._queue.put(("bytes", _frame(("stop", self.stop_reason))), urgent=True)
                return True
        self._queue.put(("step", rec, event))
        self.num_piped += 1
        return True

    def _lendable(self, rec: Any, keep: bool) -> bool:
        """Whether ``rec`` can go as a message naming its slot, written by the engine's thread."""
        snap = rec.snapshot
        if snap is None or self._ring is None or self._queue.pending or not self._ready.is_set():
            return False
        # full tensors copied from the device land with the tables, and the sender waits for them (the
        # sampled tokens, made on the host at the step's end, need no wait)
        if snap.done is not None and not set(rec.full) <= {"sampled"}:
            return False
        # lent and kept, a slot stays out of the ring until its step leaves the history: with a long
        # history the engine's thread would copy out a step each step (the sender does that instead)
        if keep and self._recorder.history.maxlen > RING - LEND_SPARE:
            return False
        return self._ring.num_lent() <= RING - LEND_SPARE

    def _post(self, msg: tuple) -> None:
        """Write ``msg`` from this thread if the pipe has room for it and nothing waits in the mailbox (so
        no other thread is woken and no step overtakes another); else leave it to the sender."""
        parts = _frame(msg)
        if self._queue.pending == 0:
            with self._pipe_lock:
                if self._queue.pending == 0 and _room(self._fd, self._pipe_size) >= sum(map(len, parts)) + ROOM_SLACK:
                    _write_all(self._fd, parts)
                    return
        self._queue.put(("bytes", parts))

    def flush(self) -> None:
        """Wait until every step submitted so far is written and synced."""
        if self._sender.is_alive():
            done = threading.Event()
            self._queue.put(("flush", done), urgent=True)
            done.wait(60)

    def close(self, reason: str = "finished") -> None:
        """Write what is queued, then the end line; waits for the process. Safe to call twice."""
        if self.closed:
            return
        self.closed = True
        self._queue.put(("close", reason), urgent=True)
        self._sender.join()
        try:
            self._proc.wait(120)
        except subprocess.TimeoutExpired:
            self._proc.kill()
        self._reader.join(5)
        if self._ring is not None:
            self._ring.remote_gone()
        if self._never_started:  # nobody else can say why the trace holds no step
            try:
                TraceWriter.reopen(**self._state)._stop(self.stop_reason)  # as the process would have
            except OSError:
                pass

    # ---- the engine's side: a thread that hands steps over ----------------------------------------
    def _send(self, msg: tuple) -> None:
        """One message (``_frame``), in one system call (each return from one takes the GIL again)."""
        self._write(_frame(msg))

    def _write(self, parts: list) -> None:
        with self._pipe_lock:
            _write_all(self._fd, parts)

    def _send_steps(self) -> None:
        while True:
            for item in self._queue.take():
                last = self._send_one(*item)
                self._queue.done()
                if last:
                    return

    def _send_one(self, kind: str, *rest: Any) -> bool:
        """Hand one message over; True once the pipe is closed."""
        try:
            if kind == "init":
                self._start(rest[0])
            elif kind == "flush":
                self._flushes.append(rest[0])
                self._send(("flush",))
            elif kind == "close":
                self._send(("close", rest[0]))
                self._proc.stdin.close()
            elif kind == "bytes":  # written even once stopped: the process gives its lent slot back
                self._write(rest[0])
            elif not self.stopped:
                self._send_step(*rest)
        except (OSError, ValueError):  # the process is gone: the engine goes on, the trace stops here
            self._gone()
            if kind == "flush":
                rest[0].set()
        except Exception as e:  # a step that cannot be handed over ends the trace, with a line saying so
            self.stop_reason = f"handing a step to the trace writer failed ({type(e).__name__}: {e})"
            self.stopped = True
            try:
                self._send(("stop", self.stop_reason))
            except (OSError, ValueError):
                pass
        return kind == "close"

    def _start(self, init: tuple) -> None:
        """Send the writer's state and wait until the process has taken it up."""
        try:
            self._send(init)
            self._ready.wait(STARTUP_S)
        except (OSError, ValueError):  # gone before it read its state
            pass
        try:
            if not self._ready.is_set() or self.stopped:
                self._proc.kill()
                self.stop_reason = (f"the trace writer process did not start (exit code {self._proc.wait()}): "
                                    "record with --trace-writer thread")
                self.stopped = self._never_started = True
        finally:
            self._started.set()

    def _send_step(self, rec: Any, event: dict[str, Any]) -> None:
        r = self._recorder
        keep = r.keep_history or r.on_record is not None  # a view or a breakpoint may read the tables later

        def send(tables: dict[str, Any] | None) -> None:  # the slot's memory goes to the pipe as it is
            full = {k: _pack_tensor(v) for k, v in rec.full.items()}  # read once the step's copies landed
            self._send(("step", rec.step, rec.index, event, rec.raw_batch, tables, full))

        snap = rec.snapshot
        if snap is None or not snap.hand_over(send, keep):  # no statistics (too large a batch, or dropped)
            if snap is not None and snap.done is not None:
                snap.done.synchronize()
            send(None)

    def _gone(self) -> None:
        if not self.stopped:
            code = self._proc.poll()
            self.stop_reason = f"the trace writer process ended (exit code {code})"
            self.stopped = True

    def _read_status(self) -> None:
        for line in self._proc.stdout:
            word, _, rest = line.decode(errors="replace").rstrip("\n").partition(" ")
            if word == "ready":
                self._ready.set()
            elif word == "steps":
                self.num_steps = int(rest)
            elif word == "stopped":
                self.stop_reason, self.stopped = rest, True
            elif word == "flushed" and self._flushes:
                self._flushes.popleft().set()
        if not self.closed:
            self._gone()
        self._ready.set()  # a sender still waiting for the start finds it stopped
        while self._flushes:
            self._flushes.popleft().set()


def _room(fd: int, size: int) -> int:
    """Free bytes in the pipe ``fd`` of ``size`` bytes (Linux; -1 where it cannot be asked)."""
    try:
        return size - struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
    except (NameError, OSError, AttributeError):  # (NameError: no fcntl here)
        return -1


def _write_all(fd: int, parts: list) -> None:
    """Write ``parts`` (bytes-like) to ``fd`` in order, gathered (a pipe may take part of them at a time)."""
    views = [memoryview(p).cast("B") for p in parts]
    while views:
        n = os.writev(fd, views)
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


def _widen_pipe(fd: int) -> int:
    """Let a whole decode step's tables sit in the pipe (Linux: 1 MiB where allowed, else as it is);
    its size now (0 where it cannot be asked: nothing is then written to it but by the sender)."""
    try:
        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
        return fcntl.fcntl(fd, getattr(fcntl, "F_GETPIPE_SZ", 1032))
    except (NameError, OSError):
        return 0


def trace_sink(writer: TraceWriter, recorder: Any, kind: str = "auto", wait: bool = True) -> Any:
    """The recorder's sink for ``writer``: a ``BackgroundWriter`` (``kind`` "thread") or a ``ProcessWriter``
    ("process"); "auto" picks the process on CUDA, where the engine's thread is busy with Python for its
    whole step and a writer thread's GIL slows it (benchmarks/RESULTS.md), and the thread on the CPU,
    where the engine's ops use every core and a process would take one from them. ``wait``: see
    ``ProcessWriter``."""
    if kind == "auto":
        kind = "process" if recorder.llm.device.type == "cuda" else "thread"
    if kind == "process":
        return ProcessWriter(writer, recorder, wait=wait)
    from minillama.trace.background import BackgroundWriter

    return BackgroundWriter(writer)
