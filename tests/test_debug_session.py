"""Debug sessions on the built-in model: pausing, breakpoints, shadow attention, recorded batches."""

from __future__ import annotations

import pytest
import torch

from minillama import LLM, SamplingParams, hooks
from minillama.debug.recorder import Recorder
from minillama.debug.session import Breakpoint, DebugSession
from minillama.context import get_context

PARAMS = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    return LLM(None, device="cpu", num_kvcache_blocks=128, max_model_len=1024, max_num_batched_tokens=48)


def _session(llm, prompts, **kw) -> DebugSession:
    s = DebugSession(llm, **kw)
    for p in prompts:
        s.submit(p, PARAMS)
    return s.start()


def test_pause_at_chosen_layer_reads_right_shapes(llm):
    s = _session(llm, ["What is 2+2?"], breakpoints=[Breakpoint("layers.7.attn.q")], pause_at_start=False)
    try:
        assert s.wait(60) and s.paused
        pos = s.position
        assert (pos.site, pos.layer, pos.step) == ("layers.7.attn.q", 7, 0)
        ev = s.current_event
        n = ev["batch"]["num_tokens"]
        q = s.tensor(0, "layers.7.attn.q")
        assert q.shape == (n, 9, 64)  # SmolLM2: 9 heads of 64
        assert s.tensor(0, "layers.6.attn.k").shape == (n, 3, 64)  # 3 kv heads
        assert s.tensor(0, "layers.7.attn.k") is None, "k is emitted after q"
        assert ev["sites"]["layers.7.attn.q"]["shape"] == [n, 9, 64]
        assert "layers.8.input" not in ev["sites"], "paused: later layers must not have run"
        s.next_layer()
        assert s.wait(60) and s.position.site == "layers.7.output"
        s.next_layer()
        assert s.wait(60) and s.position.site == "layers.8.output"
    finally:
        s.stop()


def test_step_pauses_before_each_step(llm):
    s = _session(llm, ["Hello!"])
    try:
        seen = []
        while s.wait(60) and s.paused:
            assert s.position.site == "step.begin"
            seen.append(s.position.step)
            s.step()
        assert s.idle
        assert seen == list(range(seen[0], seen[0] + len(seen))) and len(seen) == len(s.events)
        assert [e["phase"] for e in s.events][-1] == "decode"
        assert all(not e["missing_sites"] for e in s.events)
    finally:
        s.stop()


def test_nan_breakpoint_fires_where_planted(llm):
    def plant(site, tensor, info):
        if site == "layers.11.mlp.out" and info.get("_planted") is None:
            tensor[0, 3] = float("nan")

    hooks.attach(plant)  # attached before the session: runs first at every site
    s = _session(llm, ["Plant a NaN"], breakpoints=[Breakpoint("*", "nan")], pause_at_start=False)
    try:
        assert s.wait(60) and s.paused
        assert s.position.site == "layers.11.mlp.out"
        assert s.position.reason.startswith("breakpoint")
        assert s.current_event["sites"]["layers.11.mlp.out"]["nan"] == 1
    finally:
        s.stop()
        hooks.detach(plant)


def test_absmax_breakpoint(llm):
    s = _session(llm, ["Big values?"], breakpoints=[Breakpoint("layers.*.output", "absmax", 1e9)],
                 pause_at_start=False)
    try:
        assert s.wait(120) and s.idle and not s.paused, "no activation is that large: must not fire"
    finally:
        s.stop()


def test_recorded_batches_match_the_engine(llm):
    """Block tables and slot mappings in the record equal the tensors the model runner built."""
    seen = []

    def spy(site, tensor, info):
        if site == "embed":
            ctx = get_context()
            seen.append((ctx.step, ctx.slot_mapping.tolist(),
                         None if ctx.block_tables is None else ctx.block_tables.tolist(), list(ctx.query_lens)))

    prompts = [llm.tokenizer.encode("one two three " * k) for k in (3, 20, 9)]
    rec = Recorder(llm, keep_events=True).attach()
    hooks.attach(spy)
    try:
        steps_before = llm.num_steps
        llm.generate(prompts, PARAMS)
    finally:
        hooks.detach(spy)
        rec.detach()
    assert len(rec.events) == llm.num_steps - steps_before == len(seen)
    assert any(e["phase"] == "mixed" for e in rec.events), "token budget 48 forces chunked prefill"
    for ev, (step, slots, tables, qlens) in zip(rec.events, seen, strict=True):
        assert ev["step"] == step
        assert ev["batch"]["slot_mapping"] == slots
        assert [s["num_new"] for s in ev["batch"]["seqs"]] == qlens
        if tables is not None:
            for row, s in zip(tables, ev["batch"]["seqs"], strict=True):
                assert row[: len(s["block_table"])] == s["block_table"]
        assert ev["batch"]["cu_seqlens_q"][-1] == len(slots)


def test_shadow_reference_within_budget_and_planted_layer_stands_out(llm):
    def perturb(site, tensor, info):
        if site == "layers.5.attn.call":
            tensor.add_(1e-2)  # the active output drifts at layer 5 only

    hooks.attach(perturb)
    rec = Recorder(llm, shadow="torch", keep_events=True).attach()
    try:
        llm.generate(["Shadow me"], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    finally:
        rec.detach()
        hooks.detach(perturb)
    for ev in rec.events:
        layers = ev["shadow"]
        assert len(layers) == llm.model_config.num_hidden_layers
        worst = max(layers, key=lambda k: layers[k]["max_abs"])
        assert worst == "5" and layers["5"]["max_abs"] == pytest.approx(1e-2, rel=1e-3)
        for k, m in layers.items():
            if k != "5":
                assert m["max_abs"] == 0.0, "same backend on the same inputs must agree bit for bit"
                assert m["budget_ratio"] < 4, m
        assert layers["5"]["budget_ratio"] > 100


def test_missing_hook_site_is_reported(llm, monkeypatch):
    layer = llm.model.model.layers[4]
    original = layer.forward

    def silent_forward(positions, x, residual):  # same math, but never emits its sites
        was = hooks.enabled
        hooks.enabled = False
        try:
            return original(positions, x, residual)
        finally:
            hooks.enabled = was

    monkeypatch.setattr(layer, "forward", silent_forward)
    rec = Recorder(llm, keep_events=True).attach()
    try:
        llm.generate(["Where did layer 4 go?"], SamplingParams(temperature=0, max_tokens=1))
    finally:
        rec.detach()
    missing = rec.events[0]["missing_sites"]
    assert "layers.4.output" in missing and "layers.4.attn.q" in missing
    assert not any(m.startswith("layers.3.") or m.startswith("layers.5.") for m in missing)


def test_hooks_off_after_session(llm):
    s = _session(llm, ["bye"], pause_at_start=False)
    s.wait(60)
    s.stop()
    assert not hooks.enabled
    out = llm.generate(["still works"], SamplingParams(temperature=0, max_tokens=2))[0]
    assert len(out.token_ids) >= 1
    assert torch.is_tensor(llm.runner.kv_cache)
