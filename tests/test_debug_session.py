"""Debug sessions on the built-in model: pausing, breakpoints, the shadow and its yardstick, recorded batches."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from minillama import LLM, SamplingParams, hooks
from minillama.context import get_context
from minillama.debug.recorder import Recorder
from minillama.debug.session import Breakpoint, DebugSession
from minillama.debug.timeline import LiveTimeline
from minillama.engine.llm_engine import RequestError

PARAMS = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    return LLM(None, device="cpu", num_kvcache_blocks=128, max_model_len=512, max_num_batched_tokens=48)


def _session(llm, prompts, **kw) -> DebugSession:
    s = DebugSession(llm, **kw)
    for p in prompts:
        s.submit(p, PARAMS)
    return s.start()


def test_pause_at_chosen_layer_reads_right_shapes(llm):
    s = _session(llm, ["What is 2+2?"], breakpoints=[Breakpoint("layers.7.attn.q")], pause_at_start=False)
    try:
        assert s.wait(60) and s.paused and s.hook_mode == "eager"
        pos = s.position
        assert (pos.site, pos.layer) == ("layers.7.attn.q", 7)
        ev = s.current_event
        n = ev["batch"]["num_tokens"]
        step = ev["step"]
        assert s.tensor(step, "layers.7.attn.q").shape == (n, 9, 64)  # SmolLM2: 9 heads of 64
        assert s.tensor(step, "layers.6.attn.k").shape == (n, 3, 64)  # 3 kv heads
        assert s.tensor(step, "layers.7.attn.k") is None, "k is emitted after q"
        tl = LiveTimeline(s)
        i = tl.num_steps() - 1
        st = tl.stats(i, "layers.7.attn.q")
        assert st["shape"] == [n, 9, 64] and st["mean"] == pytest.approx(s.tensor(step, "layers.7.attn.q").mean().item())
        assert tl.stats(i, "layers.8.input") is None, "paused: later layers have not run"
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
            assert s.position.site == "step.begin" and s.hook_mode == "step"
            seen.append(s.position.step)
            s.step()
        assert s.idle
        assert seen == list(range(seen[0], seen[0] + len(seen))) and len(seen) == len(s.events)
        assert [e["phase"] for e in s.events][-1] == "decode"
        assert all(not e["missing_sites"] for e in s.events)
    finally:
        s.stop()


def _plant_nan(site, tensor, info):
    if site == "layers.11.mlp.out" and get_context().step == _plant_nan.step:
        tensor[0, 3] = float("nan")


@pytest.mark.parametrize("eager", [True, False])
def test_nan_breakpoint_fires_where_planted(llm, eager):
    """Eagerly it stops at the site; at speed (statistics only) at the end of the step, naming the site."""
    _plant_nan.step = llm.num_steps + 1  # the first decode step
    _plant_nan.hook_mode = "eager" if eager else "device"  # "device": the engine need not stop at sites for it
    hooks.attach(_plant_nan)
    bps = [Breakpoint("*", "nan")] + ([Breakpoint("nothing.matches.this")] if eager else [])
    s = _session(llm, ["Plant a NaN"], breakpoints=bps, pause_at_start=False)
    try:
        assert s.hook_mode == ("eager" if eager else "device") and hooks.eager == eager
        assert s.wait(60) and s.paused
        assert s.position.site == "layers.11.mlp.out" and s.position.step == _plant_nan.step
        assert s.position.reason.startswith("breakpoint")
        tl = LiveTimeline(s)
        i = next(k for k in range(tl.num_steps()) if (tl.event(k) or {}).get("step") == _plant_nan.step)
        assert tl.stats(i, "layers.11.mlp.out")["nan"] == 1
        assert tl.stats(i, "layers.11.attn.out")["nan"] == 0
    finally:
        s.stop()
        hooks.detach(_plant_nan)
    while llm.has_unfinished():  # the poisoned request runs out here, not in the next test
        llm.step()


def test_absmax_breakpoint(llm):
    s = _session(llm, ["Big values?"], breakpoints=[Breakpoint("layers.*.output", "absmax", 1e9)],
                 pause_at_start=False)
    try:
        assert s.wait(120) and s.idle and not s.paused, "no activation is that large: must not fire"
    finally:
        s.stop()


def test_a_prompt_that_cannot_run_is_refused_alone(llm):
    s = _session(llm, ["first"], pause_at_start=False)
    try:
        with pytest.raises(RequestError, match="max_model_len"):
            s.submit("word " * 600, PARAMS)
        assert s.wait(60) and s.idle and s.error is None
    finally:
        s.stop()


def test_recorded_batches_match_the_engine(llm):
    """Block tables, slot mappings and chunks in the record equal what the model runner built."""
    seen = []

    def spy(site, tensor, info):
        if site == "embed":
            ctx = get_context()
            seen.append((ctx.step, ctx.slot_mapping.tolist(),
                         None if ctx.block_tables is None else ctx.block_tables.tolist(), list(ctx.query_lens)))

    prompts = [llm.tokenizer.encode("one two three " * k) for k in (3, 20, 9)]
    rec = Recorder(llm, history=64).attach()
    hooks.attach(spy)
    try:
        steps_before = llm.num_steps
        llm.generate(prompts, PARAMS)
    finally:
        hooks.detach(spy)
        rec.detach()
    events = [rec.event_of(r) for r in rec.history]
    assert len(events) == llm.num_steps - steps_before == len(seen)
    assert any(e["phase"] == "mixed" for e in events), "token budget 48 forces chunked prefill"
    for ev, (step, slots, tables, qlens) in zip(events, seen, strict=True):
        assert ev["step"] == step
        assert ev["batch"]["slot_mapping"] == slots
        assert [s["num_new"] for s in ev["batch"]["seqs"]] == qlens
        if tables is not None:
            for row, s in zip(tables, ev["batch"]["seqs"], strict=True):
                assert row[: len(s["block_table"])] == s["block_table"]
        assert ev["batch"]["cu_seqlens_q"][-1] == len(slots)


def _shadow_run(llm, shadow, plant=None):
    if plant is not None:
        hooks.attach(plant)
    rec = Recorder(llm, shadow=shadow, history=16).attach()
    try:
        llm.generate(["Shadow me"], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    finally:
        rec.detach()
        if plant is not None:
            hooks.detach(plant)
    tl = LiveTimeline(rec)
    return rec, [tl.shadow(k) for k in range(tl.first_step(), tl.num_steps())]


def test_same_backend_shadow_agrees_bit_for_bit_and_a_planted_drift_stands_out(llm):
    def perturb(site, tensor, info):
        if site == "layers.5.attn.call":
            tensor.add_(1e-2)  # the active output drifts at layer 5 only

    _, steps = _shadow_run(llm, "torch", perturb)
    for layers in steps:
        assert len(layers) == llm.model_config.num_hidden_layers
        worst = max(layers, key=lambda k: layers[k]["max_abs"])
        assert worst == "5" and layers["5"]["max_abs"] == pytest.approx(1e-2, rel=1e-3)
        for k, m in layers.items():
            if k != "5":
                assert m["max_abs"] == 0.0, "same backend on the same inputs must agree bit for bit"
                assert m["budget_ratio"] < 4 and m["budget_ratio_rms"] < 4, m
        assert layers["5"]["budget_ratio"] > 100 and layers["5"]["budget_ratio_rms"] > 100


def test_the_yardstick_is_independent_of_the_torch_backend(llm, monkeypatch):
    """Break the torch backend itself at one layer: with only the reference shadowing it, that layer's
    budget ratio is far above 2 (a reference that ran through the backend would agree with it)."""
    backend = llm.backend
    calls = {"n": 0}
    num_layers = llm.model_config.num_hidden_layers

    def broken(fn):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            calls["n"] += 1
            if (calls["n"] - 1) % num_layers == 5:  # layer 5 of each forward pass
                out = out + 1e-2
            return out
        return wrapped

    patched = dataclasses.replace(backend, varlen=broken(backend.varlen), with_kvcache=broken(backend.with_kvcache))
    for layer in llm.model.model.layers:
        monkeypatch.setattr(layer.self_attn.attn, "backend", patched)
    _, steps = _shadow_run(llm, "reference")
    for layers in steps:
        assert "max_abs" not in layers["5"], "no second backend: the yardstick alone"
        assert layers["5"]["budget_ratio"] > 20, layers["5"]
        others = [m["budget_ratio"] for k, m in layers.items() if k != "5"]
        assert max(others) < 4, others


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
    rec = Recorder(llm, history=4).attach()
    try:
        llm.generate(["Where did layer 4 go?"], SamplingParams(temperature=0, max_tokens=1))
    finally:
        rec.detach()
    missing = rec.event_of(rec.history[0])["missing_sites"]
    # a layer's output is the sum its successor's input norm makes, so layer 4's module emits layer 3's
    # output and its own sites but its output, which layer 5 emits
    assert set(missing) == {"layers.3.output"} | {f"layers.4.{s}" for s in hooks.LAYER_SITES if s != "output"}


def test_hooks_off_after_session(llm):
    s = _session(llm, ["bye"], pause_at_start=False)
    s.wait(60)
    s.stop()
    assert not hooks.enabled
    out = llm.generate(["still works"], SamplingParams(temperature=0, max_tokens=2))[0]
    assert len(out.token_ids) >= 1
    assert torch.is_tensor(llm.runner.kv_cache)


def test_a_failed_graph_capture_ends_the_session_with_its_error(llm, monkeypatch):
    """A capture that raises (on CUDA: a kernel the graph cannot hold) is the session's error, shown by
    the UI, and the hooks come off; before, the worker thread died silently and the UI waited."""

    class BrokenGraphs:
        sizes = [1, 2]

        def capture(self) -> None:
            raise RuntimeError("capture broke")

    monkeypatch.setattr(llm.runner, "graphs", BrokenGraphs())
    seen: list[str] = []
    s = DebugSession(llm, pause_at_start=False)
    s.on_event = lambda kind, data: seen.append(kind)
    s.submit("never runs", PARAMS)
    s.start()
    try:
        assert s.wait(60)
        assert isinstance(s.error, RuntimeError) and "capture broke" in str(s.error)
        assert "error" in seen and "step" not in seen
    finally:
        s.stop()
    assert not hooks.enabled
