"""minillama-tui on traces from strangers: mutated traces (the trace fuzz's damage) opened in replay.

Allowed outcomes: the trace opens and every view draws, or the error screen says why in words. Never
an exception escaping a view, a hang, or markup from the trace rendered.
"""

from __future__ import annotations

import random
import shutil

import pytest

from minillama_tui.app import DebuggerApp
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
