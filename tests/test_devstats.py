"""Per-request statistics and content hashes, checked against host computations written here.

The yardstick below re-implements the hash from its definition (traces/README.md) in plain Python
integers and the statistics with float64 numpy, sharing no code with ``minillama.debug``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from minillama import LLM, SamplingParams, hooks
from minillama.context import get_context
from minillama.debug.recorder import Recorder
from minillama.trace.format import finalize
from minillama.trace.tables import site_stats

M32 = 0xFFFFFFFF


def _fmix(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & M32
    return h ^ (h >> 16)


def py_lanes(words: list[int], pos: int) -> tuple[int, int]:
    """The hash lanes of one row, straight from the definition."""
    rowkey = _fmix((pos * 0x7FEB352D + 0x165667B1) & M32)
    a = b = 0
    for col, w in enumerate(words):
        t = _fmix(w ^ ((_fmix((col * 0x9E3779B9) & M32) + rowkey) & M32))
        u = ((t ^ (t >> 15)) * 0x27D4EB2F) & M32
        a, b = (a + t) & M32, (b + u) & M32
    return a, b


def row_words(x: torch.Tensor) -> np.ndarray:
    x = x.reshape(x.shape[0], -1)
    if x.dtype == torch.int64:
        x = x.to(torch.int32)
    if x.element_size() == 2:
        return x.view(torch.int16).numpy().astype(np.int64) & 0xFFFF
    return x.view(torch.int32).numpy().astype(np.int64) & M32


class Spy:
    """An eager listener that keeps every tensor of the step with its rows' requests and positions."""

    def __init__(self) -> None:
        self.seen: dict[str, tuple[torch.Tensor, np.ndarray, np.ndarray]] = {}

    def __call__(self, site, tensor, info) -> None:
        if tensor is None or site.endswith("attn.call") or site.startswith("step."):
            return
        ctx = get_context()
        if site in ("logits", "sampled"):
            seq, pos = ctx.sample_index, ctx.positions[ctx.sample_rows]
        else:
            seq, pos = ctx.seq_index, ctx.positions
        self.seen[site] = (tensor.detach().clone(), seq.cpu().numpy().copy(), pos.cpu().numpy().copy())


@pytest.fixture(scope="module")
def llm():
    return LLM(None, device="cpu", num_kvcache_blocks=128, max_model_len=512, max_num_batched_tokens=40)


def _mixed_step(llm, spy_first=None):
    """Run the engine until a step mixes a decode with prompt chunks; return (recorder, spy, step index)."""
    rec = Recorder(llm, history=64)
    spy = Spy()
    spy.hook_mode = getattr(spy_first, "hook_mode", "eager")
    if spy_first is not None:
        hooks.attach(spy_first)
    hooks.attach(spy)
    rec.attach()
    tok = llm.tokenizer
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    try:
        llm.add_request(tok.encode_chat([{"role": "user", "content": "Hi"}]), params)
        llm.step()  # its whole prompt
        for text in ("Name a colour.", "What is two plus two? Answer briefly."):
            llm.add_request(tok.encode_chat([{"role": "user", "content": text}]), params)
        batch, _ = llm.step()  # a decode plus prompt chunks within the 40-token budget
        assert batch.phase == "mixed" and len(batch.seqs) >= 2
        while llm.has_unfinished():
            llm.step()
    finally:
        rec.detach()
        hooks.detach(spy)
        if spy_first is not None:
            hooks.detach(spy_first)
    return rec, spy


@pytest.mark.parametrize("spy_mode", ["eager", "step"])
def test_per_request_stats_and_hashes_match_the_host(llm, spy_mode, monkeypatch):
    """An eager spy keeps the recorder's statistics site by site; a "step" one lets it batch the small
    sites of a pass (decode steps) at the pass's end: both must equal the host's."""
    from minillama.debug import devstats

    spy_steps = []
    grouped = []
    batched = devstats.sites_stats_cpu
    monkeypatch.setattr(devstats, "sites_stats_cpu", lambda items, *a: (grouped.append(len(items)), batched(items, *a)))

    class PerStep(Spy):
        hook_mode = spy_mode

        def __call__(self, site, tensor, info):
            if site == "step.begin":
                self.seen = {}
                spy_steps.append(self.seen)
            super().__call__(site, tensor, info)

    rec, _ = _mixed_step(llm, PerStep())
    catalog = [s.to_json() for s in rec.catalog]
    checked_rows = 0
    for k, r in enumerate(rec.history):
        event = rec.event_of(r)
        tables = r.tables(False)
        seen = spy_steps[k]
        assert not event["missing_sites"]
        for slot, spec in enumerate(catalog):
            if spec["name"] not in seen:
                continue
            x, seq, pos = seen[spec["name"]]
            words = row_words(x)
            for req in sorted(set(seq.tolist())):
                rows = np.flatnonzero(seq == req)
                got = site_stats(tables, spec, slot, event["batch"], req)
                vals = x.reshape(x.shape[0], -1)[rows].double().numpy()
                assert got["count"] == vals.size
                assert got["mean"] == pytest.approx(vals.mean(), rel=1e-5, abs=1e-6)
                if vals.size > 1:
                    assert got["std"] == pytest.approx(vals.std(ddof=1), rel=1e-4, abs=1e-6)
                assert (got["min"], got["max"]) == (vals.min(), vals.max())
                assert got["nan"] == 0 and got["inf"] == 0
                lanes = [0, 0]
                for row in rows:
                    # a few rows of every step against the definition (plain Python: slow)
                    want = py_lanes(words[row].tolist(), int(pos[row])) if checked_rows < 12 * (k + 1) else None
                    have = tuple(int(v) & M32 for v in tables["hash"][row, slot])
                    if want is not None:
                        assert have == want, (spec["name"], row)
                        checked_rows += 1
                    lanes = [(lanes[0] + have[0]) & M32, (lanes[1] + have[1]) & M32]
                assert got["hash"] == finalize(np.array(lanes, dtype=np.uint32), vals.size)
    assert checked_rows == 12 * len(rec.history)
    if spy_mode == "step":
        assert any(n > 1 for n in grouped), "decode steps' small sites must have gone in groups"
    else:
        assert not grouped


def test_one_flipped_bit_changes_only_that_requests_hash(llm):
    def run(flip: bool):
        def plant(site, tensor, info):
            if flip and site == "layers.5.mlp.out" and get_context().seq_index is not None:
                seq = get_context().seq_index
                row = int(np.flatnonzero(seq.numpy() == seq.numpy().max())[0])  # the last request's first row
                tensor.view(torch.int32)[row, 7] ^= 1
        rec, _ = _mixed_step(llm, plant)
        out = []
        for r in rec.history:
            ev = rec.event_of(r)
            out.append((ev, r.tables(False)))
        return rec, out

    rec, a = run(False)
    _, b = run(True)
    catalog = [s.to_json() for s in rec.catalog]
    slot = next(k for k, s in enumerate(catalog) if s["name"] == "layers.5.mlp.out")
    diffs = set()
    for (ea, ta), (eb, tb) in zip(a, b, strict=True):
        for req in range(len(ea["batch"]["seqs"])):
            ha = site_stats(ta, catalog[slot], slot, ea["batch"], req)["hash"]
            hb = site_stats(tb, catalog[slot], slot, eb["batch"], req)["hash"]
            if ha != hb:
                diffs.add((ea["step"] - a[0][0]["step"], req))
    assert len(diffs) >= 1
    first = min(diffs)
    assert all(d[0] >= first[0] for d in diffs)
    step = first[0]
    changed = {r for s, r in diffs if s == step}
    assert len(changed) == 1, "only the request whose row was flipped differs at that step"
    # the same request's earlier site in the same step is untouched
    before = next(k for k, s in enumerate(catalog) if s["name"] == "layers.5.attn.out")
    ea, ta = a[step]
    eb, tb = b[step]
    req = changed.pop()
    assert site_stats(ta, catalog[before], before, ea["batch"], req)["hash"] == \
        site_stats(tb, catalog[before], before, eb["batch"], req)["hash"]


def test_nan_and_inf_are_counted_per_request(llm):
    def plant(site, tensor, info):
        if site == "layers.2.attn.v" and get_context().seq_index is not None and tensor.shape[0] > 3:
            tensor[1, 0, 0] = float("nan")
            tensor[1, 0, 1] = float("inf")
            tensor[1, 1, 2] = float("-inf")

    rec, _ = _mixed_step(llm, plant)
    catalog = [s.to_json() for s in rec.catalog]
    slot = next(k for k, s in enumerate(catalog) if s["name"] == "layers.2.attn.v")
    ev = rec.event_of(rec.history[0])
    t = rec.history[0].tables(False)
    got = site_stats(t, catalog[slot], slot, ev["batch"], 0)
    assert (got["nan"], got["inf"]) == (1, 2)
    assert math.isfinite(got["mean"]) and math.isfinite(got["max"])


def test_a_snapshot_is_decoded_once_whoever_asks():
    """The trace writer and a live view may both ask for a step's tables: the first decode (in place, in
    the ring slot, which it gives back) is the one every later caller gets."""
    import threading

    from minillama.debug.stepbuf import StatsBuffer

    buf = StatsBuffer(2, 3, 4, (0, 0), torch.device("cpu"))
    buf.reset(3)
    snap = buf.snapshot(3, 4, np.ones((3, 2)))
    got, start = [], threading.Barrier(4)

    def ask():
        start.wait()
        got.append(snap.decoded(lambda raw: np.array(raw["stats"])))

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 4 and all(g is got[0] for g in got) and got[0].shape == (3, 2, 4)
    assert snap.decoded(lambda raw: 1 / 0) is got[0] and not snap.any_bad()


def test_a_snapshot_hands_its_tables_over_in_whichever_form_it_still_has():
    """``Snapshot.hand_over`` (the writer process's sender): the slot's raw memory when nobody else may
    read it, the copied-out tables when a view may, what a view already decoded, nothing once dropped."""
    from minillama.debug.snapshot import views
    from minillama.debug.stepbuf import StatsBuffer

    buf = StatsBuffer(2, 3, 4, (0, 0), torch.device("cpu"))
    buf.reset(3)
    buf.numpy_tables()["bad"][1, 0, 0] = 5

    def take(snap, keep):
        box = []
        return snap.hand_over(box.append, keep), (box[0] if box else None)

    ok, got = take(buf.snapshot(3, 4, np.ones((3, 2))), keep=False)
    assert ok and set(got) == {"req", "rows"} and views(got["req"], got["rows"], 2, (0, 0))["bad"][1, 0, 0] == 5
    snap = buf.snapshot(3, 4, np.ones((3, 2)))
    ok, got = take(snap, keep=True)
    assert ok and got["bad"][1, 0, 0] == 5 and snap.tables() is got, "copied out, and still there for views"
    snap = buf.snapshot(3, 4, np.ones((3, 2)))
    first = snap.decoded(lambda raw: {"bad": np.array(raw["bad"])})
    assert take(snap, keep=True) == (True, {"decoded": first})
    snap = buf.snapshot(3, 4, np.ones((3, 2)))
    snap.drop()
    assert take(snap, keep=False) == (False, None)
