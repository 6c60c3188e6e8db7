"""Read a recorded trace lazily: JSON and safetensors only, no model code, no GPU, never pickle.

Opening scans ``events.jsonl`` once for the byte offset of each step line (without parsing it), so
a trace of any size opens in well under a second; a step's event is parsed when asked for (with a
small LRU cache) and its tensors are read on demand: in format 2 from the step's safetensors blob
inside ``data.bin`` (through a memory map), in format 1 from ``tensors/step_NNNNNN.safetensors``.

A last line cut short (the recording was killed mid-way) is ignored: every finished step stays
readable. Every way a folder can fail to be a readable trace ends in one ``TraceError`` line that
names the problem and the fix.

``TraceReader`` is put together from parts: opening the folder (``reader_open``), statistics
(``reader_stats.StepStats``) and tensors (``reader_tensors.StepTensors``); this file holds its
state, the step events and the summaries.
"""

from __future__ import annotations

import mmap
import os
import re
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import numpy as np

from minillama.trace import schema
from minillama.trace.batch import SEQ_COLUMNS, T_BLOCKS, T_SEQS, T_TABLES, summary
from minillama.trace.format import EVENTS, TraceError  # noqa: F401  (TraceError re-exported; home: format)
from minillama.trace.reader_open import check_folder, parse_line, read_manifest, scan_events
from minillama.trace.reader_stats import StepStats
from minillama.trace.reader_tensors import StepTensors
from minillama.trace.requests import RequestFold

_LAYER_RE = re.compile(r"^layers\.(\d+)\.")


class TraceReader(StepStats, StepTensors):
    """A recorded trace folder (see traces/README.md). Step indices ``i`` are 0-based positions in the
    recording; ``event["step"]`` is the engine's step number (equal when recording began with the engine)."""

    def __init__(self, path: str | os.PathLike, cache_size: int = 64) -> None:
        self.path = os.fspath(path)
        self._cache: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self._cache_size = cache_size
        check_folder(self.path)
        self.manifest: dict[str, Any] = read_manifest(self.path)
        self._requests: dict[int, dict[str, Any]] | None = None
        self._slot: dict[str, int] | None = None
        self._data: mmap.mmap | None = None
        self._tables_cache: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self.version: int = self.manifest["version"]
        # step lines by byte offset; the other records ("stopped", "end", ...) parsed; bytes of a
        # cut-short last line, ignored
        self._offsets, self._tail, self.truncated_bytes = scan_events(self.path)

    # ---- events ---------------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        """How many steps the trace holds (complete lines only)."""
        return len(self._offsets)

    def step(self, i: int) -> dict[str, Any]:
        """The event dict of recorded step ``i`` (0-based; negative counts from the end)."""
        n = self.num_steps
        if not -n <= i < n:
            raise IndexError(f"step {i} is out of range: this trace has {n} steps (0..{n - 1})")
        i %= n
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        event = parse_line(os.path.join(self.path, EVENTS), self._offsets[i])
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
