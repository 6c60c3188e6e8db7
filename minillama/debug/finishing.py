"""Finishing step records in step order: the batch counters and the text of the tokens they sampled.

Text is decoded with one streaming decoder per request (a token's text can depend on the tokens
before it), so steps are finished once each, in order, whoever asks first: the trace writer's
thread, or a live view reading a step.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

from minillama.debug.records import StepRecord, table_tensors
from minillama.models.detokenizer import push_tokens


class StepFinisher:
    """Finishes the ``StepRecord`` s handed to ``add``, in order, when ``upto`` asks for one.

    ``keep``: with nobody writing the steps out (a session without a trace), at most this many
    wait; an older one, which no view can ask for any more, only moves its requests' decoders
    past its tokens (no text is made), so records do not pile up over a long run.
    """

    def __init__(self, tokenizer: Any, keep: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.keep = keep
        self._decoders: dict[int, Any] = {}
        self._passed: dict[str, int] = {}  # request -> the last token of steps passed unfinished
        self._unfinished: deque[StepRecord] = deque()
        self._lock = threading.Lock()

    def add(self, rec: StepRecord) -> None:
        with self._lock:
            self._unfinished.append(rec)
            while self.keep is not None and len(self._unfinished) > self.keep:
                self._skip(self._unfinished.popleft())

    def upto(self, rec: StepRecord) -> None:
        """Finish every step up to ``rec``'s (those before it first)."""
        with self._lock:
            while self._unfinished and self._unfinished[0].step <= rec.step:
                self._finish(self._unfinished.popleft())

    def _finish(self, rec: StepRecord) -> None:
        ev, tok, raw = rec.event, self.tokenizer, rec.raw_batch
        ev.update(kv=raw["kv"], preempted=raw["preempted"], waiting=raw["waiting"], num_seqs=len(raw["seqs"]),
                  num_tokens=int(raw["seqs"][:, 4].sum()))
        for sid, p in ev["prompts"].items():
            p["text"] = tok.decode(p["token_ids"], skip_special_tokens=False)
            if p["generated"]:
                self._passed.pop(sid, None)
                dec = self._decoders[int(sid)] = tok.stream_decoder()
                p["text_so_far"] = "".join(dec.push(t) for t in p["generated"])
        sids = list(ev["sampled"])
        decoders = [self._decoder(int(sid)) for sid in sids]
        if hasattr(tok, "decode_batch"):  # one call into the tokenizer for the whole batch
            texts = push_tokens(decoders, [ev["sampled"][sid] for sid in sids])
        else:
            texts = [d.push(ev["sampled"][sid]) for d, sid in zip(decoders, sids, strict=True)]
        pieces = dict(zip(sids, texts, strict=True))
        for sid, _reason in ev["finished"]:
            dec = self._decoders.pop(int(sid), None)
            # a decoder that a passed step left behind holds nothing of this request's latest text
            if self._passed.pop(str(sid), None) is None and dec is not None:
                pieces[str(sid)] = pieces.get(str(sid), "") + dec.flush()
        ev["pieces"] = pieces

    def _skip(self, rec: StepRecord) -> None:
        """Pass ``rec`` without finishing it: its tokens count as decoded for the steps after it.

        Only each request's last passed token is kept (one dict update a step, on the engine's thread
        in a session): a later finish starts that request's decoder afresh from it, as
        ``IncrementalDecoder.skip`` would have left it."""
        ev = rec.event
        for sid, p in ev["prompts"].items():
            if p["generated"]:
                self._passed[sid] = p["generated"][-1]
        self._passed.update(ev["sampled"])
        for sid, _reason in ev["finished"]:
            self._decoders.pop(int(sid), None)
            self._passed.pop(str(sid), None)

    def _decoder(self, sid: int) -> Any:
        last = self._passed.pop(str(sid), None)
        dec = self._decoders.get(sid) if last is None else None
        if dec is None:
            dec = self._decoders[sid] = self.tokenizer.stream_decoder()
            if last is not None:
                dec.skip([last])
        return dec


def trace_step(rec: StepRecord, finisher: StepFinisher, shadow: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """What a trace stores of ``rec``: its finished event without ``batch`` (the blob holds its tables),
    and its tensors (full sites, statistics tables, batch tables)."""
    finisher.upto(rec)
    tensors: dict[str, Any] = dict(rec.full)
    tables = rec.tables(shadow)
    if tables is not None:
        tensors.update(table_tensors(tables))
    tensors.update(rec.arrays())
    return {k: v for k, v in rec.event.items() if k != "batch"}, tensors
