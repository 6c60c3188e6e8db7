"""Pilot tests of minillama-tui: live stepping on the built-in model, breakpoints, history, recording and
replay, the diff view on a planted error, and errors shown as messages."""

from __future__ import annotations

import asyncio
import os

import pytest
import torch

from minillama import hooks
from tui.app import DebuggerApp, main
from tui.navigation import BEGIN, Pos
from tui.screens.error import ErrorScreen
from tui.screens.help import HelpScreen
from tui.sources import LiveOptions
from tui.synthetic import write_synthetic_trace

pytestmark = pytest.mark.anyio

SIZE = (120, 40)
PROMPTS = ["What is the capital of France?", "Name three colours."]


# ---- fixtures -----------------------------------------------------------------------------------
@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def tui_llm():
    """The built-in model with a small token budget (chunked prefill shows) and a small KV cache."""
    from minillama import LLM

    return LLM(None, device="cpu", max_model_len=512, num_kvcache_blocks=64, max_num_batched_tokens=64)


@pytest.fixture
def live(tui_llm, tmp_path):
    """Make a live app on the shared model; afterwards finish whatever the test left in the engine."""
    made: list[DebuggerApp] = []

    def make(**kw) -> DebuggerApp:
        opts = LiveOptions(prompts=kw.pop("prompts", PROMPTS), max_tokens=kw.pop("max_tokens", 3), **kw)
        app = DebuggerApp(options=opts, llm=tui_llm, record_dir=str(tmp_path / "traces"))
        made.append(app)
        return app

    yield make
    for app in made:
        app.shutdown()
    while tui_llm.has_unfinished():  # leave the shared engine idle for the next test
        tui_llm.step()


@pytest.fixture(scope="module")
def synthetic_trace(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("synthetic") / "demo")
    write_synthetic_trace(path)
    return path


async def settle(pilot, app: DebuggerApp, timeout: float = 60.0) -> None:
    """Wait until the app has loaded and the engine is not running."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not app.loaded or app.running or app.queue:
        if loop.time() > end:
            raise AssertionError(f"the app did not settle: loaded={app.loaded} running={app.running}")
        await pilot.pause(0.02)
    await pilot.pause()


async def press(pilot, app: DebuggerApp, *keys: str) -> None:
    for k in keys:
        await pilot.press(k)
        await settle(pilot, app)


def where_text(app: DebuggerApp) -> str:
    from tui.widgets.where import WhereView

    view = app.query_one(WhereView)
    return str(view.render_state(view.state).renderables[0]) if view.state else ""


def view_text(app: DebuggerApp, name: str) -> str:
    """The plain text a view renders for the current cursor."""
    from rich.console import Console

    from tui.widgets.base import TimelineView

    view = app.query_one(f"#{name}", TimelineView)
    console = Console(width=118, record=True, file=open(os.devnull, "w"))
    console.print(view.render_state(app.state()))
    return console.export_text()


# ---- live -----------------------------------------------------------------------------------------
async def test_live_step_by_layer_and_by_step(live):
    app = live()
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        assert app.cursor == Pos(0, BEGIN) and app.mode() == "live head"
        assert "step 0" in where_text(app) and "prefill" in where_text(app)
        await press(pilot, app, "n")
        assert app.cursor == Pos(0, "layers.0.output")
        assert app.session.position.site == "layers.0.output"
        await press(pilot, app, "n")
        assert app.cursor == Pos(0, "layers.1.output")
        assert "layer 1" in where_text(app)
        ev = app.source.event(0)
        assert ev["batch"]["seqs"][0]["chunk"] == [0, 37]  # the token budget of 64 chunks the second prompt
        assert ev["batch"]["seqs"][1]["chunk"][1] < ev["batch"]["seqs"][1]["prompt_len"]
        await press(pilot, app, "s")
        assert app.cursor == Pos(1, BEGIN) and app.session.position.step == app.source.engine_step(1)
        assert "step" in app.reason
        # the inspector splits the flat rows per request and shows values (live keeps full tensors)
        await press(pilot, app, "n", "i")
        text = view_text(app, "inspector")
        ids = [s["seq_id"] for s in app.source.event(1)["batch"]["seqs"]]  # ids are global across engines
        assert "layers.0.output" in text and "last row" in text
        assert all(f"#{i}" in text for i in ids) and len(ids) >= 2
        # the text of request 0 grows once its first token is sampled
        assert app.state().requests[app.state().seqs[0]["seq_id"]]["tokens"] >= 1


async def test_live_breakpoint_hit(live):
    app = live()
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        await press(pilot, app, "n", "n", "n")  # layers.2.output of step 0
        await press(pilot, app, "b")
        assert any(bp.pattern == "layers.2.output" for bp in app.session.breakpoints)
        await press(pilot, app, "c")
        assert app.cursor == Pos(1, "layers.2.output")
        assert app.reason.startswith("breakpoint: layers.2.output")
        assert "breakpoint" in where_text(app)
        await press(pilot, app, "b")  # toggles it off again
        assert not app.session.breakpoints


async def test_live_reverse_stepping_over_history(live):
    app = live(max_tokens=6)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        await press(pilot, app, "s", "s")
        head = app.head
        assert head == Pos(2, BEGIN)
        await press(pilot, app, "S")
        assert app.cursor == Pos(1, BEGIN) and app.mode() == "history (read-only)"
        await press(pilot, app, "p")
        assert app.cursor == Pos(0, "logits")  # back over a step boundary lands on the last layer stop
        await press(pilot, app, "p")
        assert app.cursor == Pos(0, "layers.29.output")
        # history shows the finished step's tensors (read-only): the inspector has values
        assert "last row" in view_text(app, "inspector")
        assert app.session.position.step == app.source.engine_step(2)  # the engine did not move
        await press(pilot, app, "s")
        assert app.cursor == Pos(1, BEGIN) and not app.following
        await press(pilot, app, "s")  # stepping forward onto the head returns to live
        assert app.cursor == head and app.following and app.mode() == "live head"
        await press(pilot, app, "s")  # and now the engine runs again
        assert app.cursor == Pos(3, BEGIN)


async def test_record_then_replay(live, tmp_path):
    app = live()
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        await press(pilot, app, "r")
        assert app.session.recording and app.record_path.startswith(str(tmp_path / "traces" / "live-"))
        assert "REC" in where_text(app)
        await press(pilot, app, "s", "s")
        await press(pilot, app, "r")
        assert not app.session.recording
        path = app.record_path
    assert os.path.isfile(os.path.join(path, "manifest.json"))
    replay = DebuggerApp(trace=path)
    async with replay.run_test(size=SIZE) as pilot:
        await settle(pilot, replay)
        assert replay.mode() == "replay" and replay.source.num_steps() == 2
        assert replay.cursor == Pos(0, BEGIN)
        await press(pilot, replay, "n", "n")
        assert replay.cursor == Pos(0, "layers.1.output")
        await press(pilot, replay, "s", "p")
        assert replay.cursor == Pos(0, "logits")
        await press(pilot, replay, "r")  # read-only: a notice, no crash
        assert replay.session is None


async def test_replay_forward_and_backward(synthetic_trace):
    app = DebuggerApp(trace=synthetic_trace)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        assert app.source.num_steps() == 5
        await press(pilot, app, "s", "s", "n", "n")
        assert app.cursor == Pos(2, "layers.1.output")
        await press(pilot, app, "full_stop")
        assert app.cursor == Pos(2, "layers.2.input")
        await press(pilot, app, "comma", "p")
        assert app.cursor == Pos(2, "layers.0.output")
        await press(pilot, app, "p", "p")
        assert app.cursor == Pos(1, "logits")
        await press(pilot, app, "S", "S", "S")
        assert app.cursor == Pos(0, BEGIN)
        await press(pilot, app, "S")  # nothing before the first step: stays
        assert app.cursor == Pos(0, BEGIN)
        await press(pilot, app, "G")
        assert app.cursor == Pos(4, BEGIN)
        await press(pilot, app, "s")  # past the end: stays, with a notice
        assert app.cursor == Pos(4, BEGIN)
        # a breakpoint over the recording: c searches forward (and across steps)
        await press(pilot, app, "g", "n", "n", "b")
        assert app.cursor == Pos(0, "layers.1.output")
        await press(pilot, app, "c")
        assert app.cursor == Pos(1, "layers.1.output") and app.reason.startswith("breakpoint")


async def test_diff_view_names_the_planted_layer_in_a_trace(live):
    """A listener adds 0.5 to layer 4's active attention output; the recorded shadow reference exposes it."""

    def plant(site: str, tensor, info) -> None:
        if site == "layers.4.attn.call":
            tensor.add_(0.5)

    hooks.attach(plant)  # before the session's own listener
    try:
        app = live(shadow="reference", prompts=PROMPTS[:1], max_tokens=2)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot, app)
            await press(pilot, app, "r", "s", "r")
            path = app.record_path
            await press(pilot, app, "d", "S")
            assert "first layer over threshold: layer 4" in view_text(app, "diff")  # live history says it too
    finally:
        hooks.detach(plant)
    replay = DebuggerApp(trace=path)
    async with replay.run_test(size=SIZE) as pilot:
        await settle(pilot, replay)
        await press(pilot, replay, "d")
        text = view_text(replay, "diff")
        assert "first layer over threshold: layer 4" in text
        assert "layer 3" not in text.split("\n")[0]
        # the attention view shows the 0.5 difference at layer 4
        await press(pilot, replay, *["n"] * 5, "a")
        assert replay.cursor.site == "layers.4.output"
        assert "0.5" in view_text(replay, "attention")


async def test_attention_weights_match_the_engine(live):
    """Weights recomputed from q and the cached keys reproduce the engine's attention output."""
    from tui.widgets.attention import attention_weights

    app = live(prompts=PROMPTS[:1])
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        await press(pilot, app, "n", "n", "n")  # end of layer 2, step 0
        st = app.state()
        seq = st.chosen_seq()
        upto = seq["num_computed"] + seq["num_new"]
        keys = app.source.keys(st.step, 2, seq, upto)
        assert keys.k is not None and keys.note == "current cache"
        q = app.source.tensor(st.step, "layers.2.attn.q")
        out = app.source.tensor(st.step, "layers.2.attn.out")
        cache = app.session.llm.runner.kv_cache
        bs = cache.shape[3]
        slots = torch.tensor([seq["block_table"][p // bs] * bs + p % bs for p in range(upto)])
        v = cache[1, 2].reshape(-1, *cache.shape[4:])[slots].double()
        for head in (0, 4, 8):
            w = attention_weights(q, keys.k, head, seq["num_computed"])
            mine = w @ v[:, head // 3]
            torch.testing.assert_close(mine.float(), out[:, head].float(), atol=1e-4, rtol=1e-4)
        await press(pilot, app, "a")
        assert "current cache" in view_text(app, "attention")


# ---- errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["missing", "empty", "file"])
async def test_bad_trace_path_gives_a_clear_message(tmp_path, kind):
    path = {"missing": tmp_path / "nope", "empty": tmp_path, "file": tmp_path / "x.txt"}[kind]
    if kind == "file":
        path.write_text("hello")
    app = DebuggerApp(trace=str(path))
    async with app.run_test(size=SIZE) as pilot:
        for _ in range(100):
            if isinstance(app.screen, ErrorScreen):
                break
            await pilot.pause(0.02)
        assert isinstance(app.screen, ErrorScreen)
        msg = app.screen.message
        assert str(path) in msg and "Traceback" not in msg and "\n" not in msg
        assert {"missing": "does not exist", "empty": "not a minillama trace", "file": "is a file"}[kind] in msg
        await pilot.press("escape")  # fatal: escape does not leave an empty app behind
        assert isinstance(app.screen, ErrorScreen)
        await pilot.press("q")
    assert app.return_code in (0, None)


async def test_engine_error_is_shown_not_dumped(live):
    def boom(site: str, tensor, info) -> None:
        if site == "layers.3.attn.q":
            raise RuntimeError("kernel exploded\nsecond line")

    app = live(prompts=PROMPTS[:1])
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        hooks.attach(boom)
        try:
            await pilot.press("s")
            for _ in range(500):
                if isinstance(app.screen, ErrorScreen):
                    break
                await pilot.pause(0.02)
        finally:
            hooks.detach(boom)
        assert isinstance(app.screen, ErrorScreen)
        assert app.screen.message.startswith("RuntimeError: kernel exploded")
        assert "second line" not in app.screen.message and "Traceback" not in app.screen.message
        await pilot.press("escape")
        await press(pilot, app, "S")  # history stays browsable
        assert app.mode() == "history (read-only)"
        await press(pilot, app, "s")  # stepping forward does not crash either
    # the engine died mid-step: drop its unfinished request so the shared engine stays usable
    sched = app.session.llm.scheduler
    for seq in list(sched.running):
        sched._preempt(seq)
    sched.waiting.clear()


async def test_help_screen_and_palette_commands(synthetic_trace):
    app = DebuggerApp(trace=synthetic_trace)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)
        await pilot.press("f1")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        titles = [c.title for c in app.get_system_commands(app.screen)]
        assert "Breakpoint: NaN or Inf anywhere" in titles and "Clear all breakpoints" in titles
        app.add_breakpoint("layers.*.attn.out", "shadow", 1e-3)
        await press(pilot, app, "c")
        assert app.cursor == Pos(0, "layers.2.attn.out")  # the planted layer of the synthetic trace


def test_cli_rejects_bad_numbers(capsys):
    assert main(["--max-tokens", "0"]) == 2
    assert "--max-tokens: must be a positive integer" in capsys.readouterr().err
