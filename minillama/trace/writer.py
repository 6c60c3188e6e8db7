"""Write a trace folder step by step, so that a crash at any moment leaves every finished step readable.

Layout (documented in traces/README.md)::

    DIR/manifest.json                      what was run (written once, atomically)
    DIR/events.jsonl                       one JSON line per scheduler step, then an end or stopped line
    DIR/tensors/step_000003.safetensors    the full tensors of step 3, only when some were recorded

Per step the tensor file is written and synced first, then the event line that points at it is
appended and synced: an event line never names a file that is not complete on disk.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
from typing import Any

import torch

from minillama.trace.reader import EVENTS, FORMAT_NAME, FORMAT_VERSION, MANIFEST, TENSOR_DIR, TraceError

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


def _cpu_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy that shares no memory with the engine's tensors."""
    return t.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)


class TraceWriter:
    """The sink a ``Recorder`` writes to: ``write_step(event, tensors) -> bool`` and ``close(reason)``.

    ``max_bytes`` caps the folder's size: the step that would cross it is not written; a
    ``stopped`` line is written instead and ``write_step`` returns False (recording should stop).
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
        os.makedirs(os.path.join(self.path, TENSOR_DIR), exist_ok=True)
        self.manifest = {
            **manifest,
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        }
        text = json.dumps(self.manifest, default=_json_default, ensure_ascii=False, indent=2)
        data = (_NUMBER_LIST.sub(lambda m: "[" + " ".join(m.group(1).split()) + "]", text) + "\n").encode()
        _write_durable(os.path.join(self.path, MANIFEST), data)
        self.bytes_written = len(data)
        self.num_steps = 0
        self.last_step: int | None = None
        self.stopped = False
        self.closed = False
        self._events = open(os.path.join(self.path, EVENTS), "ab")  # kept open across steps
        _fsync_dir(self.path)

    # ---- per step -------------------------------------------------------------------------------
    def write_step(self, event: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> bool:
        """Append one step (its tensors first, then its event line). False = stop recording.

        Never raises for a full cap or a failing disk: it writes a ``stopped`` line if it can and
        returns False, so recording can never break generation.
        """
        if self.closed or self.stopped:
            return False
        step = event.get("step")
        step = step if isinstance(step, int) and not isinstance(step, bool) else self.num_steps
        try:
            event, blob = self._encode(event, tensors, step)
            line = (dumps_record(event) + "\n").encode()
            if self.max_bytes is not None and (
                    self.bytes_written + len(blob) + len(line) + _FINAL_LINE_RESERVE > self.max_bytes):
                after = f"after step {self.last_step}" if self.last_step is not None else "before the first step"
                self._stop(f"size cap of {self.max_bytes} bytes reached {after}")
                return False
            if blob:
                _write_durable(os.path.join(self.path, event["tensor_file"]), blob)
                self.bytes_written += len(blob)
            self._write_line(line)
        except (OSError, ValueError, TypeError, AttributeError, RuntimeError) as e:
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
            self._stop(f"writing step {step} failed ({type(e).__name__}: {msg})")
            return False
        self.num_steps += 1
        self.last_step = step
        return True

    def _encode(self, event: dict[str, Any], tensors: dict[str, torch.Tensor] | None,
                step: int) -> tuple[dict[str, Any], bytes]:
        """The event as it goes on disk (``type`` first, ``tensor_file``, ``full`` flags) and the tensor blob."""
        from safetensors.torch import save

        event = {**event, "type": "step"}
        event.pop("tensor_file", None)
        if not tensors:
            return event, b""
        cpu = {str(name): _cpu_copy(t) for name, t in tensors.items()}
        rel = f"{TENSOR_DIR}/step_{step:06d}.safetensors"
        if os.path.exists(os.path.join(self.path, rel)):  # a repeated step number: never overwrite
            rel = f"{TENSOR_DIR}/step_{step:06d}_{self.num_steps}.safetensors"
        event["tensor_file"] = rel
        sites = event.get("sites")
        if isinstance(sites, dict):
            event["sites"] = {k: ({**v, "full": True} if k in cpu and isinstance(v, dict) else v)
                              for k, v in sites.items()}
        return event, save(cpu)

    def _stop(self, reason: str) -> None:
        """Write the final ``stopped`` line (best effort) and refuse further steps."""
        self.stopped = True
        try:
            self._append({"type": "stopped", "reason": reason, "steps": self.num_steps})
        except OSError:
            pass
        finally:
            self._events.close()

    def _append(self, record: dict[str, Any]) -> None:
        self._write_line((dumps_record(record) + "\n").encode())

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
        self.bytes_written += len(line)

    # ---- the end --------------------------------------------------------------------------------
    def close(self, reason: str = "finished") -> None:
        """Write the final ``end`` line (unless a size cap already stopped the trace). Safe to call twice."""
        if self.closed:
            return
        self.closed = True
        if self.stopped:
            return
        try:
            self._append({"type": "end", "reason": str(reason), "steps": self.num_steps})
        finally:
            self._events.close()

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("finished" if exc_type is None else f"interrupted by {exc_type.__name__}")
