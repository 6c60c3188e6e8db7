"""Two checkouts of minillama on this CPU, A/B in alternation: is one slower than the other?

bench_cpu.py compares against transformers, whose speed moves from machine to machine; this
compares minillama with itself (for example ``git worktree add /tmp/base <commit>``), in fresh
processes, alternating A B A B. Built-in model, float32, prefix caching off, greedy, EOS ignored:
``single`` = one chat prompt, 64 new tokens; ``batch`` = bench_cpu's 16 prompts of 20..300
tokens, 64 new tokens each. Prints every time and the medians.

    python benchmarks/ab_cpu_checkouts.py A_DIR B_DIR [--pairs 5] [--workload single|batch]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

CHILD = r"""
import sys, time
root, workload = sys.argv[1], sys.argv[2]
sys.path[:0] = [root, root + "/benchmarks"]
from minillama import LLM, SamplingParams
import bench_cpu
llm = LLM(None, device="cpu", dtype="float32", enable_prefix_caching=False, max_model_len=1024)
if workload == "single":
    prompts = [llm.tokenizer.encode_chat([{"role": "system", "content": bench_cpu.SYSTEM},
                                          {"role": "user", "content": bench_cpu.SINGLE_QUESTION}])]
else:
    prompts = bench_cpu.batch_prompts(llm, 16, 20, 300)
params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm-up
t = time.perf_counter()
llm.generate(prompts, params)
print(time.perf_counter() - t)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--workload", choices=["single", "batch"], default="single")
    args = ap.parse_args()
    times: dict[str, list[float]] = {"A": [], "B": []}
    for i in range(args.pairs):
        for name, root in (("A", args.a), ("B", args.b)):
            out = subprocess.run([sys.executable, "-c", CHILD, root, args.workload], check=True,
                                 capture_output=True, text=True).stdout
            times[name].append(float(out.strip().splitlines()[-1]))
        print(f"pair {i + 1}: A {times['A'][-1]:.3f} s, B {times['B'][-1]:.3f} s", flush=True)
    ma, mb = statistics.median(times["A"]), statistics.median(times["B"])
    print(f"{args.workload}: median A {ma:.3f} s ({args.a}), B {mb:.3f} s ({args.b}); A/B time {ma / mb:.3f}")


if __name__ == "__main__":
    main()
