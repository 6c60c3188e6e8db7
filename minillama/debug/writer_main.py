"""The trace writer process (``python -m minillama.debug.writer_main``, started by
``writer_process.ProcessWriter``), and the messages both sides pass.

A message is a small pickle whose arrays travel out of band (``_frame``), read back by
``_Messages``; host tensors cross as numpy arrays (``_pack_tensor``, ``_unpack_tensor``). The
process reads its pipe ahead of the writing (``_Inbox``), takes a lent step's tables out of the
shared ring as its message arrives (``hostring.RingView``), finishes each step
(``finishing.trace_step``) and writes it with ``TraceWriter``, syncing at least every
``SYNC_EVERY_S``; status goes back as lines on stdout.
"""

from __future__ import annotations

import os
import pickle
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from minillama.trace.format import TraceError
from minillama.trace.writer import TraceWriter

_LEN = struct.Struct("<Q")
#: The writer process syncs at least this often while steps keep coming (else when it runs dry).
SYNC_EVERY_S = 0.05
#: Bytes of steps the writer process reads ahead of what it has written.
INBOX_BYTES = 1 << 30
#: The writer process's naps while its pipe is empty: from the first, doubling up to the second.
POLL_S = (0.0002, 0.005)


def _frame(msg: tuple) -> list[memoryview]:
    """A message as the parts to write: a small pickle, and its arrays' memory out of band, uncopied
    (pickle protocol 5), so the thread holds the GIL only for the small part."""
    bufs: list[pickle.PickleBuffer] = []
    data = pickle.dumps(msg, protocol=5, buffer_callback=bufs.append)
    raws = [b.raw() for b in bufs]
    head = b"".join(_LEN.pack(n) for n in (len(data), len(raws), *(r.nbytes for r in raws)))
    return [memoryview(p).cast("B") for p in (head, data, *raws)]


def _pack_tensor(t: Any) -> Any:
    """A host tensor as an array pickle can pass out of band (bfloat16 and the like as same-size ints)."""
    import torch

    if not isinstance(t, torch.Tensor):
        return t
    if t.is_cuda or t.requires_grad or not t.is_contiguous():  # (a host tensor made by the engine needs none)
        t = t.detach().cpu().contiguous()
    if t.dtype in (torch.bfloat16,) or str(t.dtype).startswith("torch.float8"):
        return "tensor", str(t.dtype).removeprefix("torch."), t.view({2: torch.int16, 1: torch.uint8}[t.element_size()]).numpy()
    return "tensor", str(t.dtype).removeprefix("torch."), t.numpy()


def _unpack_tensor(v: Any) -> Any:
    import torch

    if isinstance(v, tuple) and len(v) == 3 and v[0] == "tensor":
        return torch.from_numpy(v[2].copy()).view(getattr(torch, v[1]))
    return v


class _Messages:
    """Framed messages from a file descriptor (``ProcessWriter._send``), each buffer read straight into
    memory of its own.

    With ``poll`` the descriptor is read without blocking, sleeping between tries: no reader ever
    waits in the pipe, so the engine's writes wake nobody. (A write that wakes a waiting reader pulls
    it onto the writer's core, Linux's wake-up for pipes, where it competes with the engine's thread.)
    """

    def __init__(self, fd: int, poll: bool = False) -> None:
        self.fd = fd
        self._poll = poll
        if poll:
            os.set_blocking(fd, False)

    def _take(self, n: int) -> bytearray | None:
        out = bytearray(n)
        view, got, nap = memoryview(out), 0, POLL_S[0]
        while got < n:
            try:
                k = os.readv(self.fd, [view[got:]])
            except BlockingIOError:  # nothing yet: sleep longer the longer nothing comes
                time.sleep(nap)
                nap = min(2 * nap, POLL_S[1])
                continue
            if k == 0:
                return None
            got += k
            nap = POLL_S[0]
        return out

    def next(self) -> tuple[tuple, int] | None:
        """The next message and its size in bytes; None at the end of the stream."""
        head = self._take(2 * _LEN.size)
        if head is None:
            return None
        n, k = struct.unpack("<QQ", head)
        sizes = self._take(k * _LEN.size)
        data = self._take(n)
        if sizes is None or data is None:
            return None
        lens = struct.unpack(f"<{k}Q", sizes)
        bufs = [self._take(m) for m in lens]
        if any(b is None for b in bufs):
            return None
        return pickle.loads(data, buffers=bufs), n + sum(lens)


class _Inbox:
    """Messages read ahead on a thread of their own, so the engine's side never waits for this process
    to finish a step before it can pass the next one (and give its ring slot back); up to ``cap``
    bytes wait here, then the pipe fills and the engine's side waits. ``take`` (a message and its
    size -> the same) runs on that thread as each arrives: it reads a lent slot's tables out at once,
    so the slot goes back however far the writing lags."""

    def __init__(self, msgs: _Messages, cap: int = INBOX_BYTES,
                 take: Callable[[tuple, int], tuple[tuple, int]] | None = None) -> None:
        self._msgs, self._cap, self._take = msgs, cap, take
        self._items: deque[tuple[tuple | None, int]] = deque()
        self._bytes = 0
        self.ended = False  # the engine's side closed the pipe (or went away)
        self._cond = threading.Condition()
        threading.Thread(target=self._read, name="minillama-trace-inbox", daemon=True).start()

    def _read(self) -> None:
        while True:
            got = self._msgs.next()
            if got is not None and self._take is not None:
                got = self._take(*got)
            with self._cond:
                self.ended = got is None
                self._items.append(got if got is not None else (None, 0))
                self._bytes += got[1] if got is not None else 0
                self._cond.notify_all()
                if got is None:
                    return
                while self._bytes > self._cap:
                    self._cond.wait()

    def next(self) -> tuple | None:
        with self._cond:
            while not self._items:
                self._cond.wait()
            msg, size = self._items.popleft()
            self._bytes -= size
            self._cond.notify_all()
            return msg

    def waiting(self) -> bool:
        return bool(self._items)


def main() -> None:
    """The writer process: steps from stdin to the trace folder, status lines to stdout."""
    from minillama.debug.finishing import StepFinisher, trace_step
    from minillama.debug.hostring import RingView
    from minillama.debug.records import StepRecord, decode_tables
    from minillama.debug.snapshot import views

    def say(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    got = _Messages(sys.stdin.fileno()).next()
    init = got[0] if got is not None else None
    if init is None or init[0] != "init":
        sys.exit("minillama.debug.writer_main: runs under writer_process.ProcessWriter, which sends the trace "
                 "to write on stdin")
    _, state, tokenizer, shadow, num_sites, shadow_shape, layout = init
    writer = TraceWriter.reopen(**state)
    ring = RingView(layout) if layout is not None else None
    finisher = StepFinisher(tokenizer)
    parent = os.getppid()

    def take(msg: tuple, size: int) -> tuple[tuple, int]:
        """A step lent in place: its tables decoded out of the slot, which goes back (``_Inbox``)."""
        lent = msg[5].get("lent") if msg[0] == "step" and isinstance(msg[5], dict) else None
        if lent is None:
            return msg, size
        try:
            got = ring.read(lent["slot"], lent["use"], lambda: os.getppid() != parent)  # (the engine died)
            if got is None:
                tables: dict[str, Any] = {"missing": "its tables never reached the shared ring"}
            else:
                raw = views(got[0][: lent["reqs"]], got[1][: lent["rows"]], num_sites, shadow_shape)
                tables = {"decoded": decode_tables(raw, shadow)}
                size += sum(v.nbytes for v in tables["decoded"].values() if v is not None)
        except Exception as e:
            tables = {"missing": f"reading its tables failed ({type(e).__name__}: {e})"}
        finally:
            ring.release(lent["slot"], lent["use"])
        return (*msg[:5], tables, msg[6]), size

    msgs = _Inbox(_Messages(sys.stdin.fileno(), poll=True), take=take if ring is not None else None)
    say("ready")
    synced, told, told_at = time.monotonic(), 0, 0.0

    def sync(tell: bool = False) -> None:
        """Sync what is written; say how many steps are, at most every ``SYNC_EVERY_S`` unless ``tell``
        (each line read wakes a thread of the engine's process, which then takes its GIL)."""
        nonlocal synced, told, told_at
        if not writer.stopped:
            try:
                writer.sync()
            except OSError as e:
                writer._stop(f"syncing the trace failed ({e})")
                say(f"stopped {writer.stop_reason}")
        synced = time.monotonic()
        if writer.num_steps != told and not writer.stopped and (tell or synced - told_at >= SYNC_EVERY_S):
            told, told_at = writer.num_steps, synced
            say(f"steps {told}")

    while (msg := msgs.next()) is not None:
        kind = msg[0]
        if kind == "step" and not writer.stopped:
            _, step, index, event, raw_batch, tables, full = msg
            rec = StepRecord(step, event, raw_batch, None, {k: _unpack_tensor(v) for k, v in full.items()}, index)
            finisher.add(rec)
            try:
                if tables is not None and "missing" in tables:
                    raise TraceError(tables["missing"])
                if tables is not None and "decoded" in tables:
                    rec._tables = tables["decoded"]
                elif tables is not None:
                    raw = views(tables["req"], tables["rows"], num_sites, shadow_shape) if "req" in tables else tables
                    rec._tables = decode_tables(raw, shadow)
                ev, tensors = trace_step(rec, finisher, shadow)
            except Exception as e:  # a step that cannot be finished ends the trace
                msg_ = (str(e).strip().splitlines() or [type(e).__name__])[0]
                writer._stop(f"preparing a step failed ({type(e).__name__}: {msg_})")
            else:
                writer.write_step(ev, tensors, sync=False)
            if writer.stopped:
                say(f"stopped {writer.stop_reason}")
            elif not msgs.waiting() or time.monotonic() - synced > SYNC_EVERY_S:
                sync()
        elif kind == "flush":
            sync(tell=True)
            say("flushed")
        elif kind == "stop" and not writer.stopped:
            sync(tell=True)
            writer._stop(msg[1])
        elif kind == "close":
            sync(tell=True)
            writer.close(msg[1])
            say(f"steps {writer.num_steps}")
            say("closed")
            return
    sync()  # the engine's process went away: keep what came


if __name__ == "__main__":
    main()
