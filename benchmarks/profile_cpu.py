"""Where minillama's time goes on CPU, for the workloads of ``bench_cpu.py``.

For one workload (``single``: one chat prompt; ``batch``: 16 prompts of 20..300 tokens) it prints
  1. wall time of the prefill step and the median decode step, for minillama and (``--hf``)
     for transformers ``generate`` (its prefill = time to the first token);
  2. cProfile of minillama's decode steps: engine functions (minillama/ files) and the torch
     calls they make, as milliseconds per decode step (cProfile adds its own overhead to Python-
     heavy functions: compare them with each other, not with the wall times of part 1);
  3. with ``--ops``, torch.profiler's operator table for a few decode steps and for the prefill.

    python benchmarks/profile_cpu.py --workload single --hf
    python benchmarks/profile_cpu.py --workload batch --hf --ops
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import time

import torch
from bench_cpu import LLM, SINGLE_QUESTION, SamplingParams, batch_prompts, chat, load_hf, run_hf


def step_times(llm: LLM, prompts: list[list[int]], new_tokens: int, profiler=None) -> list[tuple[str, int, float]]:
    """Run the prompts through the step loop; (phase, tokens, seconds) per step.

    ``profiler`` (a cProfile.Profile) is switched on for the decode steps only.
    """
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    for p in prompts:
        llm.add_request(p, params)
    out = []
    while llm.has_unfinished():
        phase = "prefill" if any(len(s) - s.num_computed_tokens > 1 for s in llm.scheduler.waiting) or any(
            len(s) - s.num_computed_tokens > 1 for s in llm.scheduler.running) else "decode"
        if profiler is not None and phase == "decode":
            profiler.enable()
        t = time.perf_counter()
        batch, _ = llm.step()
        dt = time.perf_counter() - t
        if profiler is not None:
            profiler.disable()
        out.append((phase, sum(batch.num_new_tokens), dt))
    return out


def summarize(label: str, steps: list[tuple[str, int, float]]) -> None:
    pre = [s for s in steps if s[0] == "prefill"]
    dec = [s[2] for s in steps if s[0] == "decode"]
    pre_s = sum(s[2] for s in pre)
    print(f"{label:13s} prefill {pre_s * 1e3:8.1f} ms ({sum(s[1] for s in pre)} tokens in {len(pre)} step(s)); "
          f"decode step median {statistics.median(dec) * 1e3:6.1f} ms, min {min(dec) * 1e3:6.1f} ms "
          f"({len(dec)} steps)")


def print_cprofile(prof: cProfile.Profile, steps: int, top: int) -> None:
    stats = pstats.Stats(prof)
    rows = []
    for (path, line, func), (_cc, ncalls, tottime, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        if "minillama" in path:
            where = f"{path[path.rindex('minillama'):]}:{line} {func}"
        elif path == "~":
            where = func  # a builtin: torch ops show up here
        else:
            continue
        rows.append((where, ncalls, tottime, cumtime))
    print(f"\ncProfile of {steps} decode steps, ms per step (engine functions by cumulative time)")
    print(f"{'function':82s} {'calls/step':>10s} {'self ms':>8s} {'cum ms':>8s}")
    for where, ncalls, tottime, cumtime in sorted(rows, key=lambda r: -r[3])[:top]:
        print(f"{where[:82]:82s} {ncalls / steps:10.1f} {tottime / steps * 1e3:8.2f} {cumtime / steps * 1e3:8.2f}")


def print_ops(llm: LLM, prompts: list[list[int]], top: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    for p in prompts:
        llm.add_request(p, params)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        llm.step()
    print("\ntorch.profiler, the prefill step (self CPU time)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))
    llm.step()  # one decode outside the profile
    n = 0
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        while llm.has_unfinished():
            llm.step()
            n += 1
    print(f"torch.profiler, {n} decode steps (self CPU time, totals)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", choices=["single", "batch"], default="single")
    ap.add_argument("--tokens", type=int, help="new tokens (default: 128 single, 64 batch)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--hf", action="store_true", help="also time transformers' prefill and decode steps")
    ap.add_argument("--ops", action="store_true", help="add torch.profiler operator tables")
    ap.add_argument("--top", type=int, default=30)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    n = a.tokens or (128 if a.workload == "single" else 64)
    llm = LLM(None, device="cpu", dtype="float32", enable_prefix_caching=False, max_model_len=512,
              max_num_seqs=16, num_kvcache_blocks=16 * 32 + 8)
    prompts = [chat(llm, SINGLE_QUESTION)] if a.workload == "single" else batch_prompts(llm, 16, 20, 300)
    print(f"{a.workload}: {len(prompts)} prompt(s) of {min(map(len, prompts))}..{max(map(len, prompts))} tokens, "
          f"{n} new tokens, {torch.get_num_threads()} threads")

    step_times(llm, prompts, 4)  # warm-up
    summarize("minillama", step_times(llm, prompts, n))
    if a.hf:
        hf = load_hf()
        run_hf(hf, prompts, 4)  # warm-up
        full, short = run_hf(hf, prompts, n), run_hf(hf, prompts, 2)
        decode = (full.seconds - short.seconds) / (n - 2)
        print(f"{'transformers':13s} prefill {full.first * 1e3:8.1f} ms (first token); decode step "
              f"{decode * 1e3:6.1f} ms (({n} - 2 tokens) difference of two runs)")
    prof = cProfile.Profile()
    steps = step_times(llm, prompts, n, prof)
    print_cprofile(prof, sum(1 for s in steps if s[0] == "decode"), a.top)
    if a.ops:
        print_ops(llm, prompts, a.top)


if __name__ == "__main__":
    main()
