"""Write a trace folder step by step, so that a crash at any moment leaves every finished step readable.

Layout (documented in traces/README.md)::

    DIR/manifest.json     what was run (written once, atomically)
    DIR/events.jsonl      one JSON line per scheduler step, then an end or stopped line
    DIR/data.bin          every step's tensors (its statistics tables and full tensors) as one
                          safetensors blob each, appended; a step's line names its blob's offset

A step's blob is written (and synced) before the line that names it, so a line never points at
data that is not complete on disk. ``write_step(..., sync=False)`` and ``sync()`` let
``BackgroundWriter`` (trace/background.py, on its own thread) sync many steps at once.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
from typing import Any

import numpy as np
import torch

from minillama.trace.format import DATA, EVENTS, FORMAT_NAME, FORMAT_VERSION, MANIFEST, TraceError
from minillama.trace.safetensors_blob import encode

# room kept under the size cap for the final "stopped" line
_FINAL_LINE_RESERVE = 256
# a list of plain numbers spread over lines by indent=2 (token ids) goes on one line; the newlines it
# requires never occur inside JSON strings, so string values are untouched
_NUMBER_LIST = re.compile(r"\[\n\s+((?:-?[\d.eE+-]+,\n\s+)*-?[\d.eE+-]+)\n\s*\]")


def _json_default(obj: Any) -> Any:
    """Make engine values JSON-able: tensors and numpy scalars become numbers or lists, sets sorted lists."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()
    if hasattr(obj, "item") and callable(obj.item):
        try:
            return obj.item()
        except (TypeError, ValueError):
            pass
    if hasattr(obj, "tolist") and callable(obj.tolist):
        return obj.tolist()
    if isinstance(obj, set | frozenset):
        return sorted(obj, key=repr)
    return str(obj)


def dumps_record(record: dict[str, Any]) -> str:
    """One JSON line (no newline) with ``type`` as the first key, so readers can index lines unparsed."""
    ordered = {"type": record.get("type", "step"), **{k: v for k, v in record.items() if k != "type"}}
    return json.dumps(ordered, default=_json_default, ensure_ascii=False, separators=(", ", ": "))


def _fsync_dir(path: str) -> None:
    """Make a rename or a new file in ``path`` durable (best effort: not every OS allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_durable(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename: readers see all of it or nothing."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


class TraceWriter:
    """Appends steps to a new trace folder: ``write_step(event, tensors) -> bool`` and ``close(reason)``.

    ``max_bytes`` caps the folder's size: the step that would cross it is not written; a
    ``stopped`` line is written instead and ``write_step`` returns False (recording should stop).
    ``write_step(..., sync=False)`` leaves the group commit to ``sync()``.
    """

    def __init__(self, path: str | os.PathLike, manifest: dict[str, Any], max_bytes: int | None = None) -> None:
        self.path = os.fspath(path)
        if max_bytes is not None and max_bytes <= 0:
            raise TraceError(f"the size cap must be a positive number of bytes, got {max_bytes}: "
                                  "pass --max-bytes N with N > 0, or leave it out for no cap")
        self.max_bytes = max_bytes
        if os.path.exists(self.path):
            if not os.path.isdir(self.path):
                raise TraceError(f"{self.path} exists and is a file: choose another --out or delete it")
            if os.listdir(self.path):
                raise TraceError(f"{self.path} exists and is not empty: choose another --out or delete it")
        self.manifest = {**manifest, "format": FORMAT_NAME, "version": FORMAT_VERSION,
                         "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}
        text = json.dumps(self.manifest, default=_json_default, ensure_ascii=False, indent=2)
        data = (_NUMBER_LIST.sub(lambda m: "[" + " ".join(m.group(1).split()) + "]", text) + "\n").encode()
        if max_bytes is not None and len(data) + _FINAL_LINE_RESERVE >= max_bytes:
            raise TraceError(f"the size cap of {max_bytes} bytes leaves no room for a step: the trace's manifest "
                             f"alone is {len(data)} bytes; give a cap of several times that, or leave it out")
        try:
            os.makedirs(self.path, exist_ok=True)
            _write_durable(os.path.join(self.path, MANIFEST), data)
        except OSError as e:
            raise TraceError(f"cannot write the trace folder {self.path} ({e.strerror or e}): choose a folder "
                             "you can write to (--out)") from None
        self._start(len(data))
        _fsync_dir(self.path)

    def _start(self, bytes_written: int) -> None:
        """Open the step files for appending, with no step written yet by this writer."""
        self.bytes_written = bytes_written
        self.num_steps = 0
        self.last_step: int | None = None
        self.stopped = False
        self.closed = False
        self.stop_reason: str | None = None
        self._data = open(os.path.join(self.path, DATA), "ab")
        self._events = open(os.path.join(self.path, EVENTS), "ab")
        self._lines: list[bytes] = []  # written after the data they name is synced

    # ---- per step -------------------------------------------------------------------------------
    def write_step(self, event: dict[str, Any], tensors: dict[str, torch.Tensor | np.ndarray] | None = None,
                   sync: bool = True) -> bool:
        """Append one step (its blob first, then its event line). False = stop recording.

        Never raises for a full cap or a failing disk: it writes a ``stopped`` line if it can and
        returns False, so recording can never break generation.
        """
        if self.closed or self.stopped:
            return False
        step = event.get("step")
        step = step if isinstance(step, int) and not isinstance(step, bool) else self.num_steps
        try:
            blob = encode(tensors or {})
            size = sum(map(len, blob))  # bytes, and byte views (encode casts them to "B")
            event = {**event, "type": "step"}
            event.pop("tensor_file", None)
            pad = -self._data.tell() % 8 if blob else 0  # each blob starts 8-byte aligned in data.bin
            if blob:
                event["data"] = [self._data.tell() + pad, size]
            line = (dumps_record(event) + "\n").encode()
            if self.max_bytes is not None and (
                    self.bytes_written + pad + size + len(line) + _FINAL_LINE_RESERVE > self.max_bytes):
                after = f"after step {self.last_step}" if self.last_step is not None else "before the first step"
                self._stop(f"size cap of {self.max_bytes} bytes reached {after}")
                return False
            if pad:
                self._data.write(b"\0" * pad)
            for piece in blob:  # each array's own memory, straight to the file
                self._data.write(piece)
            self._lines.append(line)
            self.bytes_written += pad + size + len(line)
            if sync:
                self.sync()
        except (OSError, ValueError, TypeError, AttributeError, RuntimeError) as e:
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
            self._stop(f"writing step {step} failed ({type(e).__name__}: {msg})")
            return False
        self.num_steps += 1
        self.last_step = step
        return True

    def sync(self) -> None:
        """Group commit: sync the data, then append and sync the lines that name it."""
        if not self._lines:
            return
        self._data.flush()
        os.fsync(self._data.fileno())
        lines, self._lines = b"".join(self._lines), []
        self._write_line(lines)

    def _stop(self, reason: str) -> None:
        """Write the final ``stopped`` line (best effort) and refuse further steps."""
        self.stopped = True
        self.stop_reason = reason
        try:
            self.sync()
        except OSError:
            self._lines = []
        try:
            self._write_line((dumps_record({"type": "stopped", "reason": reason, "steps": self.num_steps}) + "\n")
                             .encode())
        except OSError:
            pass
        finally:
            self._events.close()
            self._data.close()

    def _write_line(self, line: bytes) -> None:
        at = self._events.tell()
        try:
            self._events.write(line)
            self._events.flush()
            os.fsync(self._events.fileno())
        except OSError:
            try:  # leave no half line behind (e.g. a full disk)
                self._events.truncate(at)
            except OSError:
                pass
            raise

    # ---- handing the folder to another process ----------------------------------------------------
    def release(self) -> dict[str, Any]:
        """Sync and close the files without an end line, so another process goes on with ``reopen``;
        returns what it needs to."""
        self.sync()
        self._events.close()
        self._data.close()
        self.closed = True
        return {"path": self.path, "max_bytes": self.max_bytes, "bytes_written": self.bytes_written}

    @classmethod
    def reopen(cls, path: str, max_bytes: int | None, bytes_written: int) -> TraceWriter:
        """Go on appending steps to a trace that ``release`` handed over (its manifest is written)."""
        w = cls.__new__(cls)
        w.path, w.max_bytes = path, max_bytes
        w._start(bytes_written)
        return w

    # ---- the end --------------------------------------------------------------------------------
    def close(self, reason: str = "finished") -> None:
        """Write the final ``end`` line (unless a size cap already stopped the trace). Safe to call twice."""
        if self.closed:
            return
        self.closed = True
        if self.stopped:
            return
        try:
            self.sync()
            self._write_line((dumps_record({"type": "end", "reason": str(reason), "steps": self.num_steps}) + "\n")
                             .encode())
        except OSError:
            pass
        finally:
            self._events.close()
            self._data.close()

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("finished" if exc_type is None else f"interrupted by {exc_type.__name__}")
