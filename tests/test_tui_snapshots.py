"""SVG snapshots of every view, replaying a synthetic trace (fixed content: the same on every machine).

Regenerate with ``pytest tests/test_tui_snapshots.py --snapshot-update`` after a deliberate change, and
look at the SVGs in tests/__snapshots__/ before committing them.
"""

from __future__ import annotations

import pytest

from tui.app import DebuggerApp
from tui.synthetic import write_synthetic_trace

WIDE, SMALL = (120, 40), (80, 24)


@pytest.fixture(scope="module")
def demo_trace(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("snap") / "demo")  # the title shows only the folder's name
    write_synthetic_trace(path)
    return path


def keys(*presses: str):
    """A ``run_before`` that waits for the trace to open, then presses ``presses``."""

    async def run(pilot) -> None:
        app = pilot.app
        while not app.loaded and not app.failed:
            await pilot.pause(0.02)
        for k in presses:
            await pilot.press(k)
            await pilot.app.workers.wait_for_complete()
        await pilot.pause()

    return run


@pytest.mark.parametrize("name,presses,size", [
    ("inspector_mixed_step", ("s", "s", "n", "n"), WIDE),
    ("kv_prefix_hit", ("s", "k"), WIDE),
    ("attention_planted_layer", ("s", "n", "n", "n", "a", "right_square_bracket"), WIDE),
    ("diff_planted_layer", ("s", "s", "n", "n", "n", "d"), WIDE),
    ("requests_last_step", ("G", "w"), WIDE),
    ("help", ("question_mark",), WIDE),
    ("small_inspector", ("s", "n", "n"), SMALL),
    ("small_kv", ("s", "s", "k"), SMALL),
    ("small_diff", ("d",), SMALL),
])
def test_view_snapshot(snap_compare, demo_trace, name, presses, size):
    assert snap_compare(DebuggerApp(trace=demo_trace), run_before=keys(*presses), terminal_size=size)


def test_bad_trace_snapshot(snap_compare):
    assert snap_compare(DebuggerApp(trace="no/such/trace"), run_before=keys(), terminal_size=SMALL)
