"""A hooks listener that records every scheduler step at engine speed.

At each tensor site it computes the site's statistics into the step's device tables (``site_stats``,
``devstats``, ``stepbuf``), at each attention call the shadow (``shadow``), and copies sites matching
``full_sites`` (fnmatch patterns over site names, ``layers.3.attn.out@shadow`` included). It never
reads a value back: when the step is launched one snapshot of its tables (and its full tensors)
goes to pinned host memory without blocking; when its tokens are known a ``StepRecord`` is kept in
``history`` and handed to ``sink`` (``writer_process.trace_sink``: a thread, or on CUDA a process of
its own), which waits for the copies, decodes the tables and writes (the tokens' text: ``finishing``).
Inside a captured CUDA graph the same work is captured, so decode steps replay graphs while recording
(``hook_mode = "device"``: overlapped steps too).
"""

from __future__ import annotations

import fnmatch
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from minillama import hooks
from minillama.context import get_context
from minillama.debug import devstats
from minillama.debug.finishing import StepFinisher, trace_step
from minillama.debug.records import (
    StepRecord,
    capture_batch,
    site_catalog,
    site_columns,
    step_counts,
)
from minillama.debug.shadow import Shadow
from minillama.debug.site_stats import SiteStats
from minillama.debug.stepbuf import RING, StatsBuffer
from minillama.trace.batch import FLAG_SAMPLES
from minillama.trace.format import SHADOW_FIELDS

#: A recording that starts mid-run saves the cached keys of the running requests up to this size.
CATCH_UP_BYTES = 256 << 20


@dataclass
class _Open:
    """A step between ``step.begin`` and ``step.end`` (two may be open when steps overlap)."""

    step: int
    raw: dict[str, Any]
    reqs: int
    rows: int
    samples: int
    prompts: dict[str, dict[str, Any]]
    t0: float
    ok: bool
    fired: set[int] = field(default_factory=set)
    full: dict[str, torch.Tensor] = field(default_factory=dict)
    snapshot: Any = None
    graphed: bool = False
    tail: list[tuple[torch.Tensor, int]] = field(default_factory=list)  # sampling sites the finish adds
    tail_pos: torch.Tensor | None = None


class Recorder:
    """Records steps of ``llm`` (see the module docstring). ``shadow``: a backend name, "reference"
    (the yardstick alone) or None. ``history``: how many finished steps to keep in memory."""

    hook_mode = "device"

    def __init__(self, llm, *, shadow: str | None = None, full_sites: Iterable[str] = (), sink=None,
                 history: int = 0) -> None:
        self.llm = llm
        cfg = llm.model_config
        self.catalog = site_catalog(cfg, llm.dtype)
        self.slot = {s.name: i for i, s in enumerate(self.catalog)}
        self.full_sites = list(full_sites)
        self.shadow = None
        if shadow is not None:
            self.shadow = Shadow(None if shadow == "reference" else shadow, llm.device, llm.dtype, cfg.head_dim,
                                 active=llm.backend.name)
        if llm.device.type == "cuda" and devstats.triton is None:
            raise ValueError("recording on CUDA needs Triton (pip install triton): the statistics run as a kernel")
        self._check_patterns()
        layers = cfg.num_hidden_layers if self.shadow else 0
        reqs = llm.config.max_num_seqs
        self.buffer = StatsBuffer(len(self.catalog), reqs, max(llm.config.max_num_batched_tokens, reqs),
                                  (layers, len(SHADOW_FIELDS) if self.shadow else 0), llm.device,
                                  *site_columns(self.catalog))
        self.sink = sink
        self.history: deque[StepRecord] = deque(maxlen=max(history, 1))
        self.keep_history = history > 0
        self.on_record: Callable[[StepRecord], None] | None = None
        self.stopped_reason: str | None = None
        self._open: dict[int, _Open] = {}
        self._cur: _Open | None = None
        self._captured: set[int] = set()
        self._static: dict[str, torch.Tensor] = {}
        self._full: dict[str, bool] = {}
        self._seen: set[int] = set()
        self._catch_up = False
        # Without a trace writer nobody finishes old steps: keep what the history and ring can hold.
        self._keep = max(history, 1) + RING
        self.finisher = StepFinisher(llm.tokenizer)
        self._writer_done(sink is None)
        self._attached = False
        last = next(i for i in reversed(range(len(self.catalog))) if self.catalog[i].rows == "tokens")
        self.stats = SiteStats(self.buffer, last)
        graphs = getattr(llm.runner, "graphs", None)
        if graphs is not None:  # before any capture, whoever triggers it (attach, a session, a replay)
            self.stats.reserve(len(graphs.sizes), len(self.catalog))
        self.num_records = 0
        # the sites a step must reach, without and with sampling requests
        self._expected = {samples: {i for i, spec in enumerate(self.catalog) if spec.rows == "tokens" or samples}
                          for samples in (False, True)}
        self.last_attention: dict[str, torch.Tensor] = {}  # the latest call's shadow/ref/plain outputs

    # ---- attach -------------------------------------------------------------------------------
    def attach(self) -> Recorder:
        """Listen from the next step on; on CUDA, capture the decode graphs with this work inside."""
        if self._attached:
            return self
        graphs = getattr(self.llm.runner, "graphs", None)
        if graphs is not None:
            for spec in self.catalog:  # graph-side copies of full sites need buffers made before capture
                if spec.rows == "tokens" and self.is_full(spec.name):
                    self._static[spec.name] = torch.empty((graphs.sizes[-1], *spec.shape),
                                                          dtype=getattr(torch, spec.dtype), device=self.llm.device)
        hooks.attach(self)
        self._attached = True
        if graphs is not None:
            try:
                graphs.capture()  # fills the address tables through graphs_captured()
            except BaseException:
                self.detach("failed to attach")
                raise
        return self

    def detach(self, reason: str = "finished") -> None:
        if self._attached:
            hooks.detach(self)
            self._attached = False
        self.stats.begin_pass()  # a step abandoned mid-pass leaves no held tensors behind
        if self.sink is not None:
            self.sink.close(self.stopped_reason or reason)
            self.sink = None

    def set_sink(self, sink) -> None:
        """Send the following steps to ``sink``; its first step also lists the requests already running."""
        self.sink = sink
        if sink is not None:  # a writer thread finishes every step here, in order; a writer process, its own copies
            self._writer_done(bool(getattr(sink, "takes_records", False)))
        self._catch_up = sink is not None

    def sink_closed(self) -> None:
        """The last sink wrote everything it was given: old steps may be passed unfinished, and their
        tables dropped, again."""
        if self.sink is None:
            self._writer_done(True)

    def _writer_done(self, done: bool) -> None:
        """``done``: no writer may still read a step (none was given, or the last one wrote all it had). Then
        old steps are passed unfinished, and a step leaving the history, unreachable, frees its ring slot."""
        self._unwritten = done
        self.finisher.keep = self._keep if done else None

    def __enter__(self) -> Recorder:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        err = exc[1]
        self.detach(f"error: {(str(err).splitlines() or [type(err).__name__])[0]}" if err else "finished")

    def _check_patterns(self) -> None:
        names = [s.name for s in self.catalog]
        if self.shadow is not None:
            outs = ("ref", "plain") + (("shadow",) if self.shadow.backend is not None else ())
            names += [f"layers.{i}.attn.out@{o}" for i in range(self.llm.model_config.num_hidden_layers) for o in outs]
        for p in self.full_sites:
            if not any(fnmatch.fnmatchcase(n, p) for n in names):
                raise ValueError(f"--full pattern {p!r} matches no site: sites are named like 'layers.3.attn.q', "
                                 "'layers.*.mlp.out', 'logits', 'layers.*.attn.out@shadow' (with --shadow)")

    def is_full(self, name: str) -> bool:
        if name not in self._full:  # the sampled token ids are always kept
            self._full[name] = name == "sampled" or any(fnmatch.fnmatchcase(name, p) for p in self.full_sites)
        return self._full[name]

    # ---- the listener -------------------------------------------------------------------------
    def __call__(self, site: str, tensor: torch.Tensor | None, info: dict[str, Any]) -> None:
        if site == hooks.STEP_BEGIN:
            self._begin(info)
        elif site == hooks.STEP_LAUNCHED:
            self._launched(info)
        elif site == hooks.STEP_END:
            self._end(info)
        elif not hooks.capturing and (self._cur is None or not self._cur.ok):
            return  # a forward pass outside a scheduler step (e.g. prompt_logits)
        elif site.endswith(hooks.ATTN_CALL):
            self._attention(tensor, info["call"])
        elif tensor is not None:
            self._site(site, tensor)

    def _begin(self, info: dict[str, Any]) -> None:
        self.stats.begin_pass()
        batch, engine = info["batch"], info["engine"]
        reqs, rows = len(batch.seqs), batch.num_tokens
        ok = 0 < reqs <= self.buffer.max_reqs and rows <= self.buffer.max_rows
        if ok:
            self.buffer.reset(reqs)
        listed = list(batch.seqs)
        catch_up = {}
        if self._catch_up:  # a recording that starts mid-run: say what the running requests are first
            listed += [s for s in (*engine.scheduler.running, *engine.scheduler.waiting) if s not in listed]
            catch_up = self._cached_keys(listed)
        prompts = {}
        for s in listed:
            if s.seq_id not in self._seen or self._catch_up:
                self._seen.add(s.seq_id)
                prompts[str(s.seq_id)] = {"token_ids": s.token_ids[: s.num_prompt_tokens],
                                          "generated": s.completion_token_ids}
        self._catch_up = False
        raw = capture_batch(batch, engine)
        samples = int(np.count_nonzero((raw["seqs"][:, 7] & FLAG_SAMPLES) != 0))
        self._cur = self._open[info["step"]] = _Open(info["step"], raw, reqs, rows, samples, prompts,
                                                      time.perf_counter(), ok, full=catch_up)

    def _cached_keys(self, seqs) -> dict[str, torch.Tensor]:
        """The keys already in the cache for ``seqs``' blocks (every layer), so views can rebuild attention
        weights of a recording that starts mid-run; skipped above ``CATCH_UP_BYTES``.

        Only blocks that hold computed tokens (prefix hits included): a new request's other blocks are
        still empty, and the first step of a recording that starts with the run saves nothing."""
        blocks = sorted({b for s in seqs for b in s.block_table[: -(-s.num_computed_tokens // s.block_size)]})
        cache = self.llm.runner.kv_cache
        if not blocks or cache.numel() == 0:
            return {}
        per_block = cache[0, :, 0].numel() * cache.element_size()
        if per_block * len(blocks) > CATCH_UP_BYTES:
            return {}
        idx = torch.tensor(blocks, dtype=torch.long, device=cache.device)
        return {"catchup.blocks": torch.tensor(blocks, dtype=torch.int64), "catchup.k": cache[0][:, idx].clone()}

    def _site(self, site: str, tensor: torch.Tensor) -> None:
        slot = self.slot.get(site)
        if slot is None:
            return
        ctx = get_context()
        rows = self.catalog[slot].rows
        if rows == "samples":
            seq, pos = ctx.sample_index, ctx.sample_positions
        else:
            seq, pos = ctx.seq_index, ctx.positions
        x = tensor.detach()
        if x.dtype == torch.int64:  # hashed as int32: on the GPU the low words in place (no cast kernel)
            x = _low_words(x) if x.is_cuda and x.dim() == 1 else x.to(torch.int32)
        st = self._cur
        if (rows == "samples" and x.is_cuda and not hooks.capturing and not hooks.eager and st.ok
                and st.raw["phase"] == "decode" and len(st.tail) < 2 and devstats.triton_covers(x)):
            # a decode step at speed: the finish kernel adds this site (held, so its memory stays), one launch less
            st.tail.append((devstats.rows_view(x), slot))
            st.tail_pos = pos
        else:
            self.stats.add(x, slot, rows == "tokens", seq, pos)
        if hooks.capturing:
            self._captured.add(slot)
            if site in self._static:
                self._static[site][: x.shape[0]].copy_(tensor)
            return
        self._cur.fired.add(slot)
        if site == "sampled":  # kept always, made at the step's end from the tokens the engine copies anyway
            return
        if self.is_full(site):  # on the GPU straight to the host: the copy is ordered before any later change
            self._cur.full[site] = _to_host(tensor.detach()) if tensor.is_cuda else tensor.detach().clone()

    def graphs_captured(self) -> None:
        """Fill the address tables of the graphs just captured (``hooks.graphs_captured``), whoever
        captured them (an attach, a session), and make the pinned ring."""
        self.stats.graphs_captured()
        self.buffer.prepare_ring()
        self.buffer.touched()  # the captures' warm-up passes ran the sites into the sums

    def _attention(self, out: torch.Tensor, call) -> None:
        if self.shadow is None:
            return
        outs = self.shadow.run(call, out, self.buffer.shadow[:, call.layer])
        if hooks.capturing:
            return
        self.last_attention = outs
        base = hooks.layer_site(call.layer, "attn.out")
        for name, t in outs.items():
            if self.is_full(f"{base}@{name}"):
                self._cur.full[f"{base}@{name}"] = t.detach().clone()

    def _launched(self, info: dict[str, Any]) -> None:
        st = self._open.get(info["step"])
        if st is None:
            return
        self._cur = None
        if not st.ok:
            return
        self.stats.flush()  # eager sites still held (a pass that ended without its last token site)
        st.graphed = bool(info.get("graphed"))
        if st.graphed:
            st.fired |= self._captured
            for name, buf in self._static.items():
                st.full[name] = buf[: st.rows]
        st.full = {k: _to_host(t) for k, t in st.full.items()}  # before the snapshot: its event covers them
        counts = None if st.raw["phase"] == "decode" else step_counts(st.raw)  # decode: one token each, sampled
        st.snapshot = self.buffer.snapshot(st.reqs, max(st.rows, st.samples), counts, st.tail, st.tail_pos)
        st.tail = []  # launched: their memory may be reused

    def _end(self, info: dict[str, Any]) -> None:
        st = self._open.pop(info["step"], None)
        if st is None:
            return
        batch = info["batch"]
        tokens = info["sampled"]
        sampled = {str(s.seq_id): t for s, t in zip(batch.seqs, tokens, strict=True) if t is not None}
        if st.ok and self.slot["sampled"] in st.fired:  # the "sampled" site's rows: the sampling requests'
            st.full["sampled"] = torch.tensor([t for t in tokens if t is not None], dtype=torch.int64)
        expected = self._expected[bool(st.samples)]
        missing = [] if not st.ok or st.fired.issuperset(expected) else \
            [self.catalog[i].name for i in sorted(expected - st.fired)]
        event = {"type": "step", "step": st.step, "phase": st.raw["phase"], "prompts": st.prompts,
                 "sampled": sampled, "finished": [[s.seq_id, s.finish_reason] for s in info["finished"]],
                 "missing_sites": missing,
                 "graphed": st.graphed, "elapsed_ms": round((time.perf_counter() - st.t0) * 1e3, 3)}
        if not st.ok and st.reqs:  # (a step that only preempted has no rows to count)
            event["note"] = "statistics skipped: the batch is larger than the recorder's tables"
        rec = StepRecord(st.step, event, st.raw, st.snapshot if st.ok else None, st.full, self.num_records)
        self.num_records += 1
        self.finisher.add(rec)
        leaving = self.history[0] if self.keep_history and len(self.history) == self.history.maxlen else None
        if self.keep_history:
            self.history.append(rec)
        sink = self.sink  # once: the UI's thread may switch recording off meanwhile
        if sink is not None and not self._submit(sink, rec):
            # keep the sink: detach() must still wait for its thread to write the "stopped" line
            self.stopped_reason = "the trace writer stopped (size cap or write error; see its last line)"
        if self.on_record is not None:
            self.on_record(rec)
        # a step that left the history can never be read here: free its slot, if no writer may still read
        # it from this process (none, or a writer process it was lent to)
        gone = leaving if self.keep_history else rec
        if gone is not None and gone.snapshot is not None and (gone.snapshot.lent or (sink is None and self._unwritten)):
            gone.snapshot.drop()

    def _submit(self, sink, rec: StepRecord) -> bool:
        """Hand ``rec`` to the trace writer: to a thread, the work of finishing it (``written``); to a
        process (``writer_process``), the record and a copy of its event that views here do not change."""
        if getattr(sink, "takes_records", False):
            ev = rec.event
            return sink.submit_record(rec, {**ev, "prompts": {k: dict(v) for k, v in ev["prompts"].items()}})
        return sink.submit(lambda r=rec: self.written(r))

    # ---- finished steps (the writer's thread, or a live view: finishing.py) ----------------------
    def event_of(self, rec: StepRecord) -> dict[str, Any]:
        """``rec``'s step event as views read it (its ``batch`` dict included), finishing earlier steps first."""
        self.finisher.upto(rec)
        rec.event["batch"] = rec.batch()
        return rec.event

    def written(self, rec: StepRecord) -> tuple[dict[str, Any], dict[str, torch.Tensor | np.ndarray]]:
        """What the trace writer stores (``finishing.trace_step``)."""
        return trace_step(rec, self.finisher, self.shadow is not None)


def _low_words(x: torch.Tensor) -> torch.Tensor:
    """The int32 low words of 1-D int64 ``x`` as a ``(rows, 1)`` view of unit column stride (little-endian:
    what a cast to int32 keeps; ``devstats.rows_view`` then needs no copy)."""
    return x.contiguous().view(torch.int32).view(-1, 2)[:, :1]


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A host copy of ``t`` that lands without blocking (pinned memory on the GPU)."""
    if not t.is_cuda:
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host
