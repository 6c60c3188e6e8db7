"""minillama-tui on the GPU: live on CUDA with flash-attn active and torch as the shadow, and the other way
round, pressing every view key and asserting on what each view shows; then replaying a recording made
on the GPU. Skips without CUDA or the flash_attn package.

    PYTHONPATH=$PWD python -m pytest tests/test_tui_gpu.py -q
"""

from __future__ import annotations

import os

import pytest
import torch

from minillama.debug.navigation import BEGIN, Pos
from minillama.debug.sources import LiveOptions
from minillama_tui.app import DebuggerApp
from tests.tui_pilot import anyio_backend, drain, press, settle, table_text, text

__all__ = ["anyio_backend"]  # fixture
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("flash_attn", reason="needs the flash_attn package")
pytestmark = [pytest.mark.gpu, pytest.mark.anyio]
SIZE = (120, 40)
PROMPTS = ["What is the capital of France?", "Name three colours.", "Write a haiku about a paged KV cache."]


@pytest.fixture(scope="module", params=[("flash-attn", "torch"), ("torch", "flash-attn")], ids=["flash+torch", "torch+flash"])
def gpu(request):
    """The built-in model on CUDA with ``backend`` active; the views compare it with ``shadow``."""
    from minillama import LLM

    backend, shadow = request.param
    llm = LLM(None, device="cuda", backend=backend, max_model_len=1024, num_kvcache_blocks=64,
              max_num_batched_tokens=64)
    yield llm, backend, shadow
    drain(llm)
    del llm
    torch.cuda.empty_cache()


def live_app(gpu, tmp_path, **kw) -> DebuggerApp:
    llm, _backend, shadow = gpu
    opts = LiveOptions(prompts=list(PROMPTS), max_tokens=kw.pop("max_tokens", 6), shadow=shadow, **kw)
    return DebuggerApp(options=opts, llm=llm, record_dir=str(tmp_path / "traces"))


def check_views(app, layer: int) -> None:
    """Every view at the cursor: what each must show at the end of ``layer`` with a shadow backend."""
    m = app.main
    shown = text(app, "inspector")
    assert m.pos.site in shown and "#" in shown
    shown = text(app, "attention")
    assert f"layer {layer}" in shown and ("largest |active - shadow|" in shown or "bit-identical" in shown), shown
    assert "active" in shown and "shadow" in shown and "difference" in shown
    assert "Traceback" not in shown and "Error" not in shown
    shown = text(app, "diff")
    assert "within the error budget" in shown or "first layer over the budget" in shown
    assert "(of 30)" in shown or "all 30 layers" in shown or "first layer over" in shown
    assert "blocks ×" in text(app, "kv")
    assert "What is the capital of France?" in table_text(app, "requests")


async def test_live_every_view_and_key(gpu, tmp_path):
    """Live on CUDA: n, every view key (i k a d w h), the locator, history both ways, c, f, the heatmap."""
    llm, backend, shadow = gpu
    app = live_app(gpu, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app, timeout=300)
        m = app.main
        assert m.pos == Pos(0, BEGIN) and m.ctx.mode == "live head"
        assert f"({backend}, shadow {shadow})" in m.ctx.timeline.title()
        await press(pilot, app, "n")
        assert m.pos == Pos(0, "layers.0.output")
        for key in ("i", "k", "a", "d", "w", "h", "a"):
            await press(pilot, app, key)
            assert m.view == {"i": "inspector", "k": "kv", "a": "attention", "d": "diff", "w": "requests",
                              "h": "heatmap"}[key]
        check_views(app, 0)
        await press(pilot, app, "a", "l")  # the locator on device tensors (the old crash: cuda vs cpu)
        assert "largest |active - shadow|" in text(app, "attention") or "bit-identical" in text(app, "attention")
        await press(pilot, app, "n", "n")
        assert m.pos == Pos(0, "layers.2.output")
        check_views(app, 2)
        await press(pilot, app, "s", "s", "n")  # a decode-era step, paused inside
        check_views(app, 0)
        shown = text(app, "attention")
        assert "strongest keys" in shown or "rebuilding" in shown, shown
        await press(pilot, app, "S", "p", "comma")  # history, read-only
        assert m.ctx.mode == "history"
        for view in ("inspector", "attention", "diff", "kv", "requests", "heatmap"):
            m.view = view
            await settle(pilot, app)
            assert "Traceback" not in text(app, view)
        await press(pilot, app, "G", "f")  # the first layer over the budget, if any: a move or a notice
        app.main.add_breakpoint("layers.*.attn.out", "shadow")
        await press(pilot, app, "G", "c")  # at speed (CUDA graphs), conditions checked on each step's tables
        await settle(pilot, app, timeout=300)
        assert m.ctx.mode in ("live head", "idle") and m.run.session.error is None


async def test_record_on_the_gpu_then_replay(gpu, tmp_path):
    """Record mid-run on CUDA, then replay the recording (no GPU work): every view of a decode step."""
    app = live_app(gpu, tmp_path, max_tokens=8)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app, timeout=300)
        await press(pilot, app, "s", "s", "r")
        path = app.main.ctx.recording
        assert path is not None
        await press(pilot, app, "n", "s", "s", "s", "r")
        assert app.main.ctx.recording is None
    assert os.path.isfile(os.path.join(path, "manifest.json"))
    replay = DebuggerApp(trace=path)
    async with replay.run_test(size=SIZE) as pilot:
        await settle(pilot, replay, timeout=120)
        m = replay.main
        assert m.ctx.mode == "replay" and m.ctx.timeline.num_steps() >= 3
        await press(pilot, replay, "w")
        assert "What is the capital of France?" in table_text(replay, "requests")
        await press(pilot, replay, "n", "a")  # the first recorded step ran paused inside: every tensor kept
        shown = text(replay, "attention")
        assert "largest |active - shadow|" in shown or "bit-identical" in shown, shown
        assert "strongest keys" in shown and "cache snapshot" in shown and "no weights" not in shown, shown
        await press(pilot, replay, "s", "n")  # a decode step that may have replayed a CUDA graph
        shown = text(replay, "attention")
        assert "strongest keys" in shown and "no weights" not in shown, shown  # q and k are copied inside graphs
        assert "largest |active - shadow|" in shown or "bit-identical" in shown or "not kept in full" in shown
        await press(pilot, replay, "l", "d")
        assert "within the error budget" in text(replay, "diff") or "first layer over" in text(replay, "diff")
        await press(pilot, replay, "h")
        assert "step × layer" in text(replay, "heatmap")
        await press(pilot, replay, "G", "i")
        assert "sampled:" in text(replay, "inspector")
