"""Open a trace folder for ``TraceReader``: check the folder and its manifest, index ``events.jsonl``.

Indexing remembers the byte offset of each step line without parsing it, so a trace of any size
opens in well under a second; a step line is parsed only when the reader asks for it
(``parse_line``). A last line cut short (the recording was killed mid-way) is ignored. Every way
a folder can fail to be a readable trace ends in one ``TraceError`` line that names the fix.
"""

from __future__ import annotations

import json
import mmap
import os
import re
from typing import Any

from minillama.trace import schema
from minillama.trace.format import EVENTS, FORMAT_NAME, FORMAT_VERSION, MANIFEST, TraceError

# every step line the writer writes starts with exactly these bytes
_STEP_PREFIX = b'{"type": "step"'


def clip(text: str, n: int = 120) -> str:
    """One line, at most ``n`` characters (for error messages that quote foreign content)."""
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


def check_folder(root: str) -> None:
    """Refuse a path that does not exist or is a file, not a folder."""
    if not os.path.exists(root):
        raise TraceError(f"trace folder {root} does not exist: check the path, or record one with "
                         "`minillama record --out DIR --prompt ...`")
    if not os.path.isdir(root):
        raise TraceError(f"{root} is a file, not a trace folder: pass the folder that holds manifest.json "
                         "and events.jsonl")


def inside(root: str, name: str) -> str:
    """The path of ``name`` in the trace ``root``, refusing links (or ``..``) that lead outside the folder."""
    path = os.path.join(root, name)
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root:
        raise TraceError(f"{path} leads outside the trace folder (to {clip(real, 60)}): a trace never links "
                         "out; copy the real file in, or record the trace again")
    return path


def read_manifest(root: str) -> dict[str, Any]:
    """The trace's manifest, checked: a minillama trace, of a version this package reads, well formed."""
    path = inside(root, MANIFEST)
    if not os.path.isfile(path):
        what = "is empty" if not os.listdir(root) else "has no manifest.json"
        raise TraceError(f"{root} is not a minillama trace ({what}): pass a folder written by "
                         "`minillama record`")
    try:
        with open(path, "rb") as f:
            manifest = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TraceError(f"{path} is not valid JSON ({clip(e)}): this is not a minillama trace, or its "
                         "manifest is damaged; record the trace again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise TraceError(f"{path} is not a minillama trace manifest (format {clip(repr(found), 40)}, expected "
                         f"{FORMAT_NAME!r}): pass a folder written by `minillama record`")
    version = manifest.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise TraceError(f"{path} has no valid format version (got {clip(repr(version), 40)}): the manifest "
                         "is damaged; record the trace again")
    if version > FORMAT_VERSION:
        raise TraceError(f"{root} uses trace format version {version} but this minillama reads up to "
                         f"version {FORMAT_VERSION}: upgrade minillama to read it")
    schema.check_manifest(manifest, path)
    return manifest


def scan_events(root: str) -> tuple[list[int], list[dict[str, Any]], int]:
    """Index ``events.jsonl``: the byte offsets of the step lines, the other records (parsed), and the
    bytes of a cut-short last line (0 if none)."""
    offsets: list[int] = []
    tail: list[dict[str, Any]] = []  # "stopped", "end", ...
    path = inside(root, EVENTS)
    if not os.path.isfile(path):
        raise TraceError(f"{root} has a manifest but no {EVENTS}: the recording never started; "
                         "record the trace again")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return offsets, tail, 0
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            start = 0
            while (nl := mm.find(b"\n", start)) >= 0:
                _index_line(mm, start, nl, offsets, tail)
                start = nl + 1
            if mm[start:].strip():  # no final newline: the last line was cut short unless it parses
                try:
                    json.loads(mm[start:])
                except (UnicodeDecodeError, json.JSONDecodeError):
                    return offsets, tail, size - start
                _index_line(mm, start, size, offsets, tail)
    return offsets, tail, 0


def _index_line(data: mmap.mmap, start: int, end: int, offsets: list[int], tail: list[dict[str, Any]]) -> None:
    """Remember where a step line starts (without reading it); parse the few other records now."""
    if data[start:min(end, start + len(_STEP_PREFIX))] == _STEP_PREFIX:
        offsets.append(start)
        return
    line = data[start:end]
    if not line.strip():
        return
    try:
        record = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return  # a damaged non-step line carries nothing a reader needs
    if isinstance(record, dict) and record.get("type") == "step":
        offsets.append(start)
    elif isinstance(record, dict):
        tail.append(record)


# Where the writer puts a step line's step number and blob span (``dumps_record``: "type" first, then
# the event's keys in order, "data" added last), so a reader after just those two skips the JSON parse.
_HEAD = re.compile(rb'\{"type": "step", "step": (-?\d+)[,}]')
_SPAN = re.compile(rb'"data": \[(\d+), (\d+)\]\}\s*$')


def step_heads(path: str, offsets: list[int]) -> list[dict[str, Any]]:
    """``{"step", "data"}`` of each step line of ``path`` starting at ``offsets``: read where the writer
    puts them, else (another layout) from the whole parsed event."""
    out: list[dict[str, Any]] = []
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        for off in offsets:
            end = mm.find(b"\n", off)
            end = len(mm) if end < 0 else end
            head, span = _HEAD.match(mm, off, min(end, off + 64)), _SPAN.search(mm, max(off, end - 64), end)
            if head and span:
                out.append({"step": int(head[1]), "data": [int(span[1]), int(span[2])]})
            else:
                out.append(parse_line(path, off))
    return out


def parse_line(path: str, offset: int) -> dict[str, Any]:
    """The event object on the line of ``path`` that starts at byte ``offset``."""
    with open(path, "rb") as f:
        f.seek(offset)
        line = f.readline()
    try:
        event = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TraceError(f"{path} is damaged at byte {offset} ({clip(e)}): record the trace again") from None
    if not isinstance(event, dict):
        raise TraceError(f"{path} has a line at byte {offset} that is not an event object: record the trace again")
    return event
