"""Pilot tests of minillama-tui in replay: moving, every view, the one judging rule, the heatmap, ``f``, the
locator, A/B, the KV map at real sizes, and the defects of issue 11 (each named where it is tested)."""

from __future__ import annotations

import pytest
from rich.text import Text

from minillama.debug.navigation import BEGIN, Pos
from minillama_tui.app import DebuggerApp
from minillama_tui.cli import main
from minillama_tui.screens.error import ErrorScreen
from tests.tui_pilot import SHIPPED, anyio_backend, clean, planted, preempted, press, settle, table_text, text
from tests.tui_traces import DELTA, DIM, HEAD, LAYER, PROMPTS

__all__ = ["anyio_backend", "clean", "planted", "preempted"]  # fixtures
pytestmark = pytest.mark.anyio
SIZE = (120, 40)


async def test_moves_both_ways_and_G_goes_to_the_end(planted):
    """D12: G ends at the last site of the last step, not at its start."""
    app = DebuggerApp(trace=planted)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        m = app.main
        assert m.pos == Pos(0, BEGIN) and m.ctx.mode == "replay"
        await press(pilot, app, "n", "n")
        assert m.pos == Pos(0, "layers.1.output")
        await press(pilot, app, "full_stop")
        assert m.pos == Pos(0, "layers.2.input")
        await press(pilot, app, "comma", "p")
        assert m.pos == Pos(0, "layers.0.output")
        await press(pilot, app, "s", "p")
        assert m.pos == Pos(0, "logits")
        await press(pilot, app, "G")
        last = m.ctx.timeline.num_steps() - 1
        assert m.pos == Pos(last, m.ctx.timeline.site_names(last)[-1]) and m.pos.site == "sampled"
        await press(pilot, app, "g", "S")
        assert m.pos == Pos(0, BEGIN)


async def test_requests_show_their_prompts_from_step_0(planted):
    """D2: the requests view shows each prompt at step 0 (no 'before the recording'), in a table."""
    app = DebuggerApp(trace=planted)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        await press(pilot, app, "w")
        rows = table_text(app, "requests")
        assert "w5 w6 w7" in rows and "w40 w41" in rows and "before the recording" not in rows
        assert "prompt: w5 w6 w7" in text(app, "requests")


async def test_shipped_format_1_trace_opens_and_says_why_stats_are_whole_batch():
    """The shipped H200 trace (format 1) replays; D2 and D4 on it: prompts shown, one rule everywhere."""
    app = DebuggerApp(trace=SHIPPED)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        await press(pilot, app, "n")
        assert "format 1 keeps whole-batch ones only" in text(app, "inspector")
        await press(pilot, app, "w")
        assert "What is the capital of France?" in table_text(app, "requests")
        await press(pilot, app, "d")
        assert "all 30 layers within the error budget" in text(app, "diff")
        # D4: the palette's shadow breakpoint is the same rule: it does not stop at layer 14
        app.main.add_breakpoint("layers.*.attn.out", "shadow")
        await press(pilot, app, "g", "c")
        assert app.main.ctx.reason == "end of trace" and app.main.pos.step == app.main.ctx.timeline.num_steps() - 1


async def test_rule_breakpoint_and_diff_view_agree_on_the_planted_layer(planted):
    """D4 on a real error: the breakpoint, the diff view and the heatmap name the same layer and reason."""
    app = DebuggerApp(trace=planted)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        app.main.add_breakpoint("layers.*.attn.out", "shadow")
        await press(pilot, app, "c")
        assert app.main.pos == Pos(0, f"layers.{LAYER}.attn.out")
        assert app.main.ctx.reason.startswith("breakpoint: layers.*.attn.out if shadow over 2x budget")
        await press(pilot, app, "d")
        head = text(app, "diff").splitlines()[0]
        assert f"first layer over the budget: layer {LAYER}" in head and "max-abs error" in head
        assert "OVER" in table_text(app, "diff").splitlines()[LAYER]


async def test_heatmap_f_and_enter_jump(planted):
    """The steps x layers map, f (first over the rule, with why) and Enter on a cell."""
    app = DebuggerApp(trace=planted)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        await press(pilot, app, "h")
        shown = text(app, "heatmap")
        assert "cells over the budget" in shown and "step × layer" in shown
        await press(pilot, app, "f")
        assert app.main.pos == Pos(0, f"layers.{LAYER}.attn.out")
        assert app.main.ctx.reason.startswith("over the budget: active backend's")
        await press(pilot, app, "f")  # the next one: the same layer one step later
        assert app.main.pos == Pos(1, f"layers.{LAYER}.attn.out")
        grid = app.main.query_one("#heat-grid")
        assert app.screen.focused is grid
        await press(pilot, app, "down", "right", "enter")
        assert app.main.pos == Pos(2, f"layers.{LAYER + 1}.attn.out")


async def test_heatmap_without_a_shadow_does_not_claim_every_cell_within_the_budget(preempted):
    """A run without a shadow has nothing to judge: the heatmap says so (it said 'every cell within the budget')."""
    app = DebuggerApp(trace=preempted)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        await press(pilot, app, "h")
        shown = text(app, "heatmap")
        assert "no shadow attention in this run" in shown and "within the budget" not in shown


async def test_locator_finds_the_planted_element(planted):
    """D11: l finds the largest |active - shadow| (request, token, head, dimension) and moves the slice there."""
    app = DebuggerApp(trace=planted)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        await press(pilot, app, "n", "n", "a")
        shown = text(app, "attention")
        assert f"head {HEAD}, dim {DIM}" in shown and "largest |active - shadow| = 0.25" in shown
        await press(pilot, app, "l")
        batch = app.main.ctx.timeline.event(0)["batch"]
        last = batch["seqs"][-1]
        m = app.main
        assert (m.seq_id, m.head, m.col, m.row) == (last["seq_id"], HEAD, DIM, last["num_new"] - 1)
        shown = text(app, "attention")
        assert f"token {last['chunk'][1] - 1} 'w{PROMPTS[1][-1]}' (row {last['num_new']} of {last['num_new']}), " \
               f"head {HEAD}" in shown  # the token's text, from the tokenizer of the model the trace names
        assert f"{DELTA:g}" in shown.split("difference")[1].splitlines()[0]
        assert "weights of head" in shown and "strongest keys" in shown


async def test_inspector_rows_heads_logits_and_sampled(planted):
    """Any row / head / column of a full tensor; top-k for the logits; the sampled token's text."""
    app = DebuggerApp(trace=planted)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        await press(pilot, app, "n", *["full_stop"] * 5)  # layers.1.attn.out
        assert app.main.pos.site == f"layers.{LAYER}.attn.out"
        await press(pilot, app, "l")
        shown = text(app, "inspector")
        assert f"head {HEAD}" in shown and "largest |value - shadow|" in shown
        await press(pilot, app, "up", "minus")
        assert app.main.row >= 0 and app.main.head == HEAD - 1
        await press(pilot, app, "n", "n", "n")
        assert app.main.pos.site == "logits"
        assert "top tokens (softmax of the logits)" in text(app, "inspector")
        await press(pilot, app, "full_stop")
        assert app.main.pos.site == "sampled" and "sampled:" in text(app, "inspector")


async def test_kv_map_compresses_free_runs_and_marks_written_blocks():
    """D6/D7: 1,024 blocks print as a few cells and one free run; written blocks get a background."""
    app = DebuggerApp(trace=SHIPPED)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        await press(pilot, app, "k")
        view = app.main.query_one("#kv")
        shown = text(app, "kv")
        assert "··×1022" in shown and len(shown.strip().splitlines()) < 16
        grid = view.render_view().renderables[1]
        assert any("on #af5f00" in str(span.style) for span in grid.spans)


async def test_recompute_after_preemption_is_labelled(preempted):
    """D13: a request run again after preemption is a recompute, not a prefill past its prompt."""
    app = DebuggerApp(trace=preempted)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        tl = app.main.ctx.timeline
        step = next(i for i in range(tl.num_steps()) if any(s["recompute"] for s in tl.event(i)["batch"]["seqs"]))
        app.main.pos = Pos(step)
        await settle(pilot, app)
        where = text(app, "where")
        assert "recompute 0-33/33 after preemption" in where and "prefill 0-33/30" not in where


async def test_ab_compare_matches_requests_and_finds_the_first_divergence(planted, clean):
    """A/B: two runs in lockstep, requests matched by prompt ids, both values, the first diverging site."""
    app = DebuggerApp(trace=planted, compare=clean)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        assert app.main.view == "compare" and app.main.ctx.mode == "A/B replay"
        shown = text(app, "compare")
        assert "requests matched by prompt token ids" in shown
        assert f"first site over 0.001: step 0 layers.{LAYER}.attn.out" in shown
        rows = table_text(app, "compare")
        assert "layers.0.attn.out" in rows and "equal" in rows.split("layers.0.attn.out")[1].splitlines()[0]
        await press(pilot, app, "f")
        assert app.main.pos == Pos(0, f"layers.{LAYER}.attn.out")
        await press(pilot, app, "i")
        assert "value - B" in text(app, "inspector")


async def test_enter_on_a_diff_row_and_a_request_row(planted):
    app = DebuggerApp(trace=planted)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        await press(pilot, app, "d", "down", "down", "enter")
        assert app.main.pos == Pos(0, "layers.2.attn.out")
        await press(pilot, app, "w", "down", "enter")
        second = app.main.ctx.timeline.event(0)["batch"]["seqs"][1]["seq_id"]
        assert app.main.seq_id == second


async def test_toasts_do_not_stack(planted):
    """D8: pressing s at the end of the trace five times shows one notice, not five."""
    app = DebuggerApp(trace=planted)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        await press(pilot, app, "G", "s", "s", "s", "s", "s")
        assert [n.message for n in app._notifications].count("At the end of the trace.") == 1


async def test_x_without_a_second_trace_says_how_to_get_one(planted):
    """The A/B key in a run with no --compare says what it needs instead of doing nothing."""
    app = DebuggerApp(trace=planted)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        view = app.main.view
        await press(pilot, app, "x", "x")
        notes = [n.message for n in app._notifications]
        assert notes.count("A/B needs a second trace: minillama-tui A --compare B") == 1 and app.main.view == view


async def test_split_layout_from_140_columns(planted):
    app = DebuggerApp(trace=planted)
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(pilot, app)
        shown = {v.id for v in app.main.query(".view") if v.display}
        assert shown == {"diff", "attention", "inspector"}
        await press(pilot, app, "k")
        assert {v.id for v in app.main.query(".view") if v.display} == {"kv", "attention", "inspector"}


@pytest.mark.parametrize("size", [(80, 24), (60, 20)])
async def test_small_terminals_keep_help_and_quit(planted, size):
    """D15: help and quit stay on screen; tables keep request ids whole."""
    app = DebuggerApp(trace=planted)
    async with app.run_test(size=size) as pilot:
        await settle(pilot, app)
        await press(pilot, app, "n")
        keys = {k.action: k for k in app.main.query("FooterKey")}
        for action in ("help", "quit"):
            region = keys[action].region
            assert region.width > 0 and region.right <= size[0], action
        shown = text(app, "inspector", width=size[0] - 4)
        for s in app.main.ctx.timeline.event(0)["batch"]["seqs"]:
            assert f"#{s['seq_id']} " in shown  # whole ids (columns were dropped instead)


async def test_trace_strings_are_text_not_markup(planted, tmp_path):
    """A folder name and a prompt with Rich markup in them are shown as they are, never parsed."""
    import json
    import shutil

    odd = tmp_path / "odd[bold]name[red]"
    shutil.copytree(planted, odd)
    manifest = json.loads((odd / "manifest.json").read_text())
    manifest["requests"][0]["prompt"] = "[/red] [bold]not bold[/bold] [link=x]"
    (odd / "manifest.json").write_text(json.dumps(manifest))
    app = DebuggerApp(trace=str(odd))
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        await press(pilot, app, "w")
        assert "[/red] [bold]not bold[/bold] [link=x]" in table_text(app, "requests")
        assert "[/red] [bold]not bold" in text(app, "requests")
        title = app.main.query_one("#where").border_title
        assert "odd[bold]name[red]" in str(Text.from_markup(title))


async def test_bad_trace_opens_as_one_line_error(tmp_path):
    app = DebuggerApp(trace=str(tmp_path / "nope"))
    async with app.run_test(size=SIZE) as pilot:
        for _ in range(200):
            if isinstance(app.screen, ErrorScreen):
                break
            await pilot.pause(0.02)
        assert isinstance(app.screen, ErrorScreen)
        assert "does not exist" in app.screen.message and "\n" not in app.screen.message


def test_cli_checks_before_loading(tmp_path, capsys):
    """D16: a bad trace path and a shadow/backend/device that cannot run here exit 2 with one line, before
    any model loads."""
    assert main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2  # a folder, but not a trace
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a minillama trace" in err
    assert main(["--max-tokens", "0"]) == 2
    assert "--max-tokens: must be a positive integer" in capsys.readouterr().err
    import torch

    if not torch.cuda.is_available():
        assert main(["--shadow", "flash-attn", "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("minillama-tui: error: --shadow flash-attn") and "--backend" not in err
        assert err.count("\n") == 1
        assert main(["--backend", "flash-attn", "--device", "cpu"]) == 2
        assert "--backend flash-attn" in capsys.readouterr().err
        assert main(["--device", "cuda"]) == 2
        assert "--device cuda" in capsys.readouterr().err
    assert main([str(tmp_path / "empty"), "--compare", str(tmp_path / "nope")]) == 2
    assert main(["--compare", str(tmp_path)]) == 2


async def test_help_and_palette(planted):
    from minillama_tui.screens.help import HelpScreen

    app = DebuggerApp(trace=planted)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        titles = [c.title for c in app.get_system_commands(app.screen)]
        assert "Breakpoint: shadow attention over the error budget" in titles
        assert not any("1e-3" in t for t in titles)


def test_the_inspector_names_a_batch_s_rows_as_one_range():
    """The batch row of the statistics table: adjacent requests' rows merge (4 requests: 0-4, not 0-1, 1-2)."""
    from minillama_tui.format import rows_text

    assert rows_text([(0, 1), (1, 2), (2, 3), (3, 4)]) == "0-4"
    assert rows_text([(5, 9)]) == "5-9" and rows_text([]) == "-"
    assert rows_text([(0, 2), (4, 6), (8, 9)]) == "0-2, 4-6, …"


def test_prompts_that_start_alike_still_differ_in_a_narrow_column():
    """The requests table cuts a long prompt in the middle (80 columns showed two "What is the capit…")."""
    from minillama_tui.format import middle

    a, b = middle("What is the capital of France?", 18), middle("What is the capital of Italy?", 18)
    assert a != b and len(a) == len(b) == 18 and a.endswith("France?") and "…" in a
    assert middle("short", 18) == "short"
