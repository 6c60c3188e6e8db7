"""Peak resident memory of ``LLM()`` on the built-in model, against the model's float32 size.

    python benchmarks/bench_load_rss.py               # each case in a fresh process (peak RSS is per process)
    python benchmarks/bench_load_rss.py --kv-blocks 64

Prints, per case: the process's RSS after importing torch and minillama ("runtime"), its peak
RSS over ``LLM()`` (``VmHWM``), the float32 size of the parameters and the KV cache the engine
allocated, then ``(peak - runtime - KV cache) / float32 size``: the loading overhead, which must
stay at or below 1.2. Linux only (reads /proc/self/status).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

_CHILD = r"""
import json, sys, time
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
import torch
from minillama import LLM
runtime = status("VmRSS")
t = time.perf_counter()
kw = json.loads(sys.argv[1])
llm = LLM(None, device="cpu", **kw)
seconds = time.perf_counter() - t
params = sum(p.numel() for p in llm.model.parameters())
print(json.dumps({"runtime": runtime, "peak": status("VmHWM"), "after": status("VmRSS"),
                  "fp32": params * 4, "kv": llm.runner.kv_cache.numel() * llm.runner.kv_cache.element_size(),
                  "seconds": seconds, "threads": torch.get_num_threads()}))
"""


def measure(kwargs: dict) -> dict:
    """Run one ``LLM(**kwargs)`` in a fresh interpreter and return its memory figures (bytes)."""
    env = dict(os.environ, MINILLAMA_QUIET="1")
    out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(kwargs)], capture_output=True, text=True,
                         env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kv-blocks", type=int, action="append", default=None,
                   help="num_kvcache_blocks of a case (repeatable; default: the engine's default sizing, then 64)")
    a = p.parse_args(argv)
    cases = [{"num_kvcache_blocks": n} if n else {} for n in (a.kv_blocks or [0, 64])]
    mb = 1e6
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}, python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    print(f"{'case':<24} {'runtime MB':>10} {'peak MB':>9} {'fp32 MB':>8} {'KV MB':>7} {'load s':>7} {'overhead':>9}")
    worst = 0.0
    for kw in cases:
        r = measure(kw)
        overhead = (r["peak"] - r["runtime"] - r["kv"]) / r["fp32"]
        worst = max(worst, overhead)
        name = ",".join(f"{k}={v}" for k, v in kw.items()) or "defaults"
        print(f"{name:<24} {r['runtime'] / mb:>10.0f} {r['peak'] / mb:>9.0f} {r['fp32'] / mb:>8.0f} "
              f"{r['kv'] / mb:>7.0f} {r['seconds']:>7.1f} {overhead:>8.2f}x")
    print(f"worst overhead {worst:.2f}x of the float32 size (target <= 1.20x)")
    return 0 if worst <= 1.2 else 1


if __name__ == "__main__":
    sys.exit(main())
