"""What the debugger costs: the same workload plain and while recording, in one process.

Modes (each after a warm-up of the same mode):
  plain graphs      no listener; CUDA graphs and overlapped steps as the engine runs by default
  plain eager       no listener, no CUDA graphs
  stats             a Recorder writing a trace (per-request statistics and hashes at every site), with
                    the default trace writer (``--trace-writer auto``: a process of its own on CUDA)
  stats + shadow    the same plus a shadow backend and the yardstick at every layer
  stats, thread     stats with the trace written by a thread of this process (``--trace-writer thread``)
  stats, process    stats with the trace written by a process of its own (``--trace-writer process``)
  nan session       a DebugSession running to a NaN breakpoint that never fires
  session           (CPU) a DebugSession with no breakpoint
Workloads: ``small`` = N requests of P random prompt tokens with T new tokens each (default 64 x 256
+ 64); ``nanovllm`` = 256 requests, prompt and output lengths uniform in [100, 1024] (nano-vllm's
bench.py); both draw their prompts' tokens anew for every run; ``hooks`` = a small CPU workload (4 chat
prompts, 24 new tokens each). It also prints what the disabled hooks cost a plain step (no debugger attached).

    python benchmarks/bench_debug.py --model builtin --workload small --backend flash-attn --shadow torch
    python benchmarks/bench_debug.py --device cpu --workload hooks --modes plain,stats,session
"""

from __future__ import annotations

import argparse
import cProfile
import io
import itertools
import math
import os
import pstats
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
import timeit

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minillama import LLM, SamplingParams, hooks  # noqa: E402
from minillama.debug.breakpoints import Breakpoint  # noqa: E402
from minillama.debug.manifest import build_manifest  # noqa: E402
from minillama.debug.recorder import Recorder  # noqa: E402
from minillama.debug.session import DebugSession  # noqa: E402
from minillama.debug.writer_process import trace_sink  # noqa: E402
from minillama.trace.writer import TraceWriter  # noqa: E402

ALL_MODES = ("plain", "eager", "stats", "shadow", "thread", "proc", "nan", "session")
LABEL = {"plain": "plain graphs", "eager": "plain eager", "stats": "stats", "shadow": "stats + shadow",
         "thread": "stats, thread", "proc": "stats, process", "nan": "nan session", "session": "session"}


def label_of(mode: str) -> str:
    """A mode's name in the tables (on CPU there are no graphs: "plain")."""
    return "plain" if mode == "plain" and ARGS.device == "cpu" else LABEL[mode]


def build(a):
    kw = dict(backend=a.backend, device=a.device, max_model_len=a.max_model_len, max_num_seqs=a.max_num_seqs,
              max_num_batched_tokens=a.max_num_batched_tokens)
    if a.device == "cpu":
        kw.update(num_kvcache_blocks=256, max_model_len=1024)
        kw.pop("max_num_seqs")
        kw.pop("max_num_batched_tokens")
    if a.model == "builtin":
        return LLM(None, **kw)
    from bench_gpu import model_config  # noqa: E402  (the Llama-3.2-shaped random models)

    return LLM(model_config(a.model), **kw)


def workload(a, llm, run: int = 0) -> tuple[list[list[int]], list[SamplingParams]]:
    """The prompts and sampling parameters; lengths are fixed, a random workload's tokens are drawn anew
    for each ``run``, so no run finds the prompts of one before it in the prefix cache (the workloads are
    random prompts: repeating them would let the cache skip all but a prompt's last block)."""
    rng = random.Random(0)
    if a.workload == "hooks":
        tok = llm.tokenizer
        prompts = [tok.encode_chat([{"role": "user", "content": f"Tell me about topic {i}."}]) for i in range(4)]
        return prompts, [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)] * 4
    if a.workload == "nanovllm":
        n, lens, outs = 256, None, None
        lens = [rng.randint(100, 1024) for _ in range(n)]
        outs = [rng.randint(100, 1024) for _ in range(n)]
    else:
        n = a.requests
        lens, outs = [a.prompt_len] * n, [a.new_tokens] * n
    tokens = random.Random(1000 + run)
    prompts = [[tokens.randint(0, 10000) for _ in range(m)] for m in lens]
    return prompts, [SamplingParams(temperature=0, max_tokens=t, ignore_eos=True) for t in outs]


def in_thread(fn, *args):
    """``fn(*args)`` on a fresh thread that ends with it (CPU runs).

    A session steps the engine on its own thread, as the TUI does. GNU OpenMP (torch's CPU thread
    pool) cuts its spin-waiting short once it manages more threads than there are cores, so a pool
    left alive by another thread (the main one, after running the model) slows every parallel op of
    the next by a third on 2 cores. Each run here starts from no pool, the session's included, as the
    TUI's engine does (it loads the model on a worker thread too).
    """
    box: list = []
    th = threading.Thread(target=lambda: box.append(fn(*args)))
    th.start()
    th.join()
    if not box:
        raise SystemExit(f"bench_debug: {getattr(fn, '__name__', fn)} failed (see above)")
    return box[0]


def thread_cpu() -> dict[str, tuple[float, float]]:
    """CPU seconds (user, system) each live Python thread has used, by thread name (Linux /proc; {}
    elsewhere). System time is the kernel's (writes, fsync): the GIL is not held for it.

    At 256 requests a recording's cost is host work (the engine thread's and the trace writer's
    Python, which share the GIL), so the table says how much of it each thread does per step.
    """
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    out = {}
    for t in threading.enumerate():
        try:
            with open(f"/proc/self/task/{t.native_id}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError, TypeError):
            continue
        out[t.name] = (int(fields[11]) / tick, int(fields[12]) / tick)  # utime, stime
    return out


def _timed_step(llm, times: list[tuple[str, float]]):
    """``llm.step`` that appends (phase of the batch it ran or launched, wall seconds) to ``times``.

    With overlapped steps a call launches one batch and waits for the one before it, so a prefill's
    GPU time shows in the call after it; its host work (eager launches, the recorder's per-site
    work) shows in its own call."""
    step = type(llm).step
    prof = PROFILE.get("now")

    def timed():
        t = time.perf_counter()
        if prof is not None:
            prof.enable()  # on the thread that steps (a session's own)
        batch, finished = step(llm)
        if prof is not None:
            prof.disable()
        if batch.seqs:
            times.append((batch.phase, time.perf_counter() - t))
        return batch, finished
    return timed


def run_mode(mode: str, llm, prompts, params, tmp: str) -> tuple[float, int, int]:
    """Seconds for the workload in ``mode``, and the trace's bytes and steps (0 without a trace)."""
    graphs = llm.runner.graphs
    rec = writer = session = None
    path = os.path.join(tmp, f"{mode}-{time.monotonic_ns()}")
    if mode == "eager":
        llm.runner.graphs = None
    elif mode in ("stats", "shadow", "thread", "proc"):
        rec = Recorder(llm, shadow=(ARGS.shadow if mode == "shadow" else None))
        kind = {"thread": "thread", "proc": "process"}.get(mode, "auto")
        writer = trace_sink(TraceWriter(path, build_manifest(llm, rec)), rec, kind)
        rec.set_sink(writer)
        rec.attach()
    elif mode in ("nan", "session"):
        bps = [Breakpoint("*", "nan")] if mode == "nan" else []
        session = DebugSession(llm, breakpoints=bps, pause_at_start=False, keep_steps=4).start()
        session.wait(600)  # idle once its graphs are captured: setup, like a recorder's attach
    if llm.device.type == "cuda":
        torch.cuda.synchronize()
    ENGINE_STEPS[mode] = -llm.num_steps
    STEP_TIMES[mode] = times = []
    llm.step = _timed_step(llm, times)  # an instance attribute: the session's thread finds it too
    cpu0 = thread_cpu()
    t = time.perf_counter()
    try:
        if session is not None:
            before = llm.num_steps
            for p, sp in zip(prompts, params, strict=True):
                session.submit(p, sp, chat=False)
            while session.idle and llm.num_steps == before:  # until the worker has taken the work
                time.sleep(0.0005)
            while not session.idle:
                session.wait(600)
                if session.paused:
                    raise RuntimeError(f"the session paused unexpectedly: {session.position}")
                if session.error is not None:
                    raise session.error
        else:
            llm.generate(prompts, params)
        if llm.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        ENGINE_STEPS[mode] += llm.num_steps
        cpu = thread_cpu()
        THREAD_CPU[mode] = {name: tuple(a - b for a, b in zip(cpu[name], cpu0.get(name, (0.0, 0.0)), strict=True))
                            for name in cpu}
    finally:
        del llm.step
        llm.runner.graphs = graphs
        recorder = rec if rec is not None else getattr(session, "recorder", None)
        if recorder is not None:
            EVICTIONS[mode] = recorder.buffer.evictions
        if hasattr(writer, "num_lent"):
            ring = recorder.buffer.ring
            HANDOVER[mode] = (writer.num_lent, writer.num_piped, ring.waits if ring is not None else 0)
        if rec is not None:
            rec.detach()
        if session is not None:
            session.stop()
    size = steps = 0
    if writer is not None:
        size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
        steps = writer.num_steps
        if ARGS.keep_trace and mode == ("shadow" if "shadow" in ARGS.modes else "stats"):
            shutil.rmtree(ARGS.keep_trace, ignore_errors=True)  # the last one kept: a full-size run
            shutil.move(path, ARGS.keep_trace)
        shutil.rmtree(path, ignore_errors=True)
    return dt, size, steps


def main() -> None:
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin", help="builtin, 1b or 3b (random Llama-3.2 shapes)")
    ap.add_argument("--workload", default="small", choices=("small", "nanovllm", "hooks"))
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--backend", default="flash-attn")
    ap.add_argument("--shadow", default="torch")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--modes", default="plain,eager,stats,shadow,nan")
    ap.add_argument("--repeat", type=int, default=0, help="timed runs per mode (medians); 0: as many as fill about "
                    "3 s of the first mode (a 0.2 s workload timed once moves by tenths between runs)")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--switch-interval", type=float, help="sys.setswitchinterval(S) first: how long a thread "
                    "waiting for the GIL lets the holder run (Python's default 0.005 s)")
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="after the timed runs, one more run of "
                    "each mode with cProfile around each engine step: its N largest functions by own time")
    ap.add_argument("--keep-trace", metavar="DIR", help="keep the last shadow (else stats) recording in DIR, e.g. "
                    "for `bench_tui.py --trace DIR`")
    ARGS = a = ap.parse_args()
    if a.switch_interval:
        sys.setswitchinterval(a.switch_interval)
    modes = [m for m in a.modes.split(",") if m]
    bad = [m for m in modes if m not in ALL_MODES]
    if bad:
        sys.exit(f"bench_debug: unknown mode(s) {bad}: choose from {', '.join(ALL_MODES)}")
    llm = in_thread(build, a) if a.device == "cpu" else build(a)
    prompts, params = workload(a, llm)
    tokens = sum(p.max_tokens for p in params)
    tmp = tempfile.mkdtemp(prefix="bench-debug-")
    rows = []
    short = [SamplingParams(temperature=0, max_tokens=min(4, p.max_tokens), ignore_eos=True) for p in params]
    run = (lambda *args: in_thread(run_mode, *args)) if a.device == "cpu" else run_mode
    runs = itertools.count(1)  # a fresh draw of the prompts for every run (``workload``)

    def fresh() -> list[list[int]]:
        return workload(a, llm, next(runs))[0]

    for mode in modes:
        run(mode, llm, fresh(), short, tmp)  # warm-up: every prefill shape, a few decode steps
    times: dict[str, list[float]] = {m: [] for m in modes}
    sizes: dict[str, tuple[int, int]] = {}
    repeat, done = a.repeat, 0
    while repeat == 0 or done < repeat:  # interleaved, so a busy machine's drift hits every mode alike
        done += 1
        for mode in modes:
            dt, size, steps = run(mode, llm, fresh(), params, tmp)
            times[mode].append(dt)
            sizes[mode] = (size, steps)
            print(f"  {label_of(mode)}: {dt:.3f} s", file=sys.stderr, flush=True)
            if repeat == 0:  # auto: from the first timed run
                repeat = max(1, min(15, math.ceil(3.0 / max(dt, 1e-3))))
    if a.profile:  # the tables below stay the timed runs'
        kept = {k: dict(d) for k, d in (("steps", ENGINE_STEPS), ("times", STEP_TIMES), ("cpu", THREAD_CPU))}
        for mode in modes:
            PROFILE["now"] = cProfile.Profile()
            run(mode, llm, fresh(), params, tmp)
            steps = max(ENGINE_STEPS.get(mode, 1), 1)
            out = io.StringIO()
            pstats.Stats(PROFILE.pop("now"), stream=out).sort_stats("tottime").print_stats(a.profile)
            print(f"== profile of {label_of(mode)}: {steps} engine steps (seconds / {steps} = ms a step)")
            text = out.getvalue()
            print(text[text.find("   ncalls"):])
        for d, k in ((ENGINE_STEPS, "steps"), (STEP_TIMES, "times"), (THREAD_CPU, "cpu")):
            d.clear()
            d.update(kept[k])
    rows = [(m, statistics.median(times[m]), *sizes[m]) for m in modes]
    base = next((t for m, t, _, _ in rows if m == "plain"), rows[0][1])
    name = {"builtin": "SmolLM2-135M"}.get(a.model, f"Llama-3.2-{a.model}-shaped")
    print(f"\n{name}, {a.device} ({torch.cuda.get_device_name() if a.device != 'cpu' else 'cpu'}), "
          f"backend {a.backend}, shadow {a.shadow}, workload {a.workload}: {len(prompts)} requests, {tokens} tokens; "
          f"switch interval {sys.getswitchinterval() * 1e3:g} ms; median of {repeat} timed run(s) per mode")
    print(f"{'mode':<16}{'requests':>9}{'tokens':>9}{'seconds':>10}{'tok/s':>10}{'slowdown':>10}{'bytes/step':>12}")
    for mode, t, size, steps in rows:
        per = f"{size / steps:,.0f}" if steps else "-"
        label = label_of(mode)
        print(f"{label:<16}{len(prompts):>9}{tokens:>9}{t:>10.3f}{tokens / t:>10.0f}{t / base:>9.2f}x{per:>12}")
    print("host CPU per engine step (ms), by thread, during the timed run (Linux):")
    for mode in modes:
        n = max(ENGINE_STEPS.get(mode, 1), 1)
        busy = {k: v for k, v in THREAD_CPU.get(mode, {}).items() if sum(v) > 0.01}
        label = label_of(mode)
        evicted = f"; ring slots copied out by the engine: {EVICTIONS[mode]}" if EVICTIONS.get(mode) else ""
        if mode in HANDOVER:
            lent, piped, waits = HANDOVER[mode]
            evicted += f"; steps lent in place {lent}, piped {piped}, waits for a slot {waits}"
        print(f"  {label:<16}" + ", ".join(f"{k} {sum(v) / n * 1e3:.2f} (sys {v[1] / n * 1e3:.2f})"
                                           for k, v in sorted(busy.items())) + evicted)
    print("engine step wall time (ms) by the phase of the batch a call ran or launched, during the timed run:")
    for mode in modes:
        by = {}
        for phase, dt in STEP_TIMES.get(mode, []):
            by.setdefault("decode" if phase == "decode" else "prefill/mixed", []).append(dt * 1e3)
        label = label_of(mode)
        print(f"  {label:<16}" + "; ".join(f"{k} {len(v)} steps, median {statistics.median(v):.2f}, total {sum(v):.0f}"
                                            for k, v in sorted(by.items())))
    per_check = min(timeit.repeat("if hooks.enabled: pass", globals={"hooks": hooks}, number=200_000,
                                  repeat=5)) / 200_000
    checks = len(hooks.expected_sites(llm.model_config.num_hidden_layers)) + 8 * llm.model_config.num_hidden_layers
    steps = max(ENGINE_STEPS.get(modes[0], 1), 1)
    print(f"disabled hooks (no debugger attached): {checks} checks a step x {per_check * 1e9:.0f} ns = "
          f"{checks * per_check * 1e6:.1f} us, {100 * checks * per_check / (base / steps):.3f}% of a plain step")
    shutil.rmtree(tmp, ignore_errors=True)


ARGS: argparse.Namespace
ENGINE_STEPS: dict[str, int] = {}  # engine steps of each mode's last run
STEP_TIMES: dict[str, list[tuple[str, float]]] = {}  # (phase, seconds) of each engine step of the last run
THREAD_CPU: dict[str, dict[str, float]] = {}  # CPU seconds per thread during each mode's last timed run
PROFILE: dict[str, cProfile.Profile] = {}  # "now": the profile of the run being made (--profile)
EVICTIONS: dict[str, int] = {}  # steps whose tables the engine thread copied out of a full ring (GPU)
HANDOVER: dict[str, tuple[int, int, int]] = {}  # a writer process's steps lent, piped; the engine's waits

if __name__ == "__main__":
    main()
