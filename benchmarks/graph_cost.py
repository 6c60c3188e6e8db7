"""What recording adds to one decode step on a GPU, in parts: the captured graph's GPU time (and the
kernels recording adds inside it, from torch.profiler over replays), the graph launch's host time,
and the recorder's host work around the replay (its step callbacks, timed during a real run).

Not a target: a probe to find where a recorded decode step's time goes (bench_debug.py says how much).

    python benchmarks/graph_cost.py [--model builtin|1b] [--batch 64] [--context 320]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_debug import build, workload  # noqa: E402

from minillama.debug.manifest import build_manifest  # noqa: E402
from minillama.debug.recorder import Recorder  # noqa: E402
from minillama.debug.writer_process import trace_sink  # noqa: E402
from minillama.trace.writer import TraceWriter  # noqa: E402


def prime(graphs, bs: int, context: int, block: int) -> None:
    """Static inputs of a decode step of ``bs`` requests with ``context`` cached tokens each (own blocks)."""
    nb = -(-context // block)
    graphs.slot_mapping.fill_(-1)  # writes go to the spare slot
    graphs.context_lens.zero_()
    graphs.context_lens[:bs] = context
    graphs.positions[:bs] = context - 1
    rows = torch.arange(bs, device=graphs.block_tables.device)[:, None] * nb
    graphs.block_tables[:bs, :nb] = (rows + torch.arange(nb, device=rows.device)).to(torch.int32)


def gpu_ms(g, n: int) -> float:
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(n):
        g.replay()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) / n


def host_us(g, n: int) -> float:
    out = []
    for _ in range(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        g.replay()
        out.append(time.perf_counter() - t)
    torch.cuda.synchronize()
    return statistics.median(out) * 1e6


def kernels(g, n: int) -> dict[str, tuple[float, float]]:
    """Per kernel name: (us of device time, launches) per replay."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            g.replay()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        if e.self_device_time_total > 0:
            out[e.key] = (e.self_device_time_total / n, e.count / n)
    return out


CUR: dict[str, list[float]] = defaultdict(list)  # where the wrappers put times now (per engine step)


def timed(owner, name: str, label: str) -> None:
    """Replace ``owner.name`` by a wrapper that appends each call's wall seconds to ``CUR[label]``."""
    fn = getattr(owner, name)

    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            CUR[label].append(time.perf_counter() - t)
    setattr(owner, name, wrapper)


def time_parts(rec: Recorder) -> None:
    """Time the recorder's step callbacks (instance attributes shadow the methods) and what they call."""
    import minillama.debug.recorder as recorder_module
    from minillama.debug.snapshot import Snapshot
    from minillama.debug.stepbuf import StatsBuffer

    for name in ("_begin", "_launched", "_end", "_site", "_submit"):
        timed(rec, name, f"rec.{name}")
    timed(rec.finisher, "add", "  finisher.add")
    if not getattr(time_parts, "done", False):  # module and class attributes: once
        time_parts.done = True
        for name in ("capture_batch", "step_counts", "_to_host"):
            timed(recorder_module, name, f"  {name}")
        for name in ("reset", "finish", "snapshot"):
            timed(StatsBuffer, name, f"  buffer.{name}")
        timed(Snapshot, "__init__", "  Snapshot()")


def step_times(llm, prompts, params) -> tuple[list[float], dict[str, list[float]]]:
    """Wall seconds of each decode-phase ``llm.step`` of the workload, and the timed parts' seconds
    during those steps, per step (summed within a step)."""
    out, parts = [], defaultdict(list)
    for p, sp in zip(prompts, params, strict=True):
        llm.add_request(p, sp)
    while llm.has_unfinished():
        CUR.clear()
        t = time.perf_counter()
        batch, _ = llm.step()
        dt = time.perf_counter() - t
        if batch.seqs and batch.phase == "decode":
            out.append(dt)
            for k, v in CUR.items():
                parts[k].append(sum(v))
    return out, parts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=320)
    ap.add_argument("--replays", type=int, default=200)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--device", default="cuda", help="cpu: the host parts only (torch backend), to try the script")
    a = ap.parse_args()
    for k, v in dict(backend="flash-attn" if a.device == "cuda" else "torch", max_model_len=1024, max_num_seqs=256,
                     max_num_batched_tokens=8192, workload="small").items():
        setattr(a, k, v)
    llm = build(a)
    prompts, params = workload(a, llm)
    llm.generate(prompts[:8], params[:8])
    graphs = llm.runner.graphs
    if graphs is not None:
        graph_part(a, llm, graphs)
    host_part(a, llm, params)


def graph_part(a, llm, graphs) -> None:
    bs = next(s for s in graphs.sizes if s >= a.batch)
    plain = graphs.sets[-1][bs]
    rec = Recorder(llm).attach()
    recorded = graphs.sets[graphs._key()][bs]
    prime(graphs, bs, a.context, llm.config.kvcache_block_size)
    res: dict[str, list[float]] = defaultdict(list)
    for _ in range(5):
        for name, g in (("plain", plain), ("recorded", recorded)):
            res[f"{name} gpu"].append(gpu_ms(g, a.replays))
            res[f"{name} host"].append(host_us(g, a.replays // 4))
    print(f"decode graph of {bs} rows, context {a.context}: median of 5 rounds")
    for k, v in res.items():
        unit = "ms a replay (GPU, back to back)" if k.endswith("gpu") else "us a replay() call (host, GPU idle)"
        print(f"  {k:<14} {statistics.median(v):9.3f} {unit}")
    kp, kr = kernels(plain, 20), kernels(recorded, 20)
    print("kernels per replay (us of device time, launches): plain total "
          f"{sum(t for t, _ in kp.values()):.1f}, recorded total {sum(t for t, _ in kr.values()):.1f}")
    for name in sorted(set(kp) | set(kr), key=lambda n: -(kr.get(n, (0, 0))[0] - kp.get(n, (0, 0))[0]))[:12]:
        (t0, c0), (t1, c1) = kp.get(name, (0, 0)), kr.get(name, (0, 0))
        print(f"  {t1 - t0:+8.1f} us  {t0:8.1f} -> {t1:8.1f}  {c0:5.0f} -> {c1:5.0f}x  {name[:80]}")
    rec.detach()


def host_part(a, llm, params) -> None:
    """The host side, in real runs: plain, recorded without a trace, recorded to a trace (a process on CUDA)."""
    timed(torch.cuda.CUDAGraph, "replay", "graph replay")
    runs = {}
    for i, label in enumerate(("plain", "recorded", "recorded to a trace")):
        r = None
        if label != "plain":
            r = Recorder(llm)
            if label == "recorded to a trace":
                r.set_sink(trace_sink(TraceWriter(tempfile.mkdtemp() + "/t", build_manifest(llm, r)), r))
            time_parts(r)
            r.attach()
        step_times(llm, workload(a, llm, 10 + i)[0][:8], params[:8])  # warm-up
        runs[label] = step_times(llm, workload(a, llm, 20 + i)[0], params)
        if r is not None:
            r.detach()
    print(f"decode steps of the workload ({a.requests} x {a.prompt_len} + {a.new_tokens}), host: median ms a step")
    # the callbacks first, then what they call (indented labels)
    labels = sorted({k for _, parts in runs.values() for k in parts}, key=lambda k: (k.startswith("  "), k))
    print(f"  {'':<22}" + "".join(f"{lab:>22}" for lab in runs))
    print(f"  {'engine step (wall)':<22}" + "".join(f"{statistics.median(st) * 1e3:>22.3f}" for st, _ in runs.values()))
    for k in labels:
        cells = []
        for st, parts in runs.values():
            v = parts.get(k)
            cells.append(f"{statistics.median(v + [0.0] * (len(st) - len(v))) * 1e3:>22.3f}" if v else f"{'-':>22}")
        print(f"  {k:<22}" + "".join(cells))


if __name__ == "__main__":
    main()
