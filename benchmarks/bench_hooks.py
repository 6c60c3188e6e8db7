"""Overhead of the debugger's hooks on the built-in model (CPU).

Measures, in one process, decode throughput of the same workload:
  plain            no listener attached (hooks compiled in, ``hooks.enabled`` False)
  session          a DebugSession in "continue" mode with no breakpoints (pausing machinery + stats)
  stats recording  a Recorder writing a default trace (statistics per site) to a temp folder
and the bytes per step of that default recording. The cost of the disabled hooks themselves is
estimated directly: sites checked per step times the measured cost of one ``if hooks.enabled``.

    python benchmarks/bench_hooks.py [--steps 32] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import timeit

from minillama import LLM, SamplingParams, hooks


def run(llm: LLM, prompts: list[list[int]], new_tokens: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    t = time.perf_counter()
    llm.generate(prompts, params)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    a = ap.parse_args()
    llm = LLM(None, device="cpu", num_kvcache_blocks=256, max_model_len=1024)
    prompts = [llm.tokenizer.encode_chat([{"role": "user", "content": f"Tell me about topic {i}."}])
               for i in range(a.batch)]
    run(llm, prompts, 4)  # warm up

    from minillama.debug.recorder import Recorder
    from minillama.debug.session import DebugSession
    from minillama.trace.writer import TraceWriter

    def with_session() -> float:
        s = DebugSession(llm, pause_at_start=False)
        params = SamplingParams(temperature=0, max_tokens=a.steps, ignore_eos=True)
        for p in prompts:
            s.submit(p, params)
        t = time.perf_counter()
        s.start()
        s.wait(600)
        dt = time.perf_counter() - t
        s.stop()
        return dt

    sizes = []

    def with_recording() -> float:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "trace")
            rec = Recorder(llm, sink=TraceWriter(path, {"bench": True})).attach()
            try:
                dt = run(llm, prompts, a.steps)
            finally:
                rec.detach()
            size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)
            sizes.append(size / (llm.num_steps - steps_before[0]))
        return dt

    steps_before = [0]
    times: dict[str, list[float]] = {"plain": [], "session, no breakpoints": [], "stats recording": []}
    for _ in range(a.repeat):  # interleave so drift on a busy machine hits all three alike
        times["plain"].append(run(llm, prompts, a.steps))
        times["session, no breakpoints"].append(with_session())
        steps_before[0] = llm.num_steps
        times["stats recording"].append(with_recording())
    assert not hooks.enabled

    # cost of the disabled checks: one attribute test per site per layer
    per_check = min(timeit.repeat("if hooks.enabled: pass", globals={"hooks": hooks}, number=200_000, repeat=5)) / 200_000
    checks_per_step = len(hooks.expected_sites(llm.model_config.num_hidden_layers)) + 30 * 3 + 4
    base = statistics.median(times["plain"])
    per_step = base / a.steps
    print(f"built-in model, CPU float32, batch {a.batch}, {a.steps} new tokens each, median of {a.repeat}")
    print(f"{'mode':28s} {'seconds':>8s} {'overhead':>9s}")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"{name:28s} {m:8.3f} {100 * (m / base - 1):8.1f}%")
    print(f"disabled hooks: {checks_per_step} checks/step x {per_check * 1e9:.0f} ns = "
          f"{checks_per_step * per_check * 1e6:.1f} us per {per_step * 1e3:.1f} ms step "
          f"({100 * checks_per_step * per_check / per_step:.3f}%)")
    print(f"default recording: {statistics.median(sizes) / 1024:.1f} KiB per step")


if __name__ == "__main__":
    main()
