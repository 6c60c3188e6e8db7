"""Read a recorded trace lazily: JSON and safetensors only, no model code, no GPU, never pickle.

Opening scans ``events.jsonl`` once for the byte offset of each step line (without parsing it), so
a trace of any size opens in well under a second; a step's event is parsed when asked for (with a
small LRU cache) and its tensors are read on demand: in format 2 from the step's safetensors blob
inside ``data.bin`` (through a memory map), in format 1 from ``tensors/step_NNNNNN.safetensors``.

A last line cut short (the recording was killed mid-way) is ignored: every finished step stays
readable. Every way a folder can fail to be a readable trace ends in one ``TraceError`` line that
names the problem and the fix.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from minillama.trace import schema
from minillama.trace import tables as _tables
from minillama.trace.batch import SEQ_COLUMNS, T_BLOCKS, T_SEQS, T_TABLES, summary
from minillama.trace.format import (
    DATA,
    EVENTS,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    T_BAD,
    T_HASH,
    T_SHADOW,
    T_STATS,
    TraceError,
)
from minillama.trace.requests import RequestFold
from minillama.trace.safetensors_blob import Blob

# every step line the writer writes starts with exactly these bytes
_STEP_PREFIX = b'{"type": "step"'
_LAYER_RE = re.compile(r"^layers\.(\d+)\.")


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
        self._slot: dict[str, int] | None = None
        self._data: mmap.mmap | None = None
        self._tables_cache: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self.version: int = self.manifest["version"]
        self._scan_events()

    # ---- opening --------------------------------------------------------------------------------
    def _check_folder(self) -> None:
        if not os.path.exists(self.path):
            raise TraceError(f"trace folder {self.path} does not exist: check the path, or record one with "
                             "`minillama record --out DIR --prompt ...`")
        if not os.path.isdir(self.path):
            raise TraceError(f"{self.path} is a file, not a trace folder: pass the folder that holds manifest.json "
                             "and events.jsonl")

    def _inside(self, name: str) -> str:
        """The path of ``name`` in the trace, refusing links (or ``..``) that lead outside the folder."""
        path = os.path.join(self.path, name)
        root = os.path.realpath(self.path)
        real = os.path.realpath(path)
        if os.path.commonpath([root, real]) != root:
            raise TraceError(f"{path} leads outside the trace folder (to {_clip(real, 60)}): a trace never links "
                             "out; copy the real file in, or record the trace again")
        return path

    def _read_manifest(self) -> dict[str, Any]:
        path = self._inside(MANIFEST)
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
        schema.check_manifest(manifest, path)
        return manifest

    def _scan_events(self) -> None:
        path = self._inside(EVENTS)
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
        schema.check_step(event, f"step {i} of {self.path}", self.version)
        if self.version >= 2 and "batch" not in event:
            event["batch"] = self._batch(i, event)
        self._cache[i] = event
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return event

    def steps(self) -> Iterator[dict[str, Any]]:
        """Every step event, in order (parsed one at a time)."""
        for i in range(self.num_steps):
            yield self.step(i)

    def _batch(self, i: int, ev: dict[str, Any]) -> dict[str, Any]:
        """Format 2: the step's batch dict, from the tables in its blob."""
        self._cache[i] = ev  # _blob reads the event through step(i)
        blob = self._blob(i)
        get = lambda name, cols: blob.get(name).numpy() if blob is not None and name in blob \
            else np.zeros((0, cols), np.int64)  # noqa: E731
        kv = ev.get("kv") if isinstance(ev.get("kv"), dict) else {}
        seqs, tables, blocks = get(T_SEQS, len(SEQ_COLUMNS)), get(T_TABLES, 0), get(T_BLOCKS, 3)
        schema.check_batch_tables(seqs, tables, blocks, kv, f"step {i} of {self.path}")
        return summary(seqs, tables, blocks, kv,
                       str(ev.get("phase", "?")), list(ev.get("preempted") or []), list(ev.get("waiting") or []))

    # ---- statistics -----------------------------------------------------------------------------
    @property
    def catalog(self) -> list[dict[str, Any]]:
        """Format 2: every tensor site with its trailing ``shape``, ``dtype`` and ``rows`` kind, in firing order."""
        cat = self.manifest.get("sites")
        return cat if isinstance(cat, list) else []

    def _slots(self) -> dict[str, int]:
        if self._slot is None:
            self._slot = {e["name"]: k for k, e in enumerate(self.catalog) if isinstance(e, dict) and "name" in e}
        return self._slot

    def site_names(self, i: int) -> list[str]:
        """Site names recorded at step ``i``, in the order they fired."""
        ev = self.step(i)
        if self.version < 2:
            return list(ev.get("sites", {}))
        missing = set(ev.get("missing_sites") or [])
        return [e["name"] for e in self.catalog if e["name"] not in missing
                and not (e.get("rows") == "samples" and not ev.get("sampled"))]

    def tables(self, i: int) -> dict[str, np.ndarray] | None:
        """Format 2: step ``i``'s statistics tables as numpy arrays (``stats``, ``bad``, ``hash``, ``shadow``)."""
        if self.version < 2:
            return None
        i %= max(self.num_steps, 1)
        if i in self._tables_cache:
            self._tables_cache.move_to_end(i)
            return self._tables_cache[i]
        blob = self._blob(i)
        if blob is None or T_STATS not in blob:
            return None
        get = lambda name: blob.get(name).numpy() if name in blob else None  # noqa: E731
        out = {"stats": get(T_STATS), "bad": get(T_BAD), "hash": get(T_HASH), "shadow": get(T_SHADOW)}
        if out["bad"] is None:
            out["bad"] = np.zeros((0, 4), np.int32)
        seqs = self.step(i)["batch"]["seqs"]
        rows = max(sum(s["num_new"] for s in seqs), sum(1 for s in seqs if s["samples"]))
        schema.check_stat_tables(out, len(self.catalog), len(seqs), rows, f"step {i} of {self.path}")
        self._tables_cache[i] = out
        if len(self._tables_cache) > 16:
            self._tables_cache.popitem(last=False)
        return out

    def _req_index(self, i: int, seq_id: int | None) -> int | None:
        if seq_id is None:
            return None
        for k, s in enumerate(self.step(i).get("batch", {}).get("seqs", [])):
            if int(s.get("seq_id", -1)) == int(seq_id):
                return k
        raise KeyError(f"request {seq_id} is not in step {i}'s batch")

    def stats(self, i: int, site: str, seq_id: int | None = None) -> dict[str, Any] | None:
        """Statistics of ``site`` at step ``i``: of request ``seq_id``, or of the whole batch.

        Keys: shape, dtype, mean, std, min, max, absmax, nan, inf, hash (16 hex digits; equal means
        bit-identical), rows ``[[start, end], ...]``, full. None if the site did not fire. Format 1
        traces have whole-batch statistics only (``seq_id`` gives None there).
        """
        ev = self.step(i)
        if self.version < 2:
            rec = ev.get("sites", {}).get(site)
            return rec if seq_id is None else None
        slot = self._slots().get(site)
        if slot is None or site in (ev.get("missing_sites") or ()) or (
                self.catalog[slot].get("rows") == "samples" and not ev.get("sampled")):
            return None
        tabs = self.tables(i)
        if tabs is None:
            return None
        out = _tables.site_stats(tabs, self.catalog[slot], slot, ev["batch"], self._req_index(i, seq_id))
        out["full"] = site in self.tensor_keys(i)
        return out

    def shadow(self, i: int, seq_id: int | None = None) -> dict[str, Any]:
        """Shadow-attention comparison of step ``i`` per layer (key: the layer index as a string).

        Each record: ``backend``, ``max_abs``/``rms`` (active vs shadow), ``err_active``/``err_shadow``
        (max-abs vs the reference) and their ``_rms``, ``budget``/``budget_rms`` (plain attention's),
        ``budget_ratio*`` (each error over its budget). Format 1 traces keep what they recorded.
        """
        ev = self.step(i)
        if self.version < 2:
            return ev.get("shadow") or {}
        tabs = self.tables(i)
        if tabs is None or tabs.get("shadow") is None:
            return {}
        name = self.manifest.get("shadow")
        slot = self._slots().get("layers.0.attn.out")
        per_row = math.prod(self.catalog[slot]["shape"]) if slot is not None else 1
        req = self._req_index(i, seq_id)
        dtype = str(self.manifest.get("dtype", "float32"))
        out = {}
        for layer in range(tabs["shadow"].shape[1]):
            rec = _tables.layer_metrics(tabs["shadow"], ev["batch"], layer, per_row, dtype,
                                        name not in (None, "reference"), req)
            if rec:
                out[str(layer)] = {"backend": name, **rec}
        return out

    # ---- tensors --------------------------------------------------------------------------------
    def _blob(self, i: int) -> Blob | None:
        span = self.step(i).get("data")
        if span is None:
            return None
        if not (isinstance(span, list) and len(span) == 2):
            raise TraceError(f"step {i} names its data as {_clip(repr(span), 40)}: the trace is damaged; record "
                             "it again")
        if self._data is None:
            path = self._inside(DATA)
            if not os.path.isfile(path) or os.path.getsize(path) == 0:
                raise TraceError(f"{self.path} has no {DATA} but its steps name data in it: the trace is incomplete; "
                                 "copy it again or record it again")
            with open(path, "rb") as f:
                self._data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return Blob(self._data, span[0], span[1], f"step {i} of {self.path}")

    def tensor_file(self, i: int) -> str | None:
        """Format 1: absolute path of step ``i``'s safetensors file, or None if that step saved no tensors."""
        rel = self.step(i).get("tensor_file")
        if not rel:
            return None
        if os.path.isabs(rel) or ".." in rel.replace("\\", "/").split("/"):
            raise TraceError(f"step {i} names the tensor file {_clip(rel, 60)} outside the trace folder: "
                             "the trace is damaged or foreign; record it again")
        return self._inside(rel)

    def tensor_keys(self, i: int) -> list[str]:
        """Names of the tensors saved at step ``i`` (sites, ``site@shadow``, ``batch.*``, tables)."""
        if self.version >= 2:
            blob = self._blob(i)
            return blob.keys() if blob is not None else []
        path = self.tensor_file(i)
        if path is None:
            return []
        with self._open_tensors(i, path) as f:
            return list(f.keys())

    def tensor(self, i: int, site: str) -> torch.Tensor | None:
        """The full tensor saved for ``site`` at step ``i`` (CPU), or None if only stats were recorded."""
        if self.version >= 2:
            blob = self._blob(i)
            return blob.get(site) if blob is not None else None
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
        """``{seq_id: {"prompt", "prompt_token_ids", "text", "token_ids", "finish_reason", ...}}`` in prompt order.

        ``prompt`` is the text as given to ``minillama record`` (else the decoded prompt the recorder
        saw); ``text`` and ``token_ids`` are the generated text and ids at the last recorded step.
        """
        if self._requests is None:
            fold = RequestFold(self.manifest.get("requests"))
            for i, ev in enumerate(self.steps()):
                fold.add(ev, i)
            self._requests = fold.snapshot()
        return {sid: {**r, "token_ids": list(r["token_ids"])} for sid, r in self._requests.items()}

    def __len__(self) -> int:
        return self.num_steps

    def __repr__(self) -> str:
        return f"TraceReader({self.path!r}, steps={self.num_steps}, status={self.status!r})"
