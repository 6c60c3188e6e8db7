"""Attention backends on a CUDA GPU: torch, triton and flash-attn against a float64 reference.

Each backend's bf16 error is judged against the error budget of plain bf16 attention (the naive
``softmax(q @ k.T) @ v`` with bf16 matmuls): ``max|fast - ref| <= 2 * max|plain - ref| + eps``.
Also checks that the torch and triton backends never synchronise with the host, that their decode
call can be captured in a CUDA graph, which kernels each one runs, and that the torch backend's
calls stay within their memory bound (``benchmarks/mem_attention.py`` prints the numbers).
Everything skips cleanly without CUDA (and the triton / flash-attn cases without their package).
"""

from __future__ import annotations

import math

import pytest
import torch

from minillama.attention import available_backends, get_backend

# why triton / flash-attn cannot run here (no GPU, package missing, ...), or None
REASONS = available_backends()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]


def _backend(name: str):
    return pytest.param(name, marks=pytest.mark.skipif(REASONS[name] is not None, reason=str(REASONS[name])))


BACKENDS = ["torch", _backend("triton"), _backend("flash-attn")]
OURS = ["torch", _backend("triton")]  # the two re-implementations
DTYPE = torch.bfloat16
BLOCK = 256  # flash-attn's paged KV needs blocks of a multiple of 256
EPS = 2e-3


def pick(name: str, monkeypatch: pytest.MonkeyPatch):
    """The backend called ``name`` (``monkeypatch`` is kept for the tests' signatures)."""
    return get_backend(name)


# ---------------------------------------------------------------------------------------------
# Reference and the plain-bf16 error budget
# ---------------------------------------------------------------------------------------------


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, low_precision: bool) -> torch.Tensor:
    """One sequence, q (sq, H, D), k/v (sk, Hk, D), fully masked rows 0.

    ``low_precision=False``: float64 throughout (the reference). ``True``: the plain bf16
    attention people write, bf16 matmuls with a float32 softmax.
    """
    sq, H, D = q.shape
    sk, Hk, _ = k.shape
    dt = q.dtype if low_precision else torch.float64
    qh = q.to(dt).transpose(0, 1)  # (H, sq, D)
    kh = k.to(dt).repeat_interleave(H // Hk, dim=1).transpose(0, 1)  # GQA: head h reads kv head h // group
    vh = v.to(dt).repeat_interleave(H // Hk, dim=1).transpose(0, 1)
    scores = (qh @ kh.transpose(1, 2)) * (1.0 / math.sqrt(D))
    i = torch.arange(sq, device=q.device)[:, None]
    j = torch.arange(sk, device=q.device)[None, :]
    visible = (j <= i + sk - sq) if causal else torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    scores = scores.float() if low_precision else scores
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
    return (probs.to(dt) @ vh).transpose(0, 1)  # (sq, H, D)


def assert_within_bf16_budget(outs: list[torch.Tensor], qs: list, ks: list, vs: list, causal: bool) -> None:
    """max|out - ref| over all sequences must stay within 2x that of plain bf16 attention (+EPS)."""
    fast_err = plain_err = 0.0
    for out, q, k, v in zip(outs, qs, ks, vs, strict=True):
        ref = naive_attention(q, k, v, causal, low_precision=False)
        plain = naive_attention(q, k, v, causal, low_precision=True)
        assert not out.isnan().any()
        fast_err = max(fast_err, (out.double() - ref).abs().max().item())
        plain_err = max(plain_err, (plain.double() - ref).abs().max().item())
    assert fast_err <= 2 * plain_err + EPS, f"error {fast_err:.2e} vs plain bf16 {plain_err:.2e}"


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def cu(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0] + lengths, dtype=torch.int32, device="cuda").cumsum(0, dtype=torch.int32)


def paged(ks: list[torch.Tensor], vs: list[torch.Tensor], capacity: list[int], gen: torch.Generator):
    """Caches (num_blocks, BLOCK, Hk, D) holding each sequence's rows through a shuffled block table.

    Unused slots hold large finite garbage, unused table entries -1.
    """
    Hk, D = ks[0].shape[1:]
    need = [-(-c // BLOCK) for c in capacity]
    num_blocks = sum(need) + 2
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    k_cache = (torch.randn(num_blocks, BLOCK, Hk, D, generator=gen) * 100).to(DTYPE).cuda()
    v_cache = (torch.randn(num_blocks, BLOCK, Hk, D, generator=gen) * 100).to(DTYPE).cuda()
    table = torch.full((len(ks), max(need)), -1, dtype=torch.int32)
    for b in range(len(ks)):
        for i in range(need[b]):
            table[b, i] = blk = perm.pop()
            rows = slice(i * BLOCK, (i + 1) * BLOCK)
            n = ks[b][rows].shape[0]
            k_cache[blk, :n] = ks[b][rows]
            v_cache[blk, :n] = vs[b][rows]
    return k_cache, v_cache, table.cuda()


def rand(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(DTYPE).cuda()


SHAPES = {  # name -> (query lengths, cached-prefix lengths)
    "one-long": ([1000], [0]),
    "mixed": ([37, 1, 300, 1, 9, 600], [0, 57, 300, 0, 256, 700]),
    "many-short": ([1 + (7 * b) % 40 for b in range(32)], [(13 * b) % 90 for b in range(32)]),
}
GQA = [(8, 1), (2, 4), (4, 3)]


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("gqa", GQA, ids=lambda g: f"hk{g[0]}x{g[1]}")
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen(backend: str, shape: str, gqa: tuple[int, int], causal: bool) -> None:
    fn = get_backend(backend).varlen
    q_lens, prefix = SHAPES[shape]
    k_lens = [n + p for n, p in zip(q_lens, prefix, strict=True)]
    Hk, group = gqa
    gen = torch.Generator().manual_seed(len(shape) + Hk)
    q = rand(gen, sum(q_lens), Hk * group, 128)
    k, v = rand(gen, sum(k_lens), Hk, 128), rand(gen, sum(k_lens), Hk, 128)
    out = fn(q, k, v, cu(q_lens), cu(k_lens), max(q_lens), max(k_lens), causal=causal)
    assert out.shape == q.shape and out.dtype == DTYPE
    assert_within_bf16_budget(list(out.split(q_lens)), list(q.split(q_lens)), list(k.split(k_lens)),
                              list(v.split(k_lens)), causal)


@pytest.mark.parametrize("gqa", GQA, ids=lambda g: f"hk{g[0]}x{g[1]}")
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_paged(backend: str, shape: str, gqa: tuple[int, int]) -> None:
    fn = get_backend(backend).varlen
    q_lens, prefix = SHAPES[shape]
    k_lens = [n + p for n, p in zip(q_lens, prefix, strict=True)]
    Hk, group = gqa
    gen = torch.Generator().manual_seed(len(shape) * 3 + Hk)
    q = rand(gen, sum(q_lens), Hk * group, 128)
    ks = [rand(gen, n, Hk, 128) for n in k_lens]
    vs = [rand(gen, n, Hk, 128) for n in k_lens]
    k_cache, v_cache, table = paged(ks, vs, k_lens, gen)
    out = fn(q, k_cache, v_cache, cu(q_lens), cu(k_lens), max(q_lens), max(k_lens), causal=True, block_table=table)
    assert_within_bf16_budget(list(out.split(q_lens)), list(q.split(q_lens)), ks, vs, causal=True)


@pytest.mark.parametrize(("batch", "seqlen_q"), [(1, 1), (32, 1), (8, 4)])
@pytest.mark.parametrize("gqa", GQA, ids=lambda g: f"hk{g[0]}x{g[1]}")
@pytest.mark.parametrize("backend", BACKENDS)
def test_kvcache_paged_decode(backend: str, gqa: tuple[int, int], batch: int, seqlen_q: int, monkeypatch) -> None:
    fn = pick(backend, monkeypatch).with_kvcache
    Hk, group = gqa
    gen = torch.Generator().manual_seed(batch * 10 + seqlen_q + Hk)
    cached = torch.randint(0, 1500, (batch,), generator=gen).tolist()
    total = [c + seqlen_q for c in cached]
    ks = [rand(gen, n, Hk, 128) for n in total]
    vs = [rand(gen, n, Hk, 128) for n in total]
    k_cache, v_cache, table = paged([x[:c] for x, c in zip(ks, cached, strict=True)],
                                    [x[:c] for x, c in zip(vs, cached, strict=True)], total, gen)
    q = rand(gen, batch, seqlen_q, Hk * group, 128)
    k_new = torch.stack([x[c:] for x, c in zip(ks, cached, strict=True)])
    v_new = torch.stack([x[c:] for x, c in zip(vs, cached, strict=True)])
    out, lse = fn(q, k_cache, v_cache, k_new, v_new, cache_seqlens=torch.tensor(cached, dtype=torch.int32).cuda(),
                  block_table=table, causal=True, return_softmax_lse=True)
    assert lse.shape == (batch, Hk * group, seqlen_q)
    for b in range(batch):  # the appended rows landed where the block table says
        for p in range(cached[b], total[b]):
            torch.testing.assert_close(k_cache[table[b, p // BLOCK], p % BLOCK], ks[b][p], atol=0, rtol=0)
            torch.testing.assert_close(v_cache[table[b, p // BLOCK], p % BLOCK], vs[b][p], atol=0, rtol=0)
    assert_within_bf16_budget(list(out), list(q), ks, vs, causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_uninitialised_cache_slots_do_not_leak(backend: str, monkeypatch) -> None:
    """NaN in unused slots of a sequence's last block (e.g. a cache from torch.empty) must not reach the output."""
    fn = pick(backend, monkeypatch).with_kvcache
    gen = torch.Generator().manual_seed(0)
    cached = [5, 300, 0]
    ks = [rand(gen, n + 1, 2, 128) for n in cached]
    vs = [rand(gen, n + 1, 2, 128) for n in cached]
    k_cache, v_cache, table = paged([x[:c] for x, c in zip(ks, cached, strict=True)],
                                    [x[:c] for x, c in zip(vs, cached, strict=True)], [c + 1 for c in cached], gen)
    for b, c in enumerate(cached):  # everything past each sequence's keys -> NaN
        for p in range(c, -(-(c + 1) // BLOCK) * BLOCK):
            k_cache[table[b, p // BLOCK], p % BLOCK] = float("nan")
            v_cache[table[b, p // BLOCK], p % BLOCK] = float("nan")
    q = rand(gen, 3, 1, 8, 128)
    k_new = torch.stack([x[c:] for x, c in zip(ks, cached, strict=True)])
    v_new = torch.stack([x[c:] for x, c in zip(vs, cached, strict=True)])
    out = fn(q, k_cache, v_cache, k_new, v_new, cache_seqlens=torch.tensor(cached, dtype=torch.int32).cuda(),
             block_table=table, causal=True)
    assert_within_bf16_budget(list(out), list(q), ks, vs, causal=True)


@pytest.mark.parametrize("backend", OURS)
def test_backend_does_not_sync(backend: str, monkeypatch) -> None:
    """torch.cuda's sync debug mode turns any host synchronisation inside the calls into an error."""
    backend = pick(backend, monkeypatch)
    gen = torch.Generator().manual_seed(1)
    q_lens, k_lens = [5, 1, 30], [5, 40, 300]
    ks = [rand(gen, n, 2, 64) for n in k_lens]
    vs = [rand(gen, n, 2, 64) for n in k_lens]
    k_cache, v_cache, table = paged(ks, vs, [n + 1 for n in k_lens], gen)
    q, cu_q, cu_k = rand(gen, sum(q_lens), 8, 64), cu(q_lens), cu(k_lens)
    q_dec, new = rand(gen, 3, 1, 8, 64), rand(gen, 3, 1, 2, 64)
    seqlens = torch.tensor(k_lens, dtype=torch.int32).cuda()
    k_flat, v_flat = torch.cat(ks), torch.cat(vs)

    def calls() -> None:
        backend.varlen(q, k_cache, v_cache, cu_q, cu_k, max(q_lens), max(k_lens), causal=True, block_table=table)
        backend.varlen(q, k_flat, v_flat, cu_q, cu_k, max(q_lens), max(k_lens), causal=True)
        backend.with_kvcache(q_dec, k_cache, v_cache, new, new, cache_seqlens=seqlens, block_table=table,
                             causal=True, return_softmax_lse=True)

    calls()  # first calls compile the Triton kernels (not what is checked here)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        calls()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("backend", OURS)
def test_backend_decode_in_cuda_graph(backend: str, monkeypatch) -> None:
    """Capture one paged decode step (with in-place append) in a CUDA graph, replay it on new inputs."""
    backend = pick(backend, monkeypatch)
    gen = torch.Generator().manual_seed(2)
    batch, Hk, H, D, block, max_blocks = 8, 2, 8, 64, 16, 6
    num_blocks = batch * max_blocks
    k_cache0, v_cache0 = rand(gen, num_blocks, block, Hk, D), rand(gen, num_blocks, block, Hk, D)
    table = torch.randperm(num_blocks, generator=gen).view(batch, max_blocks).int().cuda()
    # Static buffers the graph reads and writes.
    q, k_new, v_new = rand(gen, batch, 1, H, D), rand(gen, batch, 1, Hk, D), rand(gen, batch, 1, Hk, D)
    seqlens = torch.zeros(batch, dtype=torch.int32, device="cuda")
    k_cache, v_cache = k_cache0.clone(), v_cache0.clone()

    def step() -> torch.Tensor:
        return backend.with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=seqlens, block_table=table,
                                    causal=True)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()

    for trial in range(3):
        q.copy_(rand(gen, *q.shape))
        k_new.copy_(rand(gen, *k_new.shape))
        v_new.copy_(rand(gen, *v_new.shape))
        seqlens.copy_(torch.randint(0, block * max_blocks, (batch,), generator=gen, dtype=torch.int32))
        k_cache.copy_(k_cache0)
        v_cache.copy_(v_cache0)
        graph.replay()
        k_eager, v_eager = k_cache0.clone(), v_cache0.clone()
        expected = backend.with_kvcache(q, k_eager, v_eager, k_new, v_new, cache_seqlens=seqlens, block_table=table,
                                        causal=True)
        torch.cuda.synchronize()
        torch.testing.assert_close(out, expected, atol=0, rtol=0, msg=lambda m, t=trial: f"replay {t}: {m}")
        torch.testing.assert_close(k_cache, k_eager, atol=0, rtol=0)
        torch.testing.assert_close(v_cache, v_eager, atol=0, rtol=0)


@pytest.mark.parametrize("backend", OURS)
def test_strided_block_table_and_lengths(backend: str, monkeypatch) -> None:
    """A block table or length vector that is a strided view reads the same keys as a contiguous one."""
    fn = pick(backend, monkeypatch).with_kvcache
    gen = torch.Generator().manual_seed(4)
    cached = [300, 17, 600]
    ks = [rand(gen, n, 2, 64) for n in cached]
    vs = [rand(gen, n, 2, 64) for n in cached]
    k_cache, v_cache, table = paged(ks, vs, cached, gen)
    q = rand(gen, 3, 1, 8, 64)
    wide = torch.zeros(3, 2 * table.shape[1], dtype=torch.int32, device="cuda")
    wide[:, ::2] = table
    lens = torch.tensor([[n, 0] for n in cached], dtype=torch.int32, device="cuda")
    strided = fn(q, k_cache, v_cache, cache_seqlens=lens[:, 0], block_table=wide[:, ::2])
    plain = fn(q, k_cache, v_cache, cache_seqlens=lens[:, 0].contiguous(), block_table=table)
    torch.testing.assert_close(strided, plain, atol=0, rtol=0)


def test_which_kernels_run(monkeypatch) -> None:
    """The triton backend's prefill and paged decode go to its kernels; the torch backend never does."""
    from minillama.attention import triton_decode, triton_prefill

    calls = []
    for mod, name in ((triton_decode, "paged_decode"), (triton_prefill, "varlen_prefill")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    gen = torch.Generator().manual_seed(3)
    ks, vs = [rand(gen, 40, 2, 64)], [rand(gen, 40, 2, 64)]
    k_cache, v_cache, table = paged(ks, vs, [40], gen)
    q, qp = rand(gen, 1, 1, 8, 64), rand(gen, 40, 8, 64)
    seqlens = torch.tensor([40], dtype=torch.int32, device="cuda")
    cu40 = cu([40])
    outs = {}
    for name in ("torch", "triton"):
        if REASONS[name] is not None:
            continue
        be = get_backend(name)
        calls.clear()
        dec = be.with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, block_table=table)
        pre = be.varlen(qp, k_cache, v_cache, cu40, cu40, 40, 40, causal=True, block_table=table)
        assert calls == ([] if name == "torch" else ["paged_decode", "varlen_prefill"]), (name, calls)
        outs[name] = (dec, pre)
        assert_within_bf16_budget([dec[0]], [q[0]], ks, vs, causal=True)
        assert_within_bf16_budget([pre], [qp], ks, vs, causal=True)


# ---------------------------------------------------------------------------------------------
# Memory of the torch backend's calls
# ---------------------------------------------------------------------------------------------


def _mem_probe():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "mem_attention.py"
    spec = importlib.util.spec_from_file_location("mem_attention", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("case", ["prefill 4x2048", "prefill 4x2048 paged", "prefill 4x2048 on 2048 cached",
                                  "prefill 2x4096", "prefill 2x4096 on 4096 cached", "prefill 512 on 2048 cached",
                                  "decode 256 x 1024", "decode 256 x 4096"])
def test_torch_backend_memory_bound(case: str) -> None:
    """Peak memory of one call beyond its inputs and output stays within 2x the output, one tile and its key index."""
    probe = _mem_probe()
    row = probe.measure("torch", probe.CASES[case])
    print(f"\n{case}: extra {row['extra'] / 2**20:.1f} MiB, output {row['out'] / 2**20:.1f} MiB, "
          f"tile {row['tile'] / 2**20:.1f} MiB, bound {row['bound'] / 2**20:.1f} MiB")
    assert row["extra"] <= row["bound"], row
