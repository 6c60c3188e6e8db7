"""Where the host's time goes in large-batch decode steps on a GPU (cProfile of ``engine.step``).

With overlapped steps the GPU idles only when the host's work for one step (scheduling, input
preparation, launches, reading the previous tokens) takes longer than the GPU's work: this prints
the wall time per step with and without cProfile, and the functions that cost the most.

    python3 benchmarks/profile_gpu_host.py --model 1b --backend flash-attn
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import random
import time

import torch
from bench_gpu import build_engine, model_config

from minillama.sampling_params import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="1b")
    ap.add_argument("--backend", default="flash-attn")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=30)
    a = ap.parse_args()
    engine = build_engine(model_config(a.model), a.backend, argparse.Namespace(
        hi=max(1024, a.ctx), num_requests=a.batch, max_batched_tokens=8192, eager=False))
    rng = random.Random(0)
    for _ in range(a.batch):
        engine.add_request([rng.randint(0, 10000) for _ in range(a.ctx)],
                           SamplingParams(temperature=0, max_tokens=3 * a.steps + 20, ignore_eos=True))
    while True:  # prefill everything
        batch, _ = engine.step()
        if batch.num_tokens == len(batch.seqs) == a.batch:
            break
    for _ in range(5):
        engine.step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(a.steps):
        engine.step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / a.steps
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    for _ in range(a.steps):
        engine.step()
    prof.disable()
    torch.cuda.synchronize()
    profiled = (time.perf_counter() - t) / a.steps
    print(f"{a.model} {a.backend}: batch {a.batch}, context ~{a.ctx}: {wall * 1e3:.2f} ms a step "
          f"({profiled * 1e3:.2f} ms under cProfile)")
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
    print(out.getvalue())


if __name__ == "__main__":
    main()
