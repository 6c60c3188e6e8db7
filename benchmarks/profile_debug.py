"""Where recording's time goes on a GPU: the same workload plain, recorded without a sink, and recorded
to a trace, with graph replays counted and the engine thread profiled (cProfile, top functions).

    python benchmarks/profile_debug.py [--model builtin|1b] [--requests 64] [--top 25]
    python benchmarks/profile_debug.py --kernels --shadow torch   # ops and kernels, plain against recorded
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_debug import build, workload  # noqa: E402

from minillama.debug.manifest import build_manifest  # noqa: E402
from minillama.debug.recorder import Recorder  # noqa: E402
from minillama.trace.background import BackgroundWriter  # noqa: E402
from minillama.trace.writer import TraceWriter  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin")
    ap.add_argument("--workload", default="small")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--backend", default="flash-attn")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--shadow", default=None)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--switch", type=float, default=None, help="sys.setswitchinterval while recording")
    ap.add_argument("--kernels", action="store_true", help="instead: torch.profiler over a plain and a recorded run, and what recording adds")
    a = ap.parse_args()
    llm = build(a)
    prompts, params = workload(a, llm)
    llm.generate(prompts[:8], params[:8])

    def timed(label, profile=False):
        g = llm.runner.graphs
        before = g.num_replays if g is not None else 0
        torch.cuda.synchronize()
        pr = cProfile.Profile() if profile else None
        t = time.perf_counter()
        if pr:
            pr.enable()
        llm.generate(prompts, params)
        torch.cuda.synchronize()
        if pr:
            pr.disable()
        dt = time.perf_counter() - t
        print(f"{label:<28} {dt:7.3f} s  graph replays {g.num_replays - before if g else 0}", flush=True)
        return pr

    if a.kernels:
        return kernels(llm, prompts, params, a)
    timed("plain")
    timed("plain")
    for sink in (False, True):
        rec = Recorder(llm, shadow=a.shadow)
        writer = None
        if sink:
            writer = BackgroundWriter(TraceWriter(tempfile.mkdtemp() + "/t", build_manifest(llm, rec)))
            rec.set_sink(writer)
        rec.attach()
        old = sys.getswitchinterval()
        if a.switch:
            sys.setswitchinterval(a.switch)
        timed(f"recorded, sink={sink}")
        pr = timed(f"recorded, sink={sink} (prof)", profile=True)
        t = time.perf_counter()
        rec.detach()
        sys.setswitchinterval(old)
        print(f"  detach (drain writer) {time.perf_counter() - t:.3f} s")
        pstats.Stats(pr).sort_stats("tottime").print_stats(a.top)


def kernels(llm, prompts, params, a) -> None:
    """The same run plain, then recorded to a trace (torch.profiler, grouped by name): each mode's
    largest kernels, then what recording adds to plain, in host time of ops and calls (self CPU) and
    in kernel time (self device), largest first. A one-off cost shows here as one large entry with
    few calls (as a 55 ms ``cudaHostAlloc`` once did)."""
    from torch.profiler import ProfilerActivity, profile

    totals: dict[str, dict[str, tuple[float, float, int]]] = {}
    for label in ("plain", "stats", "shadow"):
        rec = writer = None
        if label != "plain":
            rec = Recorder(llm, shadow=a.shadow if label == "shadow" else None)
            writer = BackgroundWriter(TraceWriter(tempfile.mkdtemp() + "/t", build_manifest(llm, rec)))
            rec.set_sink(writer)
            rec.attach()
            llm.generate(prompts[:8], params[:8])
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            t = time.perf_counter()
            llm.generate(prompts, params)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t
        if rec is not None:
            rec.detach()
        averages = prof.key_averages()
        totals[label] = {e.key: (e.self_cpu_time_total, e.self_device_time_total, e.count) for e in averages}
        events = [e for e in averages if e.device_time_total > 0]
        total = sum(e.device_time_total for e in events) / 1e3
        print(f"== {label}: wall {dt:.3f} s, GPU kernel time {total:.1f} ms (profiled)")
        for e in sorted(events, key=lambda e: -e.device_time_total)[: a.top]:
            print(f"  {e.device_time_total / 1e3:9.2f} ms {e.count:7d}x  {e.key[:90]}")
    base = totals["plain"]
    for label in ("stats", "shadow"):
        for what, k in (("self CPU", 0), ("self device", 1)):
            run = totals[label]
            names = sorted(set(base) | set(run), key=lambda n: base.get(n, (0, 0, 0))[k] - run.get(n, (0, 0, 0))[k])
            print(f"== {label} against plain, {what} time: the {a.top} largest increases (ms; calls)")
            for n in names[: a.top]:
                x, y = base.get(n, (0.0, 0.0, 0)), run.get(n, (0.0, 0.0, 0))
                print(f"  {(y[k] - x[k]) / 1e3:+9.2f}  {x[k] / 1e3:8.2f} -> {y[k] / 1e3:8.2f}  {x[2]:6d} -> {y[2]:6d}x  "
                      f"{n[:70]}")


if __name__ == "__main__":
    main()
