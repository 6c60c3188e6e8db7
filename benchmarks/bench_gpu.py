"""Output throughput on a GPU: nano-vllm's workload, minillama's backends, transformers as the peer.

Workload (nano-vllm's bench.py): 256 requests, prompt and output lengths each uniform in
[100, 1024], random token ids, greedy, ``ignore_eos``. Models: Llama-3.2-1B- and 3B-shaped, with
seeded random bf16 weights built directly on the GPU (no files): ``LLMEngine`` accepts a bare
``ModelConfig``.

The peer is transformers' continuous batching (``generate_batch`` with ``paged|sdpa``), which
takes one ``max_new_tokens`` for every request: both engines run the same prompts with
``--peer-tokens`` new tokens each ("equal" rows) and the ratio to the peer is taken there. The
nano-vllm rows (per-request output lengths) are minillama alone.

"% floor": over decode steps with at least ``--large-batch`` sequences, the time a pure
memory-bound step needs (bytes of all weights plus the KV read, over the device-to-device copy
bandwidth measured in the same run) divided by the measured step time (host work included).

Backends: ``flash-attn`` (the real kernels), ``triton`` (minillama's Triton prefill and decode
kernels) and ``torch`` (the flash algorithm in plain PyTorch); each one's time on the nano-vllm
workload is printed as a ratio to flash-attn's (targets: triton <= 1.2x, torch <= 2.5x).

    python benchmarks/bench_gpu.py [--models 1b,3b] [--backends flash-attn,triton,torch] [--out DIR]
    python benchmarks/bench_gpu.py --peer-tokens 0   # nano-vllm rows only, no transformers peer
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minillama.attention import BackendError  # noqa: E402
from minillama.config import Config  # noqa: E402
from minillama.engine.llm_engine import LLMEngine  # noqa: E402
from minillama.models.config import ModelConfig  # noqa: E402
from minillama.sampling_params import SamplingParams  # noqa: E402

SHAPES = {
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
               intermediate_size=8192),
    "3b": dict(hidden_size=3072, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8, head_dim=128,
               intermediate_size=8192),
}
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


def model_config(name: str) -> ModelConfig:
    return ModelConfig(**SHAPES[name], vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0,
                       rope_scaling=LLAMA3_ROPE, max_position_embeddings=131072, tie_word_embeddings=True,
                       bos_token_id=128000, eos_token_ids=[128001, 128008, 128009], source=f"random Llama-3.2-{name}")


def workload(seed: int, n: int, lo: int, hi: int) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    prompts = [[rng.randint(0, 10000) for _ in range(rng.randint(lo, hi))] for _ in range(n)]
    return prompts, [rng.randint(lo, hi) for _ in range(n)]


def copy_bandwidth(nbytes: int = 4 << 30) -> float:
    """Device-to-device copy, bytes read + written per second (median of 10)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    times = []
    for i in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * nbytes / statistics.median(times)


# ---------------------------------------------------------------------------------------------
# minillama
# ---------------------------------------------------------------------------------------------


def build_engine(cfg: ModelConfig, backend: str, args) -> LLMEngine:
    return LLMEngine(Config(model=cfg, backend=backend, device="cuda", dtype="bfloat16", max_model_len=2 * args.hi,
                            max_num_seqs=args.num_requests, max_num_batched_tokens=args.max_batched_tokens,
                            enable_prefix_caching=False, enforce_eager=args.eager))


def run_minillama(engine: LLMEngine, prompts: list[list[int]], out_lens: list[int], bw: float,
                  large_batch: int) -> dict:
    c = engine.model_config
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    kv_per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * engine.dtype.itemsize
    seqs = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
            for p, n in zip(prompts, out_lens, strict=True)]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    large = []  # (measured seconds, floor seconds) of large decode steps
    num_steps = decode_steps = 0
    while engine.has_unfinished():
        ts = time.perf_counter()
        batch, _ = engine.step()  # overlapped steps: returns once the previous step's tokens are read
        dt = time.perf_counter() - ts
        num_steps += 1
        if batch.num_tokens == len(batch.seqs):  # decode: one token per sequence
            decode_steps += 1
            if len(batch.seqs) >= large_batch:
                kv = sum(len(s) - 1 for s in batch.seqs) * kv_per_token
                large.append((dt, (weight_bytes + kv) / bw))
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    tokens = sum(s.num_completion_tokens for s in seqs)
    assert tokens == sum(out_lens), (tokens, sum(out_lens))
    res = dict(seconds=seconds, output_tokens=tokens, tok_s=tokens / seconds, steps=num_steps,
               decode_steps=decode_steps, large_decode_steps=len(large))
    if large:
        res["floor_pct"] = 100 * sum(f for _, f in large) / sum(m for m, _ in large)
        res["large_step_ms_median"] = 1e3 * statistics.median(m for m, _ in large)
        res["large_step_floor_ms_median"] = 1e3 * statistics.median(f for _, f in large)
    return res


def profile_decode(engine: LLMEngine, path: str, batch: int, ctx: int, steps: int = 4) -> str:
    """Kernel-time table of a few decode steps at ``batch`` sequences of about ``ctx`` tokens."""
    from torch.profiler import ProfilerActivity, profile

    rng = random.Random(1)
    for _ in range(batch):
        engine.add_request([rng.randint(0, 10000) for _ in range(ctx)],
                           SamplingParams(temperature=0, max_tokens=64 + steps, ignore_eos=True))
    while engine.has_unfinished():  # prefill everything first
        b, _ = engine.step()
        if b.num_tokens == len(b.seqs) == batch:
            break
    else:
        return "profile: never reached a full decode batch\n"
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / steps
    while engine.has_unfinished():
        engine.step()
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events) / steps
    table = events.table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=60)
    head = f"decode step, batch {batch}, ctx ~{ctx}: wall {wall * 1e3:.2f} ms, GPU kernels {gpu_us / 1e3:.2f} ms\n"
    with open(path, "w") as f:
        f.write(head + table)
    return head


# ---------------------------------------------------------------------------------------------
# transformers (the peer)
# ---------------------------------------------------------------------------------------------


def run_transformers(cfg: ModelConfig, prompts: list[list[int]], max_new: int) -> dict:
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                         intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                         num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
                         head_dim=cfg.head_dim, max_position_embeddings=4096, rms_norm_eps=cfg.rms_norm_eps,
                         tie_word_embeddings=True)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(hf_cfg).eval()
    finally:
        torch.set_default_dtype(old)
    model.set_attn_implementation("paged|sdpa")

    def generate(inputs: list[list[int]], n: int) -> int:
        gen_cfg = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=-1)
        out = model.generate_batch(inputs=inputs, generation_config=gen_cfg)
        return sum(len(o.generated_tokens) for o in out.values())

    generate([p[:64] for p in prompts[:8]], 8)  # warm-up, not timed
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    tokens = generate(prompts, max_new)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return dict(seconds=seconds, output_tokens=tokens, tok_s=tokens / seconds)


# ---------------------------------------------------------------------------------------------


def free_gpu() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="1b,3b")
    ap.add_argument("--backends", default="flash-attn,triton,torch")
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--lo", type=int, default=100)
    ap.add_argument("--hi", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peer-tokens", type=int, default=128, help="max_new_tokens of the equal-length runs (0: no peer)")
    ap.add_argument("--no-peer", action="store_true", help="skip transformers (equal-length rows still run)")
    ap.add_argument("--max-batched-tokens", type=int, default=8192)
    ap.add_argument("--large-batch", type=int, default=128)
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs")
    ap.add_argument("--profile", default="", help="models to profile a decode step of, e.g. 3b")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)

    torch.backends.cuda.matmul.allow_tf32 = False
    bw = copy_bandwidth()
    free_gpu()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; copy bandwidth {bw / 1e12:.2f} TB/s "
          "(read + write)", flush=True)
    rows, notes = [], []
    prompts, out_lens = workload(args.seed, args.num_requests, args.lo, args.hi)
    equal = [args.peer_tokens] * len(prompts)
    for name in args.models.split(","):
        cfg = model_config(name)
        peer = None
        if args.peer_tokens and not args.no_peer:
            try:
                peer = run_transformers(cfg, prompts, args.peer_tokens)
                rows.append(dict(engine="transformers", backend="paged|sdpa", model=name, workload="equal", **peer,
                                 ratio=1.0))
            except Exception as e:  # the peer's API moves between versions: report, carry on
                notes.append(f"transformers {name}: {type(e).__name__}: {e}")
            free_gpu()
            print(f"peer {name}: {peer}", flush=True)
        for backend in args.backends.split(","):
            try:
                engine = build_engine(cfg, backend, args)
            except BackendError as e:  # e.g. flash_attn or triton not installed: report, carry on
                notes.append(f"{name} {backend}: not run: {e}")
                continue
            run_minillama(engine, [p[:32] for p in prompts[:16]], [16] * 16, bw, 10**9)  # warm-up
            if args.peer_tokens:
                res = run_minillama(engine, prompts, equal, bw, args.large_batch)
                if peer:
                    res["ratio"] = res["tok_s"] / peer["tok_s"]
                rows.append(dict(engine="minillama", backend=backend, model=name, workload="equal", **res))
                print(rows[-1], flush=True)
            res = run_minillama(engine, prompts, out_lens, bw, args.large_batch)
            rows.append(dict(engine="minillama", backend=backend, model=name, workload="nano-vllm", **res,
                             kv_cache=engine.kv_cache_summary))
            print(rows[-1], flush=True)
            if name in args.profile.split(","):
                notes.append(f"{name} {backend}: " + profile_decode(
                    engine, os.path.join(args.out, f"profile_{name}_{backend}.txt"), args.num_requests, 1024))
            del engine
            free_gpu()
    # each backend vs flash-attn end to end, against its target
    targets = {"triton": 1.2, "torch": 2.5}
    for name in args.models.split(","):
        t = {r["backend"]: r["seconds"] for r in rows if r["model"] == name and r["workload"] == "nano-vllm"}
        for backend, target in targets.items():
            if backend in t and "flash-attn" in t:
                ratio = t[backend] / t["flash-attn"]
                notes.append(f"{name}: {backend} backend takes {ratio:.2f}x flash-attn's time on the nano-vllm "
                             f"workload (target <= {target}x: {'met' if ratio <= target else 'missed'})")

    with open(os.path.join(args.out, "bench_gpu.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), copy_bw=bw, args=vars(args), rows=rows, notes=notes), f,
                  indent=1)
    print()
    for n in notes:
        print(n.rstrip())
    head = ("engine", "backend", "model", "workload", "requests", "out tokens", "seconds", "tok/s", "x peer",
            "% floor")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = (r["engine"], r["backend"], r["model"], r["workload"], str(args.num_requests), str(r["output_tokens"]),
                 f"{r['seconds']:.2f}", f"{r['tok_s']:.0f}", f"{r['ratio']:.1f}" if "ratio" in r else "",
                 f"{r['floor_pct']:.0f}" if "floor_pct" in r else "")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
