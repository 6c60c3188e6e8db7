"""Read a recorded trace lazily: JSON and safetensors only, no model code, no GPU, never pickle.

Opening scans ``events.jsonl`` once for the byte offset of each step line (without parsing it), so
a trace of any size opens in well under a second; a step's event is parsed when asked for (with a
small LRU cache) and its tensors are read from ``tensors/step_NNNNNN.safetensors`` on demand.

A last line cut short (the recording was killed mid-way) is ignored: every finished step stays
readable. Every way a folder can fail to be a readable trace ends in one ``TraceError`` line that
names the problem and the fix.
"""

from __future__ import annotations

import json
import mmap
import os
import re
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch

#: The ``format`` field of every manifest.json.
FORMAT_NAME = "minillama-trace"
#: The newest format version this reader understands (and the one the writer writes).
FORMAT_VERSION = 1

MANIFEST = "manifest.json"
EVENTS = "events.jsonl"
TENSOR_DIR = "tensors"

# every step line the writer writes starts with exactly these bytes
_STEP_PREFIX = b'{"type": "step"'
_LAYER_RE = re.compile(r"^layers\.(\d+)\.")


class TraceError(ValueError):
    """A trace folder that cannot be written or read; the message says what is wrong and how to fix it."""


def _clip(text: str, n: int = 120) -> str:
    """One line, at most ``n`` characters (for error messages that quote foreign content)."""
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


class TraceReader:
    """A recorded trace folder (see traces/README.md). Step indices ``i`` are 0-based positions in the
    recording; ``event["step"]`` is the engine's step number (equal when recording began with the engine)."""

    def __init__(self, path: str | os.PathLike, cache_size: int = 64) -> None:
        self.path = os.fspath(path)
        self._cache: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self._cache_size = cache_size
        self._check_folder()
        self.manifest: dict[str, Any] = self._read_manifest()
        self._offsets: list[int] = []
        self._tail: list[dict[str, Any]] = []  # parsed non-step records ("stopped", "end", ...)
        self.truncated_bytes = 0  # bytes of a cut-short last line, ignored
        self._requests: dict[int, dict[str, Any]] | None = None
        self._scan_events()

    # ---- opening --------------------------------------------------------------------------------
    def _check_folder(self) -> None:
        if not os.path.exists(self.path):
            raise TraceError(f"trace folder {self.path} does not exist: check the path, or record one with "
                             "`minillama record --out DIR --prompt ...`")
        if not os.path.isdir(self.path):
            raise TraceError(f"{self.path} is a file, not a trace folder: pass the folder that holds manifest.json "
                             "and events.jsonl")

    def _read_manifest(self) -> dict[str, Any]:
        path = os.path.join(self.path, MANIFEST)
        if not os.path.isfile(path):
            what = "is empty" if not os.listdir(self.path) else "has no manifest.json"
            raise TraceError(f"{self.path} is not a minillama trace ({what}): pass a folder written by "
                             "`minillama record`")
        try:
            with open(path, "rb") as f:
                manifest = json.loads(f.read().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TraceError(f"{path} is not valid JSON ({_clip(e)}): this is not a minillama trace, or its "
                             "manifest is damaged; record the trace again") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
            found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
            raise TraceError(f"{path} is not a minillama trace manifest (format {_clip(repr(found), 40)}, expected "
                             f"{FORMAT_NAME!r}): pass a folder written by `minillama record`")
        version = manifest.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise TraceError(f"{path} has no valid format version (got {_clip(repr(version), 40)}): the manifest "
                             "is damaged; record the trace again")
        if version > FORMAT_VERSION:
            raise TraceError(f"{self.path} uses trace format version {version} but this minillama reads up to "
                             f"version {FORMAT_VERSION}: upgrade minillama to read it")
        return manifest

    def _scan_events(self) -> None:
        path = os.path.join(self.path, EVENTS)
        if not os.path.isfile(path):
            raise TraceError(f"{self.path} has a manifest but no {EVENTS}: the recording never started; "
                             "record the trace again")
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                start = 0
                while (nl := mm.find(b"\n", start)) >= 0:
                    self._index_line(mm, start, nl)
                    start = nl + 1
                if mm[start:].strip():  # no final newline: the last line was cut short unless it parses
                    try:
                        json.loads(mm[start:])
                    except (UnicodeDecodeError, json.JSONDecodeError):
                        self.truncated_bytes = size - start
                        return
                    self._index_line(mm, start, size)

    def _index_line(self, data: mmap.mmap, start: int, end: int) -> None:
        """Remember where a step line starts (without reading it); parse the few other records now."""
        if data[start:min(end, start + len(_STEP_PREFIX))] == _STEP_PREFIX:
            self._offsets.append(start)
            return
        line = data[start:end]
        if not line.strip():
            return
        try:
            record = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return  # a damaged non-step line carries nothing a reader needs
        if isinstance(record, dict) and record.get("type") == "step":
            self._offsets.append(start)
        elif isinstance(record, dict):
            self._tail.append(record)

    # ---- events ---------------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        """How many steps the trace holds (complete lines only)."""
        return len(self._offsets)

    def _parse_at(self, path: str, offset: int) -> dict[str, Any]:
        with open(path, "rb") as f:
            f.seek(offset)
            line = f.readline()
        try:
            event = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TraceError(f"{path} is damaged at byte {offset} ({_clip(e)}): record the trace again") from None
        if not isinstance(event, dict):
            raise TraceError(f"{path} has a line at byte {offset} that is not an event object: record the trace again")
        return event

    def step(self, i: int) -> dict[str, Any]:
        """The event dict of recorded step ``i`` (0-based; negative counts from the end)."""
        n = self.num_steps
        if not -n <= i < n:
            raise IndexError(f"step {i} is out of range: this trace has {n} steps (0..{n - 1})")
        i %= n
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        event = self._parse_at(os.path.join(self.path, EVENTS), self._offsets[i])
        self._cache[i] = event
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return event

    def steps(self) -> Iterator[dict[str, Any]]:
        """Every step event, in order (parsed one at a time)."""
        for i in range(self.num_steps):
            yield self.step(i)

    def site_names(self, i: int) -> list[str]:
        """Site names recorded at step ``i``, in the order they fired."""
        return list(self.step(i).get("sites", {}))

    def stats(self, i: int, site: str) -> dict[str, Any] | None:
        """The statistics dict of ``site`` at step ``i`` (shape, dtype, mean, std, absmax, nan, inf, hash, rows)."""
        return self.step(i).get("sites", {}).get(site)

    def shadow(self, i: int) -> dict[str, Any]:
        """Shadow-backend comparison records of step ``i``, keyed by layer index as a string."""
        return self.step(i).get("shadow") or {}

    # ---- tensors --------------------------------------------------------------------------------
    def tensor_file(self, i: int) -> str | None:
        """Absolute path of step ``i``'s safetensors file, or None if that step saved no tensors."""
        rel = self.step(i).get("tensor_file")
        if not rel:
            return None
        if os.path.isabs(rel) or ".." in rel.replace("\\", "/").split("/"):
            raise TraceError(f"step {i} names the tensor file {_clip(rel, 60)} outside the trace folder: "
                             "the trace is damaged or foreign; record it again")
        return os.path.join(self.path, rel)

    def tensor_keys(self, i: int) -> list[str]:
        """Names of the full tensors saved at step ``i`` (sites, ``site@shadow``, ``batch.*``)."""
        path = self.tensor_file(i)
        if path is None:
            return []
        with self._open_tensors(i, path) as f:
            return list(f.keys())

    def tensor(self, i: int, site: str) -> torch.Tensor | None:
        """The full tensor saved for ``site`` at step ``i`` (CPU), or None if only stats were recorded."""
        path = self.tensor_file(i)
        if path is None:
            return None
        with self._open_tensors(i, path) as f:
            if site not in f.keys():
                return None
            try:
                return f.get_tensor(site)
            except Exception as e:  # safetensors raises its own error types
                raise TraceError(f"tensor {site!r} of step {i} in {path} cannot be read ({_clip(e)}): the file is "
                                 "damaged; record the trace again") from None

    def _open_tensors(self, i: int, path: str):
        from safetensors import safe_open

        if not os.path.isfile(path):
            raise TraceError(f"step {i}'s tensor file {path} is missing: the trace is incomplete; copy it again or "
                             "record it again")
        try:
            return safe_open(path, framework="pt", device="cpu")
        except Exception as e:  # SafetensorError, OSError, ...
            raise TraceError(f"step {i}'s tensor file {path} is not a valid safetensors file ({_clip(e, 80)}): "
                             "it is damaged or foreign; record the trace again") from None

    # ---- summaries ------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        """Decoder layers of the recorded model (from the manifest, else from the first step's sites)."""
        cfg = self.manifest.get("model_config") or {}
        if isinstance(cfg.get("num_hidden_layers"), int):
            return cfg["num_hidden_layers"]
        if not self.num_steps:
            return 0
        layers = [int(m.group(1)) for s in self.site_names(0) if (m := _LAYER_RE.match(s))]
        return max(layers) + 1 if layers else 0

    @property
    def end_record(self) -> dict[str, Any] | None:
        """The final ``end`` or ``stopped`` record, or None if the recording did not finish."""
        for rec in reversed(self._tail):
            if rec.get("type") in ("end", "stopped"):
                return rec
        return None

    @property
    def status(self) -> str:
        """``complete``, ``stopped: <reason>`` (size cap) or ``truncated (recording did not finish)``."""
        rec = self.end_record
        if rec is None:
            return "truncated (recording did not finish)"
        if rec["type"] == "stopped":
            return f"stopped: {rec.get('reason', 'no reason given')}"
        return "complete"

    @property
    def size_bytes(self) -> int:
        """Bytes on disk of every file in the trace folder."""
        total = 0
        for root, _dirs, files in os.walk(self.path):
            for name in files:
                try:
                    total += os.path.getsize(os.path.join(root, name))
                except OSError:
                    pass
        return total

    def request_order(self) -> list[int]:
        """Seq ids in prompt order: from the manifest's ``requests``, else by first appearance."""
        reqs = self.manifest.get("requests")
        if isinstance(reqs, list) and reqs and all(isinstance(r, dict) and "seq_id" in r for r in reqs):
            return [int(r["seq_id"]) for r in reqs]
        seen: dict[int, None] = {}
        for ev in self.steps():
            for s in ev.get("batch", {}).get("seqs", []):
                seen.setdefault(int(s["seq_id"]), None)
        return list(seen)

    def requests(self) -> dict[int, dict[str, Any]]:
        """``{seq_id: {"prompt", "prompt_token_ids", "text", "token_ids", "finish_reason"}}`` in prompt order.

        ``prompt`` is the text as given to ``minillama record`` (else the decoded prompt the recorder
        saw); ``text`` and ``token_ids`` are the generated text and ids at the last recorded step.
        """
        if self._requests is not None:
            return {sid: {**r, "token_ids": list(r["token_ids"])} for sid, r in self._requests.items()}
        out: dict[int, dict[str, Any]] = {}

        def req(sid: Any) -> dict[str, Any]:
            return out.setdefault(int(sid), {"prompt": None, "prompt_token_ids": None, "text": "", "token_ids": [],
                                             "finish_reason": None})

        for r in self.manifest.get("requests") or []:
            if isinstance(r, dict) and "seq_id" in r:
                req(r["seq_id"]).update(prompt=r.get("prompt"), prompt_token_ids=r.get("prompt_token_ids"))
        for ev in self.steps():
            for s in ev.get("batch", {}).get("seqs", []):
                req(s["seq_id"])
            for sid, p in (ev.get("prompts") or {}).items():
                r = req(sid)
                if isinstance(p, dict):
                    r["prompt"] = r["prompt"] if r["prompt"] is not None else p.get("text")
                    r["prompt_token_ids"] = r["prompt_token_ids"] or p.get("token_ids")
            ids = ev.get("token_ids") or {}
            for sid, toks in ids.items():
                req(sid)["token_ids"] = [int(t) for t in toks]
            for sid, tok in (ev.get("sampled") or {}).items():
                if sid not in ids:
                    req(sid)["token_ids"].append(int(tok))
            for sid, text in (ev.get("texts") or {}).items():
                req(sid)["text"] = text
            for sid, reason in ev.get("finished") or []:
                req(sid)["finish_reason"] = reason
        self._requests = out
        return self.requests()

    def __len__(self) -> int:
        return self.num_steps

    def __repr__(self) -> str:
        return f"TraceReader({self.path!r}, steps={self.num_steps}, status={self.status!r})"
