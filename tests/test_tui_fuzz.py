"""minillama-tui on traces from strangers: mutated traces (the trace fuzz's damage) opened in replay.

Allowed outcomes: the trace opens and every view draws, or the error screen says why in words. Never
an exception escaping a view, a hang, or markup from the trace rendered.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import threading

import pytest

from minillama.trace import TraceError
from minillama.trace.reader import TraceReader
from minillama_tui.app import DebuggerApp
from minillama_tui.opening import Loaded, LoadFailed
from minillama_tui.screen import DebugScreen
from minillama_tui.screens.error import ErrorScreen
from tests.test_trace_fuzz import mutate
from tests.traces import record_trace
from tests.tui_pilot import anyio_backend, settle

__all__ = ["anyio_backend"]  # fixture
pytestmark = pytest.mark.anyio
VIEW_KEYS = ["n", "i", "k", "a", "d", "w", "h", "s", "G", "S", "g"]


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_llama_dir) -> str:
    return record_trace(tmp_path_factory.mktemp("tui-fuzz") / "base", tiny_llama_dir, ["w5 w6 w7", "w8 w9"],
                        max_tokens=3, shadow="torch", full=["layers.0.mlp.out", "layers.0.attn.q", "layers.0.attn.k"])


async def _opened(pilot, app: DebuggerApp) -> bool:
    """True once the trace is open, False once the error screen says why (within 30 s)."""
    for _ in range(1500):
        if isinstance(app.screen, ErrorScreen):
            return False
        m = app.main
        if m is not None and m.loaded:
            await settle(pilot, app, timeout=30)
            return not isinstance(app.screen, ErrorScreen)
        await pilot.pause(0.02)
    raise AssertionError("the trace neither opened nor was refused within 30 s")


async def test_mutated_traces_open_or_say_why(base, tmp_path):
    decoy = str(tmp_path / "outside.json")
    with open(decoy, "w") as f:
        f.write('{"format": "minillama-trace", "version": 2}\n')
    rng = random.Random(4321)
    seen = {"opened": 0, "refused": 0}
    for k in range(30):
        path = str(tmp_path / f"m{k}")
        shutil.copytree(base, path)
        what = mutate(path, rng, decoy)
        app = DebuggerApp(trace=path)
        try:
            async with app.run_test(size=(120, 40)) as pilot:
                if await _opened(pilot, app):
                    seen["opened"] += 1
                    for key in VIEW_KEYS:
                        await pilot.press(key)
                        if isinstance(app.screen, ErrorScreen):
                            break
                        await settle(pilot, app, timeout=30)
                else:
                    seen["refused"] += 1
                    assert "\n" not in app.screen.message and app.screen.message, (what, app.screen.message)
        except Exception as e:  # pragma: no cover - what the test is for
            pytest.fail(f"mutation {k} ({what}): {type(e).__name__}: {e}")
        shutil.rmtree(path, ignore_errors=True)
    assert seen["opened"] >= 3 and seen["refused"] >= 3, seen


def _damage_first_step(path: str, how: str) -> None:
    ev = os.path.join(path, "events.jsonl")
    with open(ev, "rb") as f:
        lines = f.read().split(b"\n")
    if how == "json":  # one flipped byte: the line no longer parses
        lines[0] = lines[0].replace(b'"phase": ', b'"phase"; ', 1)
    elif how == "utf8":
        lines[0] = lines[0].replace(b'"prefill"', b'"pre\xacill"', 1)
    else:  # parses, but its data lies outside data.bin
        lines[0] = lines[0].replace(b'"data": [0, ', b'"data": [900000, ', 1)
    with open(ev, "wb") as f:
        f.write(b"\n".join(lines))


@pytest.mark.parametrize("how", ["json", "utf8", "data"])
async def test_damaged_first_step_refused_while_opening(base, tmp_path, monkeypatch, how):
    """CI's mutation 11: the load worker's message was queued on the screen before a pilot pause queued its
    callbacks; the screen's handler then read the damaged step 0 on the UI thread and raised, which ends
    a widget's message loop for good, so the pause waited 30 s for a callback that never ran. Replayed
    here deterministically: the trace is refused by the load worker, and no message loop stops."""
    path = str(tmp_path / "t")
    shutil.copytree(base, path)
    _damage_first_step(path, how)
    held: list = []
    post = DebugScreen.post_message

    def hold(self, message):  # the load worker's message waits for the moment the test picks
        if isinstance(message, Loaded | LoadFailed) and threading.current_thread() is not threading.main_thread():
            held.append(message)
            return True
        return post(self, message)

    monkeypatch.setattr(DebugScreen, "post_message", hold)
    app = DebuggerApp(trace=path)
    async with app.run_test(size=(120, 40)) as pilot:
        for _ in range(1500):
            if held:
                break
            await asyncio.sleep(0.02)
        assert held, "the load worker posted nothing within 30 s"
        post(app.main, held[0])
        await asyncio.wait_for(pilot.pause(), 10)  # queues its callbacks behind the load worker's message
        await asyncio.wait_for(pilot.pause(0.05), 10)
        assert isinstance(app.screen, ErrorScreen) and app.screen.title_text == "Cannot open the trace"
        message = app.screen.message
        assert not app.main.loaded and "\n" not in message and ("events.jsonl" in message or "data.bin" in message), \
            message
        await asyncio.wait_for(pilot.press("q"), 10)
    assert app.return_code == 0


@pytest.mark.parametrize("key", ["s", "G", "right_square_bracket", "a"])
async def test_trace_error_on_the_ui_thread_keeps_the_app_responsive(base, monkeypatch, key):
    """A step that cannot be read when a key (or a view's redraw) asks for it on the UI thread ends in the
    error screen, and the app keeps handling keys: a key's action runs in the app's own message loop,
    which an escaping ``TraceError`` would stop (no key handled again, ``q`` included)."""
    app = DebuggerApp(trace=base)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app, timeout=30)
        step = TraceReader.step

        def damaged(self, i):
            if threading.current_thread() is threading.main_thread():
                raise TraceError(f"step {i} is damaged (planted)")
            return step(self, i)

        monkeypatch.setattr(TraceReader, "step", damaged)
        await asyncio.wait_for(pilot.press(key), 10)
        await asyncio.wait_for(pilot.pause(0.05), 10)
        assert isinstance(app.screen, ErrorScreen), key
        assert app.screen.title_text == "Cannot read the trace" and "(planted)" in app.screen.message
        await asyncio.wait_for(pilot.press("q"), 10)
    assert app.return_code == 0


async def test_a_damaged_blob_met_by_the_heatmap_ends_in_the_error_screen(base, monkeypatch):
    """The heatmap reads every step's blob (in slices on the UI thread): one that cannot be read ends in
    the error screen with its line, and the keys keep working."""
    app = DebuggerApp(trace=base)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app, timeout=30)

        def damaged(self, i, names, span=...):
            raise TraceError(f"step {i}'s blob is damaged (planted)")

        monkeypatch.setattr(TraceReader, "step_arrays", damaged)
        await asyncio.wait_for(pilot.press("h"), 10)
        for _ in range(100):
            if isinstance(app.screen, ErrorScreen):
                break
            await asyncio.wait_for(pilot.pause(0.02), 10)
        assert isinstance(app.screen, ErrorScreen) and "(planted)" in app.screen.message
        await asyncio.wait_for(pilot.press("q"), 10)
    assert app.return_code == 0
