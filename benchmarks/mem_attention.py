"""Peak extra GPU memory of one attention call, per backend: what a call allocates beyond its inputs and output.

Shapes: Llama-3.2-1B's attention (32 query heads, 8 kv heads, head_dim 64, bf16), 256-token
pages with a shuffled block table. Prefill of 4 x 2048 and 2 x 4096 tokens, flat or through the
block table, with and without a cached prefix; decode of 256 sequences at contexts 1024 and 4096.
Each call runs once to warm up (Triton compiles, cuBLAS workspaces), then once measured:
``max_memory_allocated`` during the call minus what was allocated before it and the output.

The torch backend's bound is 2x the output plus one tile (a key tile, the float32 scores and
bfloat16 probabilities of a query tile against it, the accumulators: ``flash_loop.tile_bytes``
for the call's plan) plus the call's key index (each sequence's length and block-table row as
int64, kept for the whole forward pass); flash-attn's and triton's numbers are printed beside it.

    python benchmarks/mem_attention.py [--backends torch,triton,flash-attn] [--cases decode]
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minillama.attention import available_backends, flash_loop, get_backend  # noqa: E402

H, HK, D, PAGE = 32, 8, 64, 256
DTYPE = torch.bfloat16


@dataclass(frozen=True)
class Case:
    kind: str  # "prefill" or "decode"
    batch: int
    new: int  # queries per sequence (1 for decode)
    cached: int  # keys already in the cache before them
    paged: bool  # keys through a block table (always for decode and cached prefixes)


CASES = {
    "prefill 4x2048": Case("prefill", 4, 2048, 0, False),
    "prefill 4x2048 paged": Case("prefill", 4, 2048, 0, True),
    "prefill 4x2048 on 2048 cached": Case("prefill", 4, 2048, 2048, True),
    "prefill 2x4096": Case("prefill", 2, 4096, 0, False),
    "prefill 2x4096 on 4096 cached": Case("prefill", 2, 4096, 4096, True),
    "prefill 512 on 2048 cached": Case("prefill", 1, 512, 2048, True),
    "decode 256 x 1024": Case("decode", 256, 1, 1023, True),
    "decode 256 x 4096": Case("decode", 256, 1, 4095, True),
}


def _inputs(case: Case, gen: torch.Generator) -> dict:
    n_keys = case.new + case.cached
    cu_q = torch.arange(case.batch + 1, dtype=torch.int32, device="cuda") * case.new
    cu_k = torch.arange(case.batch + 1, dtype=torch.int32, device="cuda") * n_keys
    q = torch.randn(case.batch * case.new, H, D, generator=gen, device="cuda").to(DTYPE)
    if not case.paged:
        k = torch.randn(case.batch * n_keys, HK, D, generator=gen, device="cuda").to(DTYPE)
        return dict(q=q, k=k, v=torch.randn_like(k), cu_q=cu_q, cu_k=cu_k, n_keys=n_keys, table=None)
    pages = -(-n_keys // PAGE)
    num_blocks = case.batch * pages + 1
    k_cache = torch.randn(num_blocks, PAGE, HK, D, generator=gen, device="cuda").to(DTYPE)
    table = torch.randperm(num_blocks - 1, generator=gen, device=gen.device).view(case.batch, pages).to(torch.int32)
    return dict(q=q, k=k_cache, v=torch.randn_like(k_cache), cu_q=cu_q, cu_k=cu_k, n_keys=n_keys, table=table)


def _call(backend: str, case: Case, x: dict) -> torch.Tensor:
    be = get_backend(backend)
    if case.kind == "prefill":
        return be.varlen(x["q"], x["k"], x["v"], x["cu_q"], x["cu_k"], case.new, x["n_keys"], causal=True,
                         block_table=x["table"])
    seqlens = torch.full((case.batch,), x["n_keys"], dtype=torch.int32, device="cuda")
    return be.with_kvcache(x["q"].view(case.batch, 1, H, D), x["k"], x["v"], cache_seqlens=seqlens,
                           block_table=x["table"], causal=True)


def tile(case: Case) -> int:
    """Bytes of one tile of the torch backend's loop for this call (its plan's)."""
    n_keys = case.new + case.cached
    if case.kind == "decode":
        n_keys = -(-n_keys // PAGE) * PAGE  # a decode visits the block table at its full width
    page = PAGE if case.paged else 1
    p = flash_loop.plan(case.batch, case.new, n_keys, H, HK, D, DTYPE.itemsize, page, "cuda")
    return flash_loop.tile_bytes(p, case.batch, H, HK, D, DTYPE.itemsize)


def measure(backend: str, case: Case) -> dict:
    """Peak extra bytes of one call (``extra``), its output's bytes, one tile and the bound."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = _inputs(case, gen)
    _call(backend, case, x)  # warm-up: kernels compiled, workspaces allocated (the result is dropped)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = _call(backend, case, x)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    out_bytes = out.numel() * out.element_size()
    t = tile(case)
    index = case.batch * (2 + (x["table"].shape[1] if x["table"] is not None else 0)) * 8
    row = dict(backend=backend, extra=peak - before - out_bytes, out=out_bytes, tile=t, index=index,
               bound=2 * out_bytes + t + index)
    del out, x
    torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="torch,triton,flash-attn")
    ap.add_argument("--cases", default="", help="substring filter on the case names")
    args = ap.parse_args()
    reasons = available_backends()
    backends = [b for b in args.backends.split(",") if reasons.get(b) is None]
    for b in args.backends.split(","):
        if reasons.get(b) is not None:
            print(f"skipping {b}: {reasons.get(b)}")
    mib = 2**20
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; 32/8 heads, head_dim 64, bf16, pages of {PAGE}")
    head = ["case", "output MiB", "torch tile MiB", "bound MiB"] + [f"{b} extra MiB" for b in backends] + ["torch ok"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    failed = 0
    for name, case in CASES.items():
        if args.cases not in name:
            continue
        rows = {b: measure(b, case) for b in backends}
        any_row = next(iter(rows.values()))
        ok = "yes" if "torch" not in rows else ("yes" if rows["torch"]["extra"] <= rows["torch"]["bound"] else "NO")
        failed += ok == "NO"
        cells = [name, f"{any_row['out'] / mib:.1f}", f"{any_row['tile'] / mib:.1f}", f"{any_row['bound'] / mib:.1f}"]
        cells += [f"{rows[b]['extra'] / mib:.1f}" for b in backends] + [ok]
        print("| " + " | ".join(cells) + " |", flush=True)
    print(f"torch backend over its bound in {failed} case(s)")


if __name__ == "__main__":
    main()
