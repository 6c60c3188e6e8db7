"""The two timeline sources the views read: a live ``DebugSession`` or a recorded trace.

Both extend the engine's ``LiveTimeline`` / ``TraceTimeline`` with the few answers the views need
beyond it (the shadow outputs of a live step, the keys an attention row saw), so a view never asks
which mode it is in. Nothing here steers the engine: the app does that through the session.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from minillama.debug.timeline import LiveTimeline, TraceTimeline

#: Full tensors every live session keeps, so a recording made from the TUI can draw attention weights in replay.
DEFAULT_FULL_SITES = ("layers.*.attn.q", "layers.*.attn.k")
DEFAULT_PROMPTS = (
    "What is the capital of France?",
    "What is the capital of Italy?",
    "Write a haiku about a paged KV cache.",
)


@dataclass
class KeysResult:
    """Keys one request's queries attended to: ``k`` (positions, kv_heads, head_dim) or None, and where they came from."""

    k: torch.Tensor | None
    note: str


@dataclass
class LiveOptions:
    """What ``minillama-tui`` without a trace path starts."""

    model: str | None = None
    backend: str = "torch"
    device: str = "auto"
    shadow: str | None = None
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    max_tokens: int = 32
    temperature: float = 0.0
    max_num_batched_tokens: int = 64
    num_kvcache_blocks: int = 64
    max_model_len: int = 1024
    full_sites: tuple[str, ...] = DEFAULT_FULL_SITES


def request_keys_slots(seq: dict[str, Any], block_size: int, upto: int) -> list[int]:
    """Cache slots holding positions ``0..upto-1`` of a request, through its block table."""
    bt = seq["block_table"]
    return [bt[p // block_size] * block_size + p % block_size for p in range(upto)]


class LiveSource(LiveTimeline):
    """A running session. Also remembers each paused step's recorder tensors (shadow outputs)."""

    keep_steps = 32

    def __init__(self, session) -> None:
        super().__init__(session)
        self._stash: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, step: int) -> None:
        """Keep the recorder's tensor dict of ``step`` (called from the worker when it pauses).

        The recorder replaces that dict at each step boundary instead of clearing it, so holding a
        reference keeps the step's ``@shadow`` / ``@ref`` attention outputs after the step ends.
        """
        tensors = getattr(self.session.recorder, "_tensors", None)
        if tensors is None or self.session.current_event is None:
            return
        with self._lock:
            self._stash[step] = tensors
            while len(self._stash) > self.keep_steps:
                self._stash.popitem(last=False)

    def engine_step(self, step: int) -> int:
        """The engine's step number of timeline index ``step`` (they differ when the engine ran before)."""
        ev = self.event(step)
        return int(ev["step"]) if ev is not None and "step" in ev else step

    def tensor(self, step: int, site: str) -> torch.Tensor | None:
        t = self.session.tensor(self.engine_step(step), site)
        if t is None:
            with self._lock:
                t = self._stash.get(step, {}).get(site)
        return t

    def keys(self, step: int, layer: int, seq: dict[str, Any], upto: int) -> KeysResult:
        """Keys of ``seq`` at ``layer`` read from the engine's cache as it is now."""
        cache = self.session.llm.runner.kv_cache
        if cache.numel() == 0:
            return KeysResult(None, "the engine has no KV cache")
        bs = cache.shape[3]
        slots = torch.tensor(request_keys_slots(seq, bs, upto), dtype=torch.long)
        k = cache[0, layer].reshape(-1, *cache.shape[4:])[slots].float()
        head = self.session.position
        exact = head is not None and head.step == self.engine_step(step) and self.session.paused
        note = "current cache" + ("" if exact else f" (it may have moved on since step {step})")
        return KeysResult(k, note)


class TraceSource(TraceTimeline):
    """A recorded trace; keys are rebuilt from recorded ``layers.N.attn.k`` and each step's slot mapping."""

    lookback = 512

    def __init__(self, reader) -> None:
        super().__init__(reader)
        self._keys: OrderedDict[tuple[int, int, int, int], KeysResult] = OrderedDict()
        self._reader_lock = threading.RLock()  # the reader's step cache is not thread-safe

    def event(self, step: int) -> dict[str, Any] | None:
        with self._reader_lock:
            return super().event(step)

    def tensor(self, step: int, site: str) -> torch.Tensor | None:
        with self._reader_lock:
            return super().tensor(step, site)

    def title(self) -> str:
        m = self.reader.manifest
        shadow = m.get("shadow")
        name = os.path.basename(os.path.normpath(self.reader.path))
        return (f"replay: {name} ({m.get('backend', '?')}{', shadow ' + str(shadow) if shadow else ''}) "
                f"· {self.reader.num_steps} steps · {self.reader.status}")

    def keys(self, step: int, layer: int, seq: dict[str, Any], upto: int) -> KeysResult:
        key = (step, layer, int(seq["seq_id"]), upto)
        if key in self._keys:
            return self._keys[key]
        res = self._rebuild_keys(step, layer, seq, upto)
        self._keys[key] = res
        if len(self._keys) > 64:
            self._keys.popitem(last=False)
        return res

    def _rebuild_keys(self, step: int, layer: int, seq: dict[str, Any], upto: int) -> KeysResult:
        ev = self.event(step) or {}
        bs = int(ev.get("batch", {}).get("block_size") or 16)
        want = request_keys_slots(seq, bs, upto)
        missing = {s: i for i, s in enumerate(want)}
        rows: list[torch.Tensor | None] = [None] * len(want)
        site = f"layers.{layer}.attn.k"
        for t in range(step, max(-1, step - self.lookback), -1):
            if not missing:
                break
            slots = (self.event(t) or {}).get("batch", {}).get("slot_mapping") or []
            hits = [(i, s) for i, s in enumerate(slots) if s in missing]
            if not hits:
                continue
            k = self.tensor(t, site)
            if k is None:
                return KeysResult(None, f"{site} was not recorded at step {t}: record with "
                                        "--full 'layers.*.attn.k' to see attention weights")
            for row, s in hits:
                rows[missing.pop(s)] = k[row]
        if missing:
            return KeysResult(None, f"{len(missing)} of the {len(want)} keys were written before the recording "
                                    "began (or too long ago): no weights for this row")
        return KeysResult(torch.stack(rows).float(), f"rebuilt from recorded {site} through the block table")


class RequestBook:
    """Every request's prompt, generated text, token count and finish reason after each step.

    Folds ``timeline.event(i)`` once per finished step and keeps the snapshots, so moving the
    cursor costs nothing however long the history is.
    """

    def __init__(self, timeline) -> None:
        self.timeline = timeline
        self._snaps: list[dict[int, dict[str, Any]]] = []

    def warmed(self) -> bool:
        """True once every finished step is folded."""
        return len(self._snaps) >= self.timeline.num_steps()

    def warm(self, budget_s: float) -> None:
        """Fold the next steps for at most about ``budget_s`` seconds."""
        end = time.perf_counter() + budget_s
        while not self.warmed() and time.perf_counter() < end:
            n = len(self._snaps)
            self.after(n)
            if len(self._snaps) == n:  # the step in progress: nothing more to fold
                return

    def after(self, step: int) -> dict[int, dict[str, Any]]:
        """Requests as they stood at the end of ``step`` (``step < 0``: nothing yet)."""
        if step < 0:
            return {}
        while len(self._snaps) <= step:
            i = len(self._snaps)
            ev = self.timeline.event(i)
            if ev is None or "finished" not in ev:  # the step in progress: not folded (it is still changing)
                return self._fold(dict(self._snaps[-1]) if self._snaps else {}, ev)
            self._snaps.append(self._fold(dict(self._snaps[-1]) if self._snaps else {}, ev))
        return self._snaps[step]

    @staticmethod
    def _fold(state: dict[int, dict[str, Any]], ev: dict[str, Any] | None) -> dict[int, dict[str, Any]]:
        if not ev:
            return state

        def get(sid: int) -> dict[str, Any]:
            if sid not in state:
                state[sid] = {"prompt": "", "text": "", "tokens": 0, "finish": None}
            else:
                state[sid] = dict(state[sid])
            return state[sid]

        for sid, p in (ev.get("prompts") or {}).items():
            get(int(sid))["prompt"] = p.get("text", "")
        for s in (ev.get("batch") or {}).get("seqs", []):
            get(int(s["seq_id"]))
        for sid, text in (ev.get("texts") or {}).items():
            r = get(int(sid))
            r["text"] = text
            r["tokens"] = len((ev.get("token_ids") or {}).get(sid, [])) or r["tokens"]
        for sid, reason in ev.get("finished") or []:
            get(int(sid))["finish"] = reason
        return state


def open_trace(path: str) -> TraceSource:
    """Open a trace folder (raises ``TraceError`` with a one-line reason when it is not one)."""
    from minillama.trace.reader import TraceReader

    return TraceSource(TraceReader(path))


def start_live(opts: LiveOptions, llm=None):
    """Load the model (unless ``llm`` is given), make a paused ``DebugSession`` and queue the prompts.

    Blocking (seconds): call it from a worker thread. The caller sets the callbacks and starts it.
    """
    from minillama import LLM, SamplingParams
    from minillama.debug.session import DebugSession

    if llm is None:
        llm = LLM(opts.model, backend=opts.backend, device=opts.device, max_model_len=opts.max_model_len,
                  max_num_batched_tokens=opts.max_num_batched_tokens,
                  num_kvcache_blocks=opts.num_kvcache_blocks)
    session = DebugSession(llm, shadow=opts.shadow, full_sites=opts.full_sites, pause_at_start=True)
    params = SamplingParams(temperature=opts.temperature, max_tokens=opts.max_tokens)
    for p in opts.prompts:
        session.submit(p, params)
    return session
