"""A hooks listener that turns one scheduler step into one event (JSON) plus tensors.

By default each tensor site is kept as statistics; sites matching ``full_sites`` patterns, the
attention outputs of both backends (when shadowing) and the step's block tables are kept in
full. Events go to a ``sink`` (the trace writer) and, for live sessions, stay in memory.
"""

from __future__ import annotations

import fnmatch
import re
import time
from collections.abc import Iterable
from typing import Any

import torch

from minillama import hooks
from minillama.debug.records import row_ranges, step_summary, tensor_stats
from minillama.debug.shadow import Shadow

_LAYER_RE = re.compile(r"layers\.(\d+)\.")


def site_layer(site: str) -> int | None:
    """Layer index of a per-layer site name, else None."""
    m = _LAYER_RE.match(site)
    return int(m.group(1)) if m else None


class Recorder:
    """Listens at every hook site and writes one event per step to ``sink``.

    ``sink.write_step(event, tensors) -> bool`` (False stops recording) and ``sink.close(reason)``.
    """

    def __init__(self, llm, *, shadow: str | None = None, reference: bool | None = None,
                 full_sites: Iterable[str] = (), sink=None, stats: bool = True, keep_events: bool = False,
                 attention_full: bool = True) -> None:
        self.llm = llm
        self.full_sites = list(full_sites)
        self.sink = sink
        self.stats = stats
        self.keep_events = keep_events
        self.attention_full = attention_full
        want_ref = reference if reference is not None else shadow is not None
        self.shadow = None
        if shadow is not None or want_ref:
            other = None if shadow in (None, "reference") else shadow
            self.shadow = Shadow(other, llm.device, llm.dtype, llm.model_config.head_dim, reference=want_ref)
        self.events: list[dict[str, Any]] = []
        self.expected = hooks.expected_sites(llm.model_config.num_hidden_layers)
        self.stopped_reason: str | None = None
        self._event: dict[str, Any] | None = None
        self._tensors: dict[str, torch.Tensor] = {}
        self._t0 = 0.0
        self._attached = False
        self._seen: set[int] = set()

    # ---- attach -------------------------------------------------------------------------------
    def attach(self) -> Recorder:
        hooks.attach(self)
        self._attached = True
        return self

    def detach(self, reason: str = "finished") -> None:
        if self._attached:
            hooks.detach(self)
            self._attached = False
        if self.sink is not None:
            self.sink.close(self.stopped_reason or reason)
            self.sink = None

    def __enter__(self) -> Recorder:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        err = exc[1]
        self.detach(f"error: {(str(err).splitlines() or [type(err).__name__])[0]}" if err else "finished")

    # ---- the listener -------------------------------------------------------------------------
    def is_full(self, site: str) -> bool:
        return any(fnmatch.fnmatchcase(site, p) for p in self.full_sites)

    def __call__(self, site: str, tensor: torch.Tensor | None, info: dict[str, Any]) -> None:
        if site == "step.begin":
            self._begin(info)
        elif site == "step.end":
            self._end(info)
        elif self._event is None:
            return  # a forward pass outside a scheduler step (e.g. prompt_logits)
        elif site.endswith(".attn.call"):
            self._attention(site, tensor, info["call"])
        elif tensor is not None:
            self._site(site, tensor, info)

    def _begin(self, info: dict[str, Any]) -> None:
        batch, engine = info["batch"], info["engine"]
        summary = step_summary(info["step"], batch, engine)
        self._event = {"type": "step", "step": info["step"], "phase": batch.phase, "batch": summary,
                       "sites": {}, "shadow": {}, "site_times_ms": {}}
        self._rows = row_ranges([s.seq_id for s in batch.seqs], list(batch.num_new_tokens))
        self._tensors = {}
        width = max((len(s["block_table"]) for s in summary["seqs"]), default=0)
        self._tensors["batch.block_tables"] = torch.tensor(
            [s["block_table"] + [-1] * (width - len(s["block_table"])) for s in summary["seqs"]], dtype=torch.int32)
        self._tensors["batch.slot_mapping"] = torch.tensor(summary["slot_mapping"], dtype=torch.int64)
        # the prompt of each request, the first time it appears
        new = [s for s in batch.seqs if s.seq_id not in self._seen]
        self._seen.update(s.seq_id for s in new)
        self._event["prompts"] = {str(s.seq_id): {"token_ids": s.token_ids[: s.num_prompt_tokens],
                                                  "text": engine.tokenizer.decode(s.token_ids[: s.num_prompt_tokens],
                                                                                  skip_special_tokens=False)}
                                  for s in new}
        self._t0 = time.perf_counter()

    def _stamp(self, site: str) -> None:
        self._event["site_times_ms"][site] = round((time.perf_counter() - self._t0) * 1e3, 3)

    def _site(self, site: str, tensor: torch.Tensor, info: dict[str, Any]) -> None:
        ev = self._event
        full = self.is_full(site)
        rec: dict[str, Any] = tensor_stats(tensor) if self.stats else {"shape": list(tensor.shape)}
        if site == "sampled":
            rec["rows"] = [[sid, i, i + 1] for i, sid in enumerate(info.get("seq_ids", []))]
            full = True
        elif site == "logits":
            rec["rows"] = [[s["seq_id"], i, i + 1] for i, s in
                           enumerate(x for x in ev["batch"]["seqs"] if x["samples"])]
        else:
            rec["rows"] = self._rows
        rec["full"] = full or site in self._tensors
        if full:
            self._tensors[site] = tensor.detach().to("cpu", copy=True)
        ev["sites"][site] = rec
        self._stamp(site)

    def _attention(self, site: str, out: torch.Tensor, call) -> None:
        layer = call.layer
        if self.shadow is None:
            return
        metrics, extra = self.shadow.run(call, out)
        self._event["shadow"][str(layer)] = metrics
        if self.attention_full:
            base = f"layers.{layer}.attn.out"
            self._tensors[base] = out.detach().to("cpu", copy=True)  # its site fires next, marked full
            for name, t in extra.items():
                self._tensors[f"{base}@{name}"] = t.detach().to("cpu", copy=True)

    def _end(self, info: dict[str, Any]) -> None:
        ev = self._event
        if ev is None:
            return
        engine, batch = info["engine"], info["batch"]
        tok = engine.tokenizer
        ev["sampled"] = {str(s.seq_id): t for s, t in zip(batch.seqs, info["sampled"], strict=True) if t is not None}
        ev["finished"] = [[s.seq_id, s.finish_reason] for s in info["finished"]]
        ev["texts"] = {str(s.seq_id): tok.decode(s.completion_token_ids) for s in batch.seqs}
        ev["token_ids"] = {str(s.seq_id): s.completion_token_ids for s in batch.seqs}
        ev["missing_sites"] = [s for s in self.expected if s not in ev["sites"]]
        ev["elapsed_ms"] = round((time.perf_counter() - self._t0) * 1e3, 3)
        if self.keep_events:
            self.events.append(ev)
        if self.sink is not None and not self.sink.write_step(ev, self._tensors):
            self.stopped_reason = "the trace writer stopped (size cap or write error; see its last line)"
            if self._attached:
                hooks.detach(self)
                self._attached = False
        self._event, self._tensors = None, {}
