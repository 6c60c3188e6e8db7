"""SVG snapshots of every view at 80x24, 120x40 and 160x48 (the split layout) and 60x20, in replay of the
committed fixture traces (fixed content on every machine) and live on the tiny model.

Regenerate with ``pytest tests/test_tui_snapshots.py --snapshot-update`` after a deliberate change, and
look at the SVGs in tests/__snapshots__/ before committing them.
"""

from __future__ import annotations

import os

import pytest

from minillama.debug.sources import LiveOptions
from minillama_tui.app import DebuggerApp
from tests.tui_pilot import settle, tiny_llm
from tests.tui_traces import DATA, PROMPTS, one_thread

__all__ = ["tiny_llm"]  # fixture
PLANTED, CLEAN = os.path.join(DATA, "tui-planted"), os.path.join(DATA, "tui-clean")
TINY, SMALL, WIDE, SPLIT = (60, 20), (80, 24), (120, 40), (160, 48)
TO_LAYER_1 = ("n", "n", "p", *["full_stop"] * 5)  # layers.1.attn.out of step 0 (where the error is planted)


def keys(*presses: str):
    """A ``run_before`` that waits for the app to open and settle, then presses ``presses`` one by one."""

    async def run(pilot) -> None:
        await settle(pilot, pilot.app)
        for k in presses:
            await pilot.press(k)
            await settle(pilot, pilot.app)
        await pilot.pause()

    return run


REPLAY = [
    ("inspector_located", (*TO_LAYER_1, "l"), WIDE),
    ("kv", ("s", "k"), WIDE),
    ("attention_located", (*TO_LAYER_1, "a", "l"), WIDE),
    ("diff_planted_layer", (*TO_LAYER_1, "d"), WIDE),
    ("requests", ("s", "w"), WIDE),
    ("heatmap", ("h",), WIDE),
    ("help", ("question_mark",), WIDE),
    ("small_inspector", ("n", "n"), SMALL),
    ("small_attention", (*TO_LAYER_1, "a", "l"), SMALL),
    ("small_diff", (*TO_LAYER_1, "d"), SMALL),
    ("small_kv", ("s", "k"), SMALL),
    ("small_heatmap", ("f", "h"), SMALL),
    ("small_requests", ("s", "w"), SMALL),
    ("split_diff_attention_inspector", (*TO_LAYER_1, "l"), SPLIT),
    ("split_heatmap", ("h", "f"), SPLIT),
    ("tiny_inspector", ("n",), TINY),
]
LIVE = [
    ("kv_step_0", ("k",), WIDE),
    ("requests_step_0", ("w",), SMALL),
    ("split_step_0", (), SPLIT),
]


@pytest.mark.parametrize("name,presses,size", REPLAY, ids=[c[0] for c in REPLAY])
def test_replay(snap_compare, name, presses, size):
    assert snap_compare(DebuggerApp(trace=PLANTED), run_before=keys(*presses), terminal_size=size)


@pytest.mark.parametrize("size", [SMALL, WIDE, SPLIT], ids=["80x24", "120x40", "160x48"])
def test_ab(snap_compare, size):
    assert snap_compare(DebuggerApp(trace=PLANTED, compare=CLEAN), run_before=keys(), terminal_size=size)


def test_bad_trace(snap_compare):
    assert snap_compare(DebuggerApp(trace="no/such/trace"), run_before=keys(), terminal_size=SMALL)


@pytest.mark.slow
@pytest.mark.parametrize("name,presses,size", LIVE, ids=[c[0] for c in LIVE])
def test_live(snap_compare, tiny_llm, tmp_path, name, presses, size):
    """Live at states whose content does not depend on the random weights' values (step starts)."""
    import itertools

    from minillama.engine.sequence import Sequence
    from tests.tui_pilot import drain

    Sequence._ids = itertools.count()  # the same request ids (and colours) whichever tests ran before
    opts = LiveOptions(prompts=[list(p) for p in PROMPTS], max_tokens=3, shadow="torch")
    app = DebuggerApp(options=opts, llm=tiny_llm, record_dir=str(tmp_path))
    try:
        with one_thread():
            assert snap_compare(app, run_before=keys(*presses), terminal_size=size)
    finally:
        app.shutdown()
        drain(tiny_llm)
