"""Decode attention of the torch backend on CUDA, in design variants, against flash-attn: which is fastest?

The torch backend's end-to-end target (issue 13: within 2.5x of flash-attn) is missed mostly in
decode. This times one decode call of Llama-3.2-1B's attention (32/8 heads, head_dim 64, bf16,
256-token pages, a shuffled block table) at the nano-vllm workload's batch (256 sequences, contexts
uniform in [100, 1124]) for each variant, with CUDA events, median of --repeat:

  gather   how keys reach bmm: ``words`` (today's CUDA path: advanced indexing of 8-byte words,
           giving bmm's layout) or ``head-rows`` (one index_select of whole 128-byte head rows,
           today's CPU path)
  tile     the key-tile budget in MiB (``flash_loop.KV_TILE_BYTES``): 64 today; larger budgets
           mean fewer, larger steps of the online softmax (and more memory)

and checks every variant's output against flash-attn (or the first variant) within bf16 rounding.

    python benchmarks/attn_gpu_variants.py [--batch 256] [--repeat 20] [--tiles 16,64,256,1024]
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minillama.attention import available_backends, flash_loop, get_backend  # noqa: E402
from minillama.attention.paged_gather import reuse_key_indices  # noqa: E402

H, HK, D, PAGE = 32, 8, 64, 256


def inputs(batch: int, lo: int, hi: int, device: str, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (batch,), generator=g)
    width = int(-(-lens.max() // PAGE))
    num_blocks = batch * width + 8
    k = torch.randn(num_blocks, PAGE, HK, D, generator=g).to(device, dtype)
    v = torch.randn(num_blocks, PAGE, HK, D, generator=g).to(device, dtype)
    table = torch.randperm(num_blocks, generator=g)[: batch * width].view(batch, width).int().to(device)
    q = torch.randn(batch, 1, H, D, generator=g).to(device, dtype)
    return q, k, v, lens.int().to(device), table


def time_call(fn, repeat: int, device: str) -> float:
    """Median milliseconds of ``fn()`` (CUDA events on a GPU, wall clock on CPU)."""
    import time

    fn()
    out = []
    for _ in range(repeat):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            out.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t) * 1e3)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lo", type=int, default=100)
    ap.add_argument("--hi", type=int, default=1124)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--tiles", default="16,64,256,1024", help="key-tile budgets in MiB")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    q, k, v, lens, table = inputs(a.batch, a.lo, a.hi, a.device, dtype)
    scale = D ** -0.5
    rows = []
    ref = None
    if "flash-attn" in available_backends() and a.device == "cuda":
        fa = get_backend("flash-attn").with_kvcache
        call = lambda: fa(q, k, v, cache_seqlens=lens, block_table=table, softmax_scale=scale, causal=True)  # noqa: E731
        ref = call()
        rows.append(("flash-attn", "-", time_call(call, a.repeat, a.device), 0.0))
    torch_kv = get_backend("torch").with_kvcache
    saved = dict(flash_loop.KV_TILE_BYTES), dict(flash_loop.HEAD_ROWS)
    try:
        for gather, tile in itertools.product(("words", "head-rows"), [int(t) for t in a.tiles.split(",")]):
            flash_loop.HEAD_ROWS[a.device] = gather == "head-rows"
            flash_loop.KV_TILE_BYTES[a.device] = tile << 20
            flash_loop.plan.cache_clear()

            def call():
                with reuse_key_indices():  # as in the engine: the indices are the forward pass's
                    return torch_kv(q, k, v, cache_seqlens=lens, block_table=table, softmax_scale=scale, causal=True)

            out = call()
            if ref is None:
                ref = out
            err = (out.float() - ref.float()).abs().max().item()
            rows.append((f"torch, {gather}", f"{tile}", time_call(call, a.repeat, a.device), err))
    finally:
        flash_loop.KV_TILE_BYTES.update(saved[0])
        flash_loop.HEAD_ROWS.update(saved[1])
        flash_loop.plan.cache_clear()
    base = rows[0][2]
    print(f"decode, {a.batch} sequences, contexts {a.lo}..{a.hi}, {H}/{HK} heads, head_dim {D}, pages {PAGE}, "
          f"{dtype}, {a.device}: one layer's call, median of {a.repeat}")
    print(f"{'variant':<20}{'tile MiB':>9}{'ms':>9}{'x first':>9}{'max|err|':>10}")
    for name, tile, ms, err in rows:
        print(f"{name:<20}{tile:>9}{ms:>9.3f}{ms / base:>8.2f}x{err:>10.2e}")


if __name__ == "__main__":
    main()
