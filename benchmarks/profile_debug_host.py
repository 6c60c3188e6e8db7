"""The recorder's host work at a large batch, without a GPU: a tiny random Llama on CPU, 256 requests.

On a GPU a recorded step's statistics are device kernels; what can still slow the engine is the host
work around them (the batch copied at each step start, the sites' bookkeeping, the trace writer's
thread). This measures that part alone: the CPU statistics computation is replaced by a no-op, so
the numbers are the engine thread's and the writer's Python, at the batch size where it matters.
Modes alternate; medians. Not a target: a proxy to find host costs between GPU runs.

    python benchmarks/profile_debug_host.py [--repeat 7] [--requests 256] [--layers 16]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minillama import LLM, SamplingParams  # noqa: E402
from minillama.debug import devstats  # noqa: E402
from minillama.debug.manifest import build_manifest  # noqa: E402
from minillama.debug.recorder import Recorder  # noqa: E402
from minillama.trace.background import BackgroundWriter  # noqa: E402
from minillama.trace.writer import TraceWriter  # noqa: E402
from tests.conftest import make_tiny_llama  # noqa: E402


def in_thread(fn):
    """``fn()`` on a fresh thread (see bench_debug.in_thread: OpenMP pools of idle threads slow the next)."""
    box: list = []
    th = threading.Thread(target=lambda: box.append(fn()))
    th.start()
    th.join()
    return box[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="debug-host-")
    model = make_tiny_llama(os.path.join(tmp, "model"), num_hidden_layers=a.layers)
    llm = in_thread(lambda: LLM(model, device="cpu", max_num_seqs=a.requests, max_model_len=512,
                                num_kvcache_blocks=4096, max_num_batched_tokens=8192))
    rng = random.Random(0)
    prompts = [[rng.randint(4, 500) for _ in range(24)] for _ in range(a.requests)]
    params = [SamplingParams(temperature=0, max_tokens=a.new_tokens, ignore_eos=True)] * a.requests
    devstats.site_stats_cpu = devstats.sites_stats_cpu = lambda *args, **kw: None  # done on the device on a GPU

    def run(mode: str) -> float:
        rec = None
        if mode != "plain":
            rec = Recorder(llm)
            if mode == "recording to a trace":
                path = os.path.join(tmp, f"t{time.monotonic_ns()}")
                rec.set_sink(BackgroundWriter(TraceWriter(path, build_manifest(llm, rec))))
            rec.attach()
        t = time.perf_counter()
        llm.generate(prompts, params)
        dt = time.perf_counter() - t
        if rec is not None:
            rec.detach()
        return dt

    modes = ("plain", "recorder, no trace", "recording to a trace")
    for m in modes:
        in_thread(lambda m=m: run(m))  # warm-up
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(a.repeat):
        for m in modes:
            times[m].append(in_thread(lambda m=m: run(m)))
    base = statistics.median(times["plain"])
    print(f"tiny Llama ({a.layers} layers, width 64), cpu, {a.requests} requests x {a.new_tokens} new tokens; "
          "statistics computation excluded")
    for m in modes:
        t = statistics.median(times[m])
        print(f"{m:<22}{t:8.3f} s{t / base:8.2f}x")


if __name__ == "__main__":
    main()
