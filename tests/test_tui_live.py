"""Pilot tests of minillama-tui live, on the tiny random Llama: stepping, history, the diff view mid-step,
prompts refused alone, an engine error that fails one request, restarts, and recording mid-run."""

from __future__ import annotations

import os

import pytest
import torch

from minillama import hooks
from minillama.debug.navigation import BEGIN, Pos
from minillama.trace.reader import TraceReader
from minillama_tui.app import DebuggerApp
from tests.tui_pilot import anyio_backend, live, press, settle, table_text, text, tiny_llm

__all__ = ["anyio_backend", "live", "tiny_llm"]  # fixtures
pytestmark = pytest.mark.anyio
SIZE = (120, 40)


async def test_steps_layers_and_history_both_ways(live):
    app = live()
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        m = app.main
        assert m.pos == Pos(0, BEGIN) and m.ctx.mode == "live head"
        await press(pilot, app, "w")  # D2 live: the prompts of the step in progress, before it is written
        assert "(prompt not recorded)" not in table_text(app, "requests") and "w5 w6 w7" in table_text(app, "requests")
        await press(pilot, app, "n")
        assert m.pos == Pos(0, "layers.0.output") and m.run.session.position.site == "layers.0.output"
        ev = m.ctx.timeline.event(0)
        assert ev["batch"]["seqs"][0]["chunk"] == [0, 16]  # the 16-token budget chunks the 19-token prompt
        await press(pilot, app, "s", "s")
        head = m.pos
        assert head == Pos(2, BEGIN)
        await press(pilot, app, "S")
        assert m.pos == Pos(1, BEGIN) and m.ctx.mode == "history"
        await press(pilot, app, "p")
        assert m.pos == Pos(0, "layers.2.output")  # step 0 samples nothing (a prompt chunk): no logits
        assert "statistics only" in text(app, "inspector")  # the rest of step 0 ran at step speed
        await press(pilot, app, "p", "p")
        assert m.pos == Pos(0, "layers.0.output") and "values of" in text(app, "inspector")  # paused here: kept
        await press(pilot, app, "s", "s")  # forward through history onto the head: live again
        assert m.pos == head and m.ctx.mode == "live head"
        await press(pilot, app, "s")
        assert m.pos == Pos(3, BEGIN)


async def test_diff_view_at_a_step_start_and_mid_step(live):
    """D5: at a step start the diff shows the step before (not 'start with --shadow'); mid-step it says how many
    layers of how many ran; wording is singular for one layer (D17)."""
    app = live()
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        await press(pilot, app, "s", "d")
        shown = text(app, "diff")
        assert "start live with --shadow" not in shown and "showing the step before" in shown
        await press(pilot, app, "n")
        shown = text(app, "diff")
        assert "the 1 layer computed so far (of 3)" in shown
        await press(pilot, app, "n", "n")
        assert "all 3 layers within the error budget" in text(app, "diff")


async def test_attention_weights_rebuilt_live_reproduce_the_engine(live):
    """Weights from the recorded q and the keys (recorded k, then the engine's cache) give the engine's output."""
    from minillama.debug.keys import attention_weights

    app = live(shadow=None)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        await press(pilot, app, "s", "n", "n")  # step 1 (the prompt's last chunk), end of layer 1
        m = app.main
        i, seq = m.pos.step, m.ctx.timeline.event(m.pos.step)["batch"]["seqs"][0]
        upto = seq["num_computed"] + seq["num_new"]
        keys = m.ctx.keys.keys(i, 1, seq, upto)
        assert keys.k is not None and keys.k.shape[0] == upto
        q, out = m.ctx.timeline.tensor(i, "layers.1.attn.q"), m.ctx.timeline.tensor(i, "layers.1.attn.out")
        rows = slice(0, seq["num_new"])
        cache = m.run.llm.runner.kv_cache
        bs = cache.shape[3]
        slots = torch.tensor([seq["block_table"][p // bs] * bs + p % bs for p in range(upto)])
        v = cache[1, 1].reshape(-1, *cache.shape[4:])[slots].double()
        for h in (0, 5):
            w = attention_weights(q[rows], keys.k, h, seq["num_computed"])
            torch.testing.assert_close((w @ v[:, h // 4]).float(), out[rows, h].float(), atol=1e-5, rtol=1e-4)
        await press(pilot, app, "a")
        assert "strongest keys" in text(app, "attention")


@pytest.fixture(scope="module")
def builtin_small():
    """The built-in model (a real tokenizer for typed prompts) with a short max_model_len."""
    from minillama import LLM

    return LLM(None, device="cpu", max_model_len=128, num_kvcache_blocks=16, max_num_batched_tokens=64)


def _where_text(app) -> str:
    from minillama_tui.widgets.where import WhereView

    return " ".join(r.plain for r in app.main.query_one(WhereView).render_view().renderables if hasattr(r, "plain"))


async def test_typed_prompts_are_checked_and_refused_alone(builtin_small, tmp_path):
    """D1: an empty prompt and one longer than max_model_len are refused with a toast when submitted; nothing
    that would kill the next step is queued, and the engine and its requests go on."""
    from minillama.debug.sources import LiveOptions
    from tests.tui_pilot import drain

    app = DebuggerApp(options=LiveOptions(prompts=["Hi"], max_tokens=2), llm=builtin_small, record_dir=str(tmp_path))
    try:
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot, app)
            await press(pilot, app, "slash")
            assert app.screen.focused.id == "prompt"
            await press(pilot, app, "enter")  # empty
            await press(pilot, app, "slash")
            app.main.query_one("#prompt").value = "word " * 200  # pasted
            await press(pilot, app, "enter")
            notes = [n.message for n in app._notifications]
            assert any(n.startswith("Prompt refused: the prompt is empty") for n in notes), notes
            assert any(n.startswith("Prompt refused: the prompt has") and "max_model_len is 128" in n for n in notes)
            assert not app.main.run.session._pending
            await press(pilot, app, "slash", *"Hello xylophone", "enter")  # "x" is typed, not the A/B key
            notes = [n.message for n in app._notifications]
            assert any(n.startswith("Queued (") for n in notes) and not any(n.startswith("A/B") for n in notes)
            assert "queued 1 (joins at the next step)" in _where_text(app)  # listed before it joins
            await press(pilot, app, "s", "s")
            assert app.main.pos == Pos(2, BEGIN) and app.main.run.session.error is None
            assert "queued" not in _where_text(app)
            assert len(app.main.ctx.timeline.event(1)["batch"]["seqs"]) >= 1
    finally:
        app.shutdown()
        drain(builtin_small)


async def test_footer_while_typing_shows_no_debugger_keys(live):
    """D14: with the prompt focused the footer does not advertise S, ? or q (they would type into it)."""
    app = live()
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        shown = lambda: {k.action for k in app.main.query("FooterKey")}  # noqa: E731
        assert {"back_step", "help", "quit"} <= shown()
        box = app.main.query_one("#prompt")
        assert box.placeholder.startswith("press /")  # the line says how to start typing, not what to do inside
        await press(pilot, app, "slash")
        await pilot.pause(0.1)
        assert not {"back_step", "help", "quit", "step"} & shown() and "unfocus" in shown()
        assert "Enter sends it" in box.placeholder
        await press(pilot, app, "escape")
        await pilot.pause(0.1)
        assert box.placeholder.startswith("press /")
        assert "back_step" in shown()


async def test_an_engine_error_fails_that_request_alone(live):
    """D1/D10: a step that raises fails the request that joined in it; the others go on in a new session."""
    app = live(max_tokens=8)
    state = {"armed": False, "fired": 0}

    def boom(site: str, tensor, info) -> None:
        if site == hooks.STEP_BEGIN:
            for s in info["batch"].seqs:
                if s.token_ids[:4] == [60, 61, 62, 63] and s.num_computed_tokens == 0:
                    state["armed"], state["victim"] = True, s.seq_id
        elif site == "layers.1.attn.q" and state["armed"] and not state["fired"]:
            state["fired"] += 1
            raise RuntimeError("kernel exploded\nsecond line")

    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        m = app.main
        await press(pilot, app, "s", "s")
        ids = m.run.submit([60, 61, 62, 63])
        hooks.attach(boom)
        try:
            await press(pilot, app, "s", "s")
        finally:
            hooks.detach(boom)
        assert state["fired"] == 1 and len(ids) == 4
        notes = " ".join(n.message for n in app._notifications)
        assert f"Failed alone: #{state['victim']}" in notes and "kernel exploded" in notes
        assert "second line" not in notes
        assert m.ctx.mode == "live head" and "running" not in m.ctx.reason
        await press(pilot, app, "s", "w")
        rows = table_text(app, "requests")
        assert "error (RuntimeError: kernel exploded)" in rows
        await press(pilot, app, "g")  # the history before the restart stays browsable
        assert m.pos == Pos(0, BEGIN) and m.ctx.timeline.event(0) is not None
        await press(pilot, app, "G", "R")  # restart without quitting
        await settle(pilot, app)
        assert m.ctx.mode == "live head" and "restarted" in m.ctx.timeline.title()


async def test_record_mid_run_then_replay_keeps_prompts_and_keys(live, tmp_path):
    """D3: a recording started at step 2 lists the running requests (prompts, text so far) and the cached keys,
    so replay shows prompts and attention weights for keys written before it began."""
    app = live(max_tokens=5)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        await press(pilot, app, "s", "s", "s", "r")
        path = app.main.ctx.recording
        assert path and os.path.isfile(os.path.join(path, "manifest.json"))
        await press(pilot, app, "n", "s", "s", "r")
        assert app.main.ctx.recording is None
    reader = TraceReader(path)
    assert "catchup.k" in reader.tensor_keys(0)  # the step open when recording began holds the cached keys
    reqs = reader.requests()
    assert len(reqs) == 2 and all(r["prompt"] and r["prompt_token_ids"] for r in reqs.values())
    assert all(r["text"] for r in reqs.values())  # what was generated before the recording is there too
    replay = DebuggerApp(trace=path)
    async with replay.run_test(size=SIZE) as pilot:
        await settle(pilot, replay)
        assert "(no tokens yet)" not in text(replay, "where")  # the text generated before the recording began
        await press(pilot, replay, "w")
        assert "(prompt not recorded)" not in table_text(replay, "requests")
        await press(pilot, replay, "n", "a")
        shown = text(replay, "attention")
        assert "cache snapshot taken when the recording began" in shown and "no weights" not in shown


async def test_heatmap_of_a_recording_started_mid_run_labels_rows_with_engine_steps(live, tmp_path):
    """A recording begun at step 2 replays with 'step 2 (#0 here)'; the heatmap names the same step numbers
    (it labelled rows with the trace's own index: 'cell: step 0' beside 'step 2')."""
    app = live(max_tokens=5)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        await press(pilot, app, "s", "s", "r")
        path = app.main.ctx.recording
        await press(pilot, app, "s", "s", "r")
    replay = DebuggerApp(trace=path)
    async with replay.run_test(size=SIZE) as pilot:
        await settle(pilot, replay)
        first = replay.main.ctx.timeline.event(0)["step"]
        assert first > 0 and f"step {first} (#0 here)" in text(replay, "where")
        await press(pilot, replay, "h")
        await settle(pilot, replay)
        assert f"cell: step {first}, layer 0" in text(replay, "heatmap")
        grid = replay.main.query_one("#heat-grid")
        assert grid.render_line(0).text.split()[0] == str(first)
        await press(pilot, replay, "down", "enter")
        assert replay.main.pos.step == 1 and f"heatmap cell (step {first + 1}, layer 0)" in replay.main.ctx.reason
