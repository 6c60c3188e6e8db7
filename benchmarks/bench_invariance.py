"""What ``batch_invariant=True`` costs against the default: reported, not gated.

CPU (built-in SmolLM2-135M-Instruct, float32, torch backend, prefix caching off), greedy, EOS ignored:

  single   one chat prompt, 64 new tokens: time to first token and decode ms/token
  batch    8 prompts of 20..200 tokens, 32 new tokens each, submitted at once: output tokens/s

GPU (``--gpu``): nano-vllm's workload on a Llama-3.2-1B-shaped model with seeded random bf16 weights
(``bench_gpu.model_config("1b")``, ``bench_gpu.workload``: 256 requests, prompt and output lengths
uniform in [100, 1024], random ids), torch backend (the mode's target) and flash-attn for reference;
output tokens/s, end to end (CUDA graphs and overlapped steps as by default). ``--num-requests`` and
``--hi`` shrink it.

Modes alternate A B A B after one warm-up each; the median of ``--repeats`` is reported. On CPU each
run starts in a quiet moment (bench_cpu's ``wait_quiet``) and the table says how many cores other
processes used meanwhile: the invariant mode runs many more small ops, which suffer more than large
matmuls when the cores are oversubscribed. Results go to stdout as a table and to
``$OUT/bench_invariance.json`` (or ``--out``).

    python benchmarks/bench_invariance.py                 # CPU (a few minutes on 2 idle cores)
    python benchmarks/bench_invariance.py --quick         # CPU smoke run
    python benchmarks/bench_invariance.py --gpu --no-cpu  # the H200 part
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from minillama import LLM, SamplingParams  # noqa: E402
from minillama.config import Config  # noqa: E402
from minillama.engine.llm_engine import LLMEngine  # noqa: E402


def cpu_prompts(llm: LLM) -> tuple[list[int], list[list[int]]]:
    """The single chat prompt and 8 batch prompts (bench_cpu's texts)."""
    from bench_cpu import SINGLE_QUESTION, batch_prompts, chat

    return chat(llm, SINGLE_QUESTION), batch_prompts(llm, 8, 20, 200)


def single(llm: LLM, prompt: list[int], new: int) -> dict:
    seq = llm.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True))
    t0 = time.perf_counter()
    while seq.num_completion_tokens == 0:
        llm.step()
    t1 = time.perf_counter()
    while llm.has_unfinished():
        llm.step()
    t2 = time.perf_counter()
    return {"ttft_ms": 1e3 * (t1 - t0), "decode_ms_per_token": 1e3 * (t2 - t1) / (new - 1),
            "tokens": seq.completion_token_ids}


def batch(llm: LLM, prompts: list[list[int]], new: int) -> dict:
    params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    dt = time.perf_counter() - t0
    return {"tok_s": sum(len(o.token_ids) for o in outs) / dt, "seconds": dt, "tokens": [o.token_ids for o in outs]}


def quiet(args, fn) -> dict:
    """Run ``fn`` in a quiet moment (bench_cpu's ``wait_quiet``) and note how many cores others used."""
    from bench_cpu import _cpu_ticks, _others, wait_quiet

    wait_quiet(args.max_wait, 0.3)
    ticks, c0, t0 = _cpu_ticks(), time.process_time(), time.perf_counter()
    out = fn()
    out["others"] = _others(ticks, _cpu_ticks(), time.process_time() - c0, time.perf_counter() - t0)
    return out


def run_cpu(args) -> list[dict]:
    if args.cpu_row_tile:
        from minillama.layers import batch_invariant

        batch_invariant.ROW_TILE["cpu"] = args.cpu_row_tile
    kw = dict(device="cpu", max_model_len=1024, enable_prefix_caching=False, num_kvcache_blocks=512)
    llms = {mode: LLM(None, batch_invariant=mode == "invariant", **kw) for mode in ("default", "invariant")}
    prompt, prompts = cpu_prompts(llms["default"])
    results: dict[str, dict[str, list[dict]]] = {m: {"single": [], "batch": []} for m in llms}
    for llm in llms.values():  # warm-up
        single(llm, prompt, 4)
        batch(llm, prompts[:2], 2)
    n_single, n_batch = (16, 8) if args.quick else (64, 32)
    for _ in range(args.repeats):
        for mode, llm in llms.items():
            results[mode]["single"].append(quiet(args, lambda llm=llm: single(llm, prompt, n_single)))
            results[mode]["batch"].append(quiet(args, lambda llm=llm: batch(llm, prompts, n_batch)))
            print(mode, {k: round(v[-1].get("decode_ms_per_token", v[-1].get("tok_s")), 2)
                         for k, v in results[mode].items()}, flush=True)
    rows = []
    for mode, res in results.items():
        others = lambda runs: round(statistics.median(r["others"] for r in runs), 2)  # noqa: E731
        rows.append({"device": "cpu", "mode": mode, "workload": "single",
                     "ttft_ms": statistics.median(r["ttft_ms"] for r in res["single"]),
                     "decode_ms_per_token": statistics.median(r["decode_ms_per_token"] for r in res["single"]),
                     "others_cores": others(res["single"])})
        rows.append({"device": "cpu", "mode": mode, "workload": "batch",
                     "tok_s": statistics.median(r["tok_s"] for r in res["batch"]), "others_cores": others(res["batch"])})
    same = (results["default"]["single"][0]["tokens"] == results["invariant"]["single"][0]["tokens"],
            results["default"]["batch"][0]["tokens"] == results["invariant"]["batch"][0]["tokens"])
    from minillama.layers.batch_invariant import ROW_TILE

    rows.append({"device": "cpu", "note": f"greedy tokens equal across modes: single {same[0]}, batch {same[1]}; "
                                          f"CPU row tile {ROW_TILE['cpu']}"})
    return rows


def run_gpu(args) -> list[dict]:
    from bench_gpu import model_config, workload

    torch.backends.cuda.matmul.allow_tf32 = False
    prompts, out_lens = workload(args.seed, args.num_requests, args.lo, args.hi)
    rows = []
    for backend in args.backends.split(","):
        for mode in ("default", "invariant"):
            engine = LLMEngine(Config(model=model_config("1b"), backend=backend, device="cuda", dtype="bfloat16",
                                      max_model_len=2 * args.hi, max_num_seqs=args.num_requests,
                                      max_num_batched_tokens=args.max_batched_tokens, enable_prefix_caching=False,
                                      gpu_memory_utilization=0.8, batch_invariant=mode == "invariant"))
            _gpu_run(engine, [p[:32] for p in prompts[:16]], [16] * 16)  # warm-up
            times = [_gpu_run(engine, prompts, out_lens) for _ in range(args.gpu_repeats)]
            sec = statistics.median(times)
            rows.append({"device": torch.cuda.get_device_name(), "backend": backend, "mode": mode,
                         "workload": f"nano-vllm {args.num_requests} x [{args.lo}, {args.hi}]", "seconds": sec,
                         "tok_s": sum(out_lens) / sec})
            print(rows[-1], flush=True)
            del engine
            torch.cuda.empty_cache()
    return rows


def _gpu_run(engine: LLMEngine, prompts: list[list[int]], out_lens: list[int]) -> float:
    for p, n in zip(prompts, out_lens, strict=True):
        engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def table(rows: list[dict]) -> None:
    """Each mode's numbers and the invariant mode's cost relative to the default."""
    def cost(r: dict, key: str, lower_is_better: bool) -> str:
        base = next((x for x in rows if x.get("mode") == "default" and x.get("workload") == r["workload"]
                     and x.get("backend") == r.get("backend") and x.get("device") == r["device"]), None)
        if base is None or r["mode"] == "default":
            return ""
        ratio = r[key] / base[key] if lower_is_better else base[key] / r[key]
        return f"{ratio:.2f}x the time"

    print("| device | backend | mode | workload | result | cost | others' cores |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "note" in r:
            continue
        if "decode_ms_per_token" in r:
            res = f"TTFT {r['ttft_ms']:.0f} ms, decode {r['decode_ms_per_token']:.1f} ms/token"
            c = cost(r, "decode_ms_per_token", True)
        else:
            res, c = f"{r['tok_s']:.0f} tok/s", cost(r, "tok_s", False)
        print(f"| {r['device']} | {r.get('backend', 'torch')} | {r['mode']} | {r['workload']} | {res} | {c} | "
              f"{r.get('others_cores', '')} |")
    for r in rows:
        if "note" in r:
            print(r["note"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-cpu", action="store_true", help="skip the CPU part")
    ap.add_argument("--gpu", action="store_true", help="run the GPU part (needs CUDA)")
    ap.add_argument("--backends", default="torch,flash-attn", help="GPU attention backends")
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--lo", type=int, default=100)
    ap.add_argument("--hi", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-batched-tokens", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=3, help="CPU repeats")
    ap.add_argument("--gpu-repeats", type=int, default=1, help="GPU repeats (the workload is long)")
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: fewer tokens, one repeat")
    ap.add_argument("--cpu-row-tile", type=int, default=0,
                    help="rows per matmul tile in batch-invariant mode on CPU (default: the library's, 1)")
    ap.add_argument("--max-wait", type=float, default=60.0,
                    help="seconds to wait for a quiet machine before each CPU run (others' test runs share it)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    if args.quick:
        args.repeats = 1
    rows = [] if args.no_cpu else run_cpu(args)
    if args.gpu:
        rows += run_gpu(args)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_invariance.json"), "w") as f:
        json.dump({"args": vars(args), "torch": torch.__version__, "rows": rows}, f, indent=1)
    table(rows)


if __name__ == "__main__":
    main()
