"""How fast minillama-tui answers, live and on large recordings, with traces the real engine records on CPU.

    python benchmarks/bench_tui.py                 # prints the numbers
    python benchmarks/bench_tui.py --append        # and appends them to benchmarks/RESULTS.md

Live (built-in model, 3 requests, CPU): one ``n`` (next layer) and one ``s`` (next step), from the key
press to the first screen update that shows where the engine stopped (headless Textual at 120x40), and
each view's redraw alone. Replay, on traces recorded here by the engine itself (no GPU, cached under
--cache between runs): a ~1 GB trace (a random 8-layer model of width 512, every site kept in full), a
256-request recording and a 1,000-step one (tiny model, shadow torch): opening to the first screen,
keys, redraws, and the steps x layers heatmap. Targets: ``n`` < 100 ms, ``s`` < 1 s, open < 2 s,
heatmap of 1,000 steps < 500 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.tui_alias import ensure_minillama_tui  # noqa: E402

ensure_minillama_tui()

from minillama.debug.sources import LiveOptions  # noqa: E402
from minillama_tui.app import DebuggerApp  # noqa: E402

SIZE = (120, 40)
VIEWS = ("inspector", "kv", "attention", "diff", "requests", "heatmap")
_updates: list[tuple[float, object, bool]] = []  # (end time, cursor, engine running) of each screen update


def watch_screen_updates() -> None:
    """Note when each screen update finishes and what it showed (wraps Textual's private update callback)."""
    from textual.screen import Screen

    orig = Screen._on_timer_update
    if getattr(orig, "_bench", False):
        return

    def patched(self) -> None:
        orig(self)
        main = getattr(self.app, "main", None)
        driver = getattr(main, "driver", None)
        _updates.append((time.perf_counter(), getattr(main, "pos", None), bool(driver and driver.running)))

    patched._bench = True  # type: ignore[attr-defined]
    Screen._on_timer_update = patched  # type: ignore[method-assign]


async def settle(pilot, app) -> None:
    while True:
        m = app.main
        if m is not None and m.loaded and (m.driver is None or not (m.driver.running or m.driver.queue)):
            break
        await asyncio.sleep(0.001)
    await app.workers.wait_for_complete()
    await pilot.pause()


async def first_update(t0: float, pos: object, timeout: float = 60.0) -> float:
    end = time.perf_counter() + timeout
    while time.perf_counter() < end:
        for t, p, running in _updates:
            if t > t0 and p == pos and not running:
                return t
        await asyncio.sleep(0.0005)
    raise TimeoutError("no screen update showed the new position")


async def time_key(pilot, app, key: str, settled: bool = True) -> float:
    """Seconds from posting ``key`` to the end of the first screen update that shows where it went
    (``settled`` False: at once, while background work such as the request fold may still run)."""
    if settled:
        await settle(pilot, app)
        await asyncio.sleep(0.05)
    before, t0 = app.main.pos, time.perf_counter()
    app.simulate_key(key)
    m = app.main
    while m.pos == before or (m.driver is not None and (m.driver.running or m.driver.queue)):
        await asyncio.sleep(0.0005)
    return await first_update(t0, m.pos) - t0


async def time_redraw(pilot, app, view: str, repeat: int = 3) -> float:
    """Seconds from asking a view to redraw to the end of the screen update that shows it."""
    app.main.view = view
    await settle(pilot, app)
    v = app.main.query_one(f"#{view}")
    times = []
    for _ in range(repeat):
        await asyncio.sleep(0.05)
        t0 = time.perf_counter()
        v.redraw()
        v.refresh()
        times.append(await first_update(t0, app.main.pos) - t0)
    return statistics.median(times)


async def bench_live(llm, shadow: str | None, repeat: int) -> dict[str, float]:
    import tempfile

    app = DebuggerApp(options=LiveOptions(shadow=shadow, max_tokens=64), llm=llm, record_dir=tempfile.mkdtemp())
    out: dict[str, float] = {}
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app)
        await time_key(pilot, app, "s")  # past the first prefill step: decode-era keys
        n = [await time_key(pilot, app, "n") for _ in range(repeat)]
        s = [await time_key(pilot, app, "s") for _ in range(repeat)]
        for view in ("attention", "diff"):
            app.main.view = view
            n.append(await time_key(pilot, app, "n"))
        out.update(n=statistics.median(n), n_max=max(n), s=statistics.median(s), s_max=max(s))
        for view in VIEWS:
            out[f"redraw_{view}"] = await time_redraw(pilot, app, view)
        app.shutdown()
    from tests.tui_pilot import drain

    drain(llm)
    return out


async def bench_open(path: str) -> dict[str, float]:
    from minillama.trace.reader import TraceReader

    t0 = time.perf_counter()
    reader = TraceReader(path)
    out = {"steps": float(reader.num_steps), "reader_open": time.perf_counter() - t0}
    t0 = time.perf_counter()
    app = DebuggerApp(trace=path)
    async with app.run_test(size=SIZE) as pilot:
        while app.main is None or not app.main.loaded:
            await asyncio.sleep(0.001)
        out["tui_open"] = await first_update(t0, app.main.pos) - t0
        out["key_first"] = await time_key(pilot, app, "n", settled=False)  # the background fold still running
        await settle(pilot, app)
        for key in ("n", "s", "p", "G", "S", "g"):
            out[f"key_{key}"] = await time_key(pilot, app, key)
        app.main.view = "inspector"
        await settle(pilot, app)
        t0 = time.perf_counter()
        app.main.view = "heatmap"
        while app.main.query_one("#heatmap").map is None:  # built in a worker thread
            await asyncio.sleep(0.0005)
        out["heatmap"] = await first_update(time.perf_counter(), app.main.pos) - t0  # then drawn
        for view in VIEWS:
            out[f"redraw_{view}"] = await time_redraw(pilot, app, view)
    return out


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def main() -> int:
    from benchmarks.tui_traces import make_traces

    watch_screen_updates()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "minillama-bench-tui"),
                   help="where the generated traces are kept between runs")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--skip-live", action="store_true")
    p.add_argument("--append", action="store_true", help="append the numbers to benchmarks/RESULTS.md")
    p.add_argument("--trace", action="append", default=[], metavar="DIR",
                   help="replay this trace instead of the generated ones (repeatable), e.g. a GPU recording kept "
                        "by `bench_debug.py --keep-trace DIR`")
    a = p.parse_args()
    import torch

    from minillama import LLM

    machine = (f"{platform.node() or 'host'}: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
               f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(machine)
    lines = []
    if not a.skip_live:
        llm = LLM(None, device="cpu", max_model_len=1024, num_kvcache_blocks=64, max_num_batched_tokens=64)
        for shadow in (None, "reference"):
            r = asyncio.run(bench_live(llm, shadow, a.repeat))
            redraws = ", ".join(f"{v} {r['redraw_' + v] * 1e3:.0f}" for v in VIEWS)
            lines.append(f"- live, built-in model, 3 requests{', --shadow reference' if shadow else ''}: `n` "
                         f"{r['n'] * 1e3:.0f} ms median (max {r['n_max'] * 1e3:.0f}; target < 100), `s` "
                         f"{r['s'] * 1e3:.0f} ms median (max {r['s_max'] * 1e3:.0f}; target < 1000); redraw alone "
                         f"(ms): {redraws}")
            print(lines[-1])
    traces = {f"given trace {path}": path for path in a.trace} or make_traces(a.cache)
    for name, path in traces.items():
        r = asyncio.run(bench_open(path))
        keys = ", ".join(f"`{k}` {r['key_' + k] * 1e3:.0f}" for k in ("n", "s", "p", "G", "S", "g"))
        redraws = ", ".join(f"{v} {r['redraw_' + v] * 1e3:.0f}" for v in VIEWS)
        lines.append(f"- replay, {name} ({du(path) / 1e9:.2f} GB, {int(r['steps'])} steps): open to first screen "
                     f"{r['tui_open']:.2f} s (target < 2; TraceReader alone {r['reader_open'] * 1e3:.0f} ms), then `n` "
                     f"{r['key_first'] * 1e3:.0f} ms at once (the requests still folding in the background); "
                     f"heatmap {r['heatmap'] * 1e3:.0f} ms; keys (ms): {keys}; redraw alone (ms): {redraws}")
        print(lines[-1])
    if a.append:
        results = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
        with open(results, "a") as f:
            f.write(f"\n## TUI ({time.strftime('%Y-%m-%d')}, {machine})\n\n`python benchmarks/bench_tui.py`: key press "
                    "to redrawn screen, headless Textual at 120x40; traces recorded by the engine on CPU.\n\n")
            f.write("\n".join(lines) + "\n")
        print(f"appended to {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
