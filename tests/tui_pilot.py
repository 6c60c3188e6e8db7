"""Shared pieces of the TUI tests: the recorded fixtures, a live app on the tiny model, and pilot helpers."""

from __future__ import annotations

import asyncio
import os

import pytest
from rich.console import Console
from textual.worker import WorkerCancelled, WorkerFailed

from minillama.debug.sources import LiveOptions
from minillama.trace.format import TraceError
from minillama_tui.app import DebuggerApp
from tests.tui_traces import PROMPTS, one_thread, record

SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "traces", "h200-flash-attn-vs-torch")
COMMITTED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "tui-planted")


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def planted(tmp_path_factory, tiny_llama_dir) -> str:
    return record(str(tmp_path_factory.mktemp("tui") / "planted"), tiny_llama_dir, "planted")


@pytest.fixture(scope="session")
def clean(tmp_path_factory, tiny_llama_dir) -> str:
    return record(str(tmp_path_factory.mktemp("tui") / "clean"), tiny_llama_dir, "clean")


@pytest.fixture(scope="session")
def preempted(tmp_path_factory, tiny_llama_dir) -> str:
    return record(str(tmp_path_factory.mktemp("tui") / "preempted"), tiny_llama_dir, "preempted")


@pytest.fixture(scope="module")
def tiny_llm(tiny_llama_dir):
    """The tiny model, live on the CPU: a 19-token prompt is chunked by the 16-token budget."""
    from minillama import LLM

    with one_thread():
        yield LLM(tiny_llama_dir, device="cpu", num_kvcache_blocks=64, max_model_len=256, max_num_batched_tokens=16)


@pytest.fixture
def live(tiny_llm, tmp_path):
    """Make live apps on the shared tiny engine; afterwards leave the engine idle for the next test."""
    made: list[DebuggerApp] = []

    def make(**kw) -> DebuggerApp:
        opts = LiveOptions(prompts=kw.pop("prompts", [list(p) for p in PROMPTS]), max_tokens=kw.pop("max_tokens", 3),
                           shadow=kw.pop("shadow", "torch"), **kw)
        app = DebuggerApp(options=opts, llm=tiny_llm, record_dir=str(tmp_path / "traces"))
        made.append(app)
        return app

    with one_thread():
        yield make
    for app in made:
        app.shutdown()
    drain(tiny_llm)


def drain(llm) -> None:
    """Finish (or drop) whatever a test left in a shared engine."""
    from minillama.debug.sources import abort_request

    sched = llm.scheduler
    for seq in [*sched.running, *sched.waiting]:
        abort_request(llm, seq.seq_id, "test cleanup")
    llm._pending = None


async def settle(pilot, app: DebuggerApp, timeout: float = 60.0) -> None:
    """Wait until the app has loaded, the engine is not running and no worker is busy."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        m = app.main
        if m is not None and (m.loaded or m.ctx.mode == "failed") and (m.driver is None or (
                not m.driver.running and not m.driver.queue)):
            break
        if loop.time() > end:
            raise AssertionError(f"the app did not settle: {m and m.ctx.mode} {m and m.driver}")
        await pilot.pause(0.01)
    for _ in range(2):
        await _workers_done(app)
        await pilot.pause()


async def _workers_done(app: DebuggerApp) -> None:
    """Wait for the app's workers. A worker that met a damaged trace is not a test failure: the app
    already turned it into its error screen (``DebuggerApp._handle_exception``). Nor is one cancelled:
    an exclusive group cancels the older worker when a newer one starts, and the newer one is waited for."""
    for worker in list(app.workers):
        try:
            await worker.wait()
        except WorkerCancelled:
            continue
        except WorkerFailed as e:
            if not isinstance(e.error, TraceError):
                raise


async def press(pilot, app: DebuggerApp, *keys: str) -> None:
    for k in keys:
        await pilot.press(k)
        await settle(pilot, app)


def text(app: DebuggerApp, view: str, width: int = 118) -> str:
    """The plain text a view renders for the cursor now."""
    v = app.main.query_one(f"#{view}")
    console = Console(width=width, record=True, file=open(os.devnull, "w"))
    console.print(v.render_view())
    return console.export_text()


def table_text(app: DebuggerApp, view: str) -> str:
    """The rows of a view's DataTable as plain text (one line per row)."""
    from textual.widgets import DataTable

    t = app.main.query_one(f"#{view}").query_one(DataTable)
    return "\n".join(" | ".join(str(c) for c in t.get_row_at(r)) for r in range(t.row_count))
