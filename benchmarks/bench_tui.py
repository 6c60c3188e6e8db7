"""How fast minillama-tui answers: one ``n`` (next layer) and one ``s`` (next step) on the built-in model,
and opening a ~1 GB trace.

    python benchmarks/bench_tui.py                 # prints the numbers
    python benchmarks/bench_tui.py --append        # and appends them to benchmarks/RESULTS.md

Each key is timed from the key press to the redrawn screen (headless Textual at 120x40): the
engine's work (in its worker thread) plus the redraw of the where panel and the visible view.
The redraw alone is timed too, for every view. Targets: ``n`` < 100 ms, ``s`` < 1 s, open < 2 s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tui.app import DebuggerApp  # noqa: E402
from tui.sources import LiveOptions  # noqa: E402
from tui.synthetic import SyntheticSpec, write_synthetic_trace  # noqa: E402

SIZE = (120, 40)
VIEWS = ("inspector", "kv", "attention", "diff", "requests")


#: (end time, cursor, running) of each screen update (layout + compositor + write)
_updates: list[tuple[float, object, bool]] = []


def _watch_screen_updates() -> None:
    """Note when each screen update finishes and what it showed (wraps Textual's private update callback)."""
    from textual.screen import Screen

    orig = Screen._on_timer_update
    if getattr(orig, "_bench", False):
        return

    def patched(self) -> None:
        orig(self)
        app = self.app
        _updates.append((time.perf_counter(), getattr(app, "cursor", None), getattr(app, "running", False)))

    patched._bench = True  # type: ignore[attr-defined]
    Screen._on_timer_update = patched  # type: ignore[method-assign]


async def _settle(pilot, app: DebuggerApp) -> None:
    while not app.loaded or app.running or app.queue:
        await pilot.pause(0.001)
    await pilot.pause()


async def _first_update(t0: float, cursor: object, timeout: float = 30.0) -> float:
    """End time of the first screen update after ``t0`` that showed ``cursor`` with the engine stopped."""
    end = time.perf_counter() + timeout
    while time.perf_counter() < end:
        for t, c, running in _updates:
            if t > t0 and c == cursor and not running:
                return t
        await asyncio.sleep(0.0005)
    raise TimeoutError("no screen update showed the new position")


async def _time_key(pilot, app: DebuggerApp, key: str) -> float:
    """Seconds from posting the key to the end of the first screen update that shows where it went."""
    await _settle(pilot, app)
    await asyncio.sleep(0.05)
    before = app.cursor
    t0 = time.perf_counter()
    app.simulate_key(key)
    while app.cursor == before or app.running or app.queue:  # every timed key moves the cursor
        await asyncio.sleep(0.0005)
    done = await _first_update(t0, app.cursor)
    return done - t0


async def _time_redraw(pilot, app: DebuggerApp, view: str, repeat: int = 5) -> float:
    """Seconds from asking for a redraw to the end of the screen update that shows it."""
    app.action_view(view)
    await pilot.pause()
    times = []
    for _ in range(repeat):
        await asyncio.sleep(0.05)
        t0 = time.perf_counter()
        app._refresh()
        times.append(await _first_update(t0, app.cursor) - t0)
    return statistics.median(times)


async def bench_live(llm, shadow: str | None, repeat: int) -> dict[str, float]:
    opts = LiveOptions(shadow=shadow, max_tokens=64)
    app = DebuggerApp(options=opts, llm=llm, record_dir=tempfile.mkdtemp())
    out: dict[str, float] = {}
    async with app.run_test(size=SIZE) as pilot:
        await _settle(pilot, app)
        await _time_key(pilot, app, "s")  # past the first (prefill) step: time decode-era keys too
        n_times, s_times = [], []
        for _ in range(repeat):
            n_times.append(await _time_key(pilot, app, "n"))
        for _ in range(repeat):
            s_times.append(await _time_key(pilot, app, "s"))
        for view in ("attention", "diff"):
            app.action_view(view)
            await pilot.pause()
            n_times.append(await _time_key(pilot, app, "n"))
        out["n"] = statistics.median(n_times)
        out["n_max"] = max(n_times)
        out["s"] = statistics.median(s_times)
        out["s_max"] = max(s_times)
        await _time_key(pilot, app, "n")
        for view in VIEWS:
            out[f"redraw_{view}"] = await _time_redraw(pilot, app, view)
        app.shutdown()
    while llm.has_unfinished():
        llm.step()
    return out


async def bench_open(path: str) -> dict[str, float]:
    from minillama.trace.reader import TraceReader

    t0 = time.perf_counter()
    reader = TraceReader(path)
    open_reader = time.perf_counter() - t0
    t0 = time.perf_counter()
    app = DebuggerApp(trace=path)
    out = {"steps": float(reader.num_steps), "reader_open": open_reader}
    async with app.run_test(size=SIZE) as pilot:
        await _settle(pilot, app)
        out["tui_open"] = time.perf_counter() - t0
        for key in ("n", "s", "p", "G", "S", "g"):
            out[f"key_{key}"] = await _time_key(pilot, app, key)
        for view in VIEWS:
            out[f"redraw_{view}"] = await _time_redraw(pilot, app, view, repeat=3)
    return out


def big_spec() -> SyntheticSpec:
    """About 1 GB: 16 layers of width 1024, 8 requests of 256 prompt + 48 generated tokens, every site in full."""
    return SyntheticSpec(num_layers=16, hidden=1024, heads=8, kv_heads=2, head_dim=128, vocab=8192, block_size=16,
                         num_blocks=256, token_budget=512, requests=[(256, 0, 0, 48)] * 8, planted_layer=None)


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def main() -> int:
    _watch_screen_updates()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trace", help="an existing big trace to open (default: generate one in a temporary folder)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--append", action="store_true", help="append the numbers to benchmarks/RESULTS.md")
    a = p.parse_args()
    import torch

    from minillama import LLM

    lines = []
    machine = f"{platform.node() or 'host'}: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, " \
              f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
    print(machine)
    t0 = time.perf_counter()
    llm = LLM(None, device="cpu", max_model_len=1024, num_kvcache_blocks=64, max_num_batched_tokens=64)
    print(f"model loaded in {time.perf_counter() - t0:.1f} s")
    for shadow in (None, "reference"):
        r = asyncio.run(bench_live(llm, shadow, a.repeat))
        label = f"live, built-in model, 3 requests{', --shadow reference' if shadow else ''}"
        redraws = ", ".join(f"{v} {r['redraw_' + v] * 1e3:.0f}" for v in VIEWS)
        line = (f"- {label}: `n` {r['n'] * 1e3:.0f} ms median (max {r['n_max'] * 1e3:.0f}; target < 100), "
                f"`s` {r['s'] * 1e3:.0f} ms median (max {r['s_max'] * 1e3:.0f}; target < 1000); "
                f"redraw alone (ms): {redraws}")
        print(line)
        lines.append(line)
    path, tmp = a.trace, None
    if path is None:
        tmp = tempfile.mkdtemp(prefix="bench_tui_")
        path = os.path.join(tmp, "big")
        t0 = time.perf_counter()
        write_synthetic_trace(path, big_spec())
        print(f"wrote a synthetic trace of {du(path) / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s")
    try:
        r = asyncio.run(bench_open(path))
        size = du(path) / 1e9
        keys = ", ".join(f"`{k}` {r['key_' + k] * 1e3:.0f}" for k in ("n", "s", "p", "G", "S", "g"))
        redraws = ", ".join(f"{v} {r['redraw_' + v] * 1e3:.0f}" for v in VIEWS)
        line = (f"- replay, {size:.2f} GB synthetic trace ({int(r['steps'])} steps, every site in full): TUI open to "
                f"first screen {r['tui_open']:.2f} s (target < 2; TraceReader alone {r['reader_open'] * 1e3:.0f} ms); "
                f"keys (ms): {keys}; redraw alone (ms): {redraws}")
        print(line)
        lines.append(line)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if a.append:
        results = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
        with open(results, "a") as f:
            f.write(f"\n## TUI ({time.strftime('%Y-%m-%d')}, {machine})\n\n"
                    "`python benchmarks/bench_tui.py`: key press to redrawn screen, headless Textual at 120x40.\n\n")
            f.write("\n".join(lines) + "\n")
        print(f"appended to {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
