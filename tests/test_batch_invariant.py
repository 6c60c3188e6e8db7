"""Batch-invariant mode on CPU: each op's rows do not depend on the batch, the results stay correct, and
``check-invariance`` reports every condition bit-identical (and, without the mode, names what changed)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minillama import LLM, SamplingParams
from minillama.context import Context
from minillama.layers import batch_invariant as bi
from minillama.layers import invariant_attention as ia


def bits(x: torch.Tensor) -> bytes:
    return x.detach().contiguous().numpy().tobytes()


# ---- the ops ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("tile", [1, 8])
@pytest.mark.parametrize("k,n", [(64, 96), (576, 1536)])
def test_tiled_linear_rows_do_not_depend_on_the_batch(monkeypatch, k, n, tile):
    monkeypatch.setitem(bi.ROW_TILE, "cpu", tile)
    g = torch.Generator().manual_seed(k)
    w, x = torch.randn(n, k, generator=g) * 0.05, torch.randn(21, k, generator=g)
    full = bi.linear(x, w)
    torch.testing.assert_close(full, F.linear(x, w), rtol=1e-5, atol=1e-5)
    for start, m in [(0, 1), (3, 1), (5, 2), (0, 3), (7, 5), (2, 9), (4, 17)]:
        part = bi.linear(x[start:start + m], w)
        assert bits(part) == bits(full[start:start + m]), f"rows {start}..{start + m} changed with M={m}"
    with_others = bi.linear(torch.cat([torch.randn(5, k, generator=g), x[:1]]), w)[-1]
    assert bits(with_others) == bits(full[0])


def test_fixed_bmm_and_tree_sum():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(150, 3, 16, generator=g), torch.randn(150, 16, 70, generator=g)
    full = bi.fixed_bmm(a, b, torch.float32)
    torch.testing.assert_close(full, torch.bmm(a, b), rtol=1e-5, atol=1e-5)
    assert bits(bi.fixed_bmm(a[100:103], b[100:103], torch.float32)) == bits(full[100:103])
    x = torch.randn(4, 37, 5, generator=g)
    s = bi.tree_sum(x, 1)
    torch.testing.assert_close(s, x.sum(1), rtol=1e-5, atol=1e-5)
    assert bits(bi.tree_sum(x[2:3], 1)) == bits(s[2:3])
    assert bi.tree_sum(torch.arange(7.0)[None], 1).item() == 21.0


def _cache(seed: int, lens: list[int], block: int, hk: int = 2, d: int = 8):
    """Each request's keys/values, laid into a paged cache of ``block``-token blocks (blocks shuffled)."""
    g = torch.Generator().manual_seed(seed)
    keys = [torch.randn(n, hk, d, generator=g) for n in lens]
    vals = [torch.randn(n, hk, d, generator=g) for n in lens]
    need = [-(-n // block) for n in lens]
    order = torch.randperm(sum(need) + 1, generator=g).tolist()
    kc, vc = torch.zeros(len(order) + 1, block, hk, d), torch.zeros(len(order) + 1, block, hk, d)
    tables, at = [], 0
    for n, kk, vv, nb in zip(lens, keys, vals, need, strict=True):
        t = order[at:at + nb]
        at += nb
        for p in range(n):
            kc[t[p // block], p % block], vc[t[p // block], p % block] = kk[p], vv[p]
        tables.append(t)
    width = max(need)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    return keys, vals, kc, vc, bt


def _run(q_rows, chunks, keys, vals, kc, vc, bt, decode=False, flat=False):
    """Attention of the query rows of ``chunks`` ([(request, start, end)]) through the paged cache."""
    cu_q, cu_k, q, k, v = [0], [0], [], [], []
    for r, s, e in chunks:
        q.append(q_rows[r][s:e])
        k.append(keys[r][s:e])
        v.append(vals[r][s:e])
        cu_q.append(cu_q[-1] + e - s)
        cu_k.append(cu_k[-1] + e)
    tables = bt[[r for r, _s, _e in chunks]]
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    ends = [e for _r, _s, e in chunks]
    ctx = Context(is_prefill=not decode, cu_seqlens_q=i32(cu_q), cu_seqlens_k=i32(cu_k),
                  max_seqlen_q=max(e - s for _r, s, e in chunks), max_seqlen_k=max(ends),
                  context_lens=i32(ends) if decode else None, block_tables=None if flat else tables,
                  batch_invariant=True)
    return ia.attention(torch.cat(q), torch.cat(k), torch.cat(v), kc, vc, ctx, 0.3)


@pytest.mark.parametrize("tile,h,hk,d", [(4, 6, 2, 8), (64, 6, 2, 8), (16, 9, 3, 64)])
def test_invariant_attention_is_correct_and_the_same_however_rows_are_batched(monkeypatch, tile, h, hk, d):
    monkeypatch.setitem(ia.KEY_TILE, "cpu", tile)
    if tile == 4:
        monkeypatch.setitem(ia.Q_BLOCK, "cpu", 4)  # several query blocks per request
        monkeypatch.setitem(ia.BLOCK_CHUNK, "cpu", 3)  # blocks in passes of 3: the same bits
    lens, g_heads = [19, 7, 30], h // hk
    keys, vals, kc, vc, bt = _cache(0, lens, block=4, hk=hk, d=d)
    g = torch.Generator().manual_seed(5)
    q_rows = [torch.randn(n, h, d, generator=g) for n in lens]
    whole = _run(q_rows, [(r, 0, n) for r, n in enumerate(lens)], keys, vals, kc, vc, bt)
    at = 0
    for r, n in enumerate(lens):  # against float64 causal attention, request by request
        qq = q_rows[r].double()
        kk, vv = (x[r].double().repeat_interleave(g_heads, 1) for x in (keys, vals))
        s = torch.einsum("qhd,khd->hqk", qq, kk) * 0.3
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        want = torch.einsum("hqk,khd->qhd", s.softmax(-1), vv)
        torch.testing.assert_close(whole[at:at + n].double(), want, rtol=1e-5, atol=1e-5)
        at += n
    row = lambda r, p: whole[sum(lens[:r]) + p]  # noqa: E731
    chunked = _run(q_rows, [(2, 0, 11), (0, 5, 19)], keys, vals, kc, vc, bt)
    assert bits(chunked[11 + 3]) == bits(row(0, 8)) and bits(chunked[4]) == bits(row(2, 4))
    decode = _run(q_rows, [(1, 6, 7), (2, 29, 30), (0, 12, 13)], keys, vals, kc, vc, bt, decode=True)
    assert bits(decode[0]) == bits(row(1, 6)) and bits(decode[1]) == bits(row(2, 29))
    assert bits(decode[2]) == bits(row(0, 12))
    alone = _run(q_rows, [(2, 29, 30)], keys, vals, kc, vc, bt, decode=True)  # one request: other layouts
    assert bits(alone[0]) == bits(row(2, 29))
    flat = _run(q_rows, [(1, 0, 7), (0, 0, 19)], keys, vals, kc, vc, bt, flat=True)  # keys from the step itself
    assert bits(flat[7:]) == bits(whole[:19]) and bits(flat[:7]) == bits(whole[19:26])
    k2, v2, kc2, vc2, bt2 = _cache(0, lens, block=8, hk=hk, d=d)  # same values, another block size and layout
    other = _run(q_rows, [(0, 0, 19)], k2, v2, kc2, vc2, bt2)
    assert bits(other) == bits(whole[:19])


# ---- the engine -------------------------------------------------------------------------------------
PROMPTS = [[1] + list(range(30, 60)), [1, 7, 8, 9, 10]]


def test_batch_invariant_engine_answers_like_the_default(tiny_llama_dir):
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    kw = dict(device="cpu", max_model_len=128, num_kvcache_blocks=64)
    plain, inv = LLM(tiny_llama_dir, **kw), LLM(tiny_llama_dir, batch_invariant=True, **kw)
    assert [o.token_ids for o in plain.generate(PROMPTS, params)] == [o.token_ids for o in inv.generate(PROMPTS, params)]
    torch.testing.assert_close(inv.prompt_logits(PROMPTS[0]), plain.prompt_logits(PROMPTS[0]), rtol=1e-4, atol=1e-4)


def test_check_invariance_bit_identical_with_the_mode(tiny_llama_dir, tmp_path, monkeypatch):
    from minillama.debug.invariance import Checker

    monkeypatch.setitem(ia.KEY_TILE, "cpu", 8)  # several key tiles per row, some of them masked
    engine = dict(model=tiny_llama_dir, device="cpu", max_model_len=128, num_kvcache_blocks=64,
                  kvcache_block_size=16, batch_invariant=True)
    outcomes = Checker(engine, str(tmp_path), max_tokens=5).check([PROMPTS[0]])
    ran = [o for o in outcomes if o.skipped is None]
    assert len(ran) == 8 and [o.condition.name for o in outcomes if o.skipped] == [
        "eager (reference replays CUDA graphs)"]
    assert all(o.identical for o in ran), [(o.condition.name, o.diff.first) for o in ran if not o.identical]
    assert all(o.diff.positions > 0 for o in ran)


def test_check_invariance_without_the_mode_names_what_changed(tiny_llama_dir, tmp_path, capsys):
    from minillama.cli import main
    from tests.test_diff import reference_first

    prompt = " ".join(f"w{i}" for i in range(30, 52))
    args = ["check-invariance", "--model", tiny_llama_dir, "--prompt", prompt, "--raw", "--device", "cpu",
            "--max-model-len", "128", "--max-tokens", "4", "--out", str(tmp_path / "t"), "--json"]
    code = main(args)
    doc = json.loads(capsys.readouterr().out)
    ref = doc["outcomes"][0]["trace"].rsplit("/", 1)[0] + "/run000"
    changed = 0
    for o in doc["outcomes"]:
        if o["skipped"]:
            continue
        d = o["diff"]
        want = reference_first(ref, o["trace"], d["seq_a"], d["seq_b"])
        if want is None:
            assert o["identical"]
            continue
        changed += 1
        assert (d["first"]["position"], d["first"]["site"]) == want[:2], o["condition"]
        assert d["first"]["how"] == "full" and np.isclose(d["first"]["size"], want[2], rtol=0, atol=0)
    assert code == (1 if changed else 0)


def test_check_invariance_bad_input_is_one_line(tiny_llama_dir, capsys):
    from minillama.cli import main

    prompt = " ".join(f"w{i}" for i in range(10, 90))
    code = main(["check-invariance", "--model", tiny_llama_dir, "--prompt", prompt, "--raw", "--device", "cpu",
                 "--max-model-len", "64"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "max_model_len is 64" in err


@pytest.mark.slow
def test_check_invariance_bit_identical_on_the_builtin_model(tmp_path, monkeypatch):
    """The built-in model (30 layers, GQA 9/3, head 64): every condition bit-identical, keys in several tiles."""
    from minillama.debug.invariance import Checker

    monkeypatch.setitem(ia.KEY_TILE, "cpu", 16)
    engine = dict(model=None, device="cpu", max_model_len=256, num_kvcache_blocks=128, kvcache_block_size=16,
                  batch_invariant=True)
    checker = Checker(engine, str(tmp_path), max_tokens=4, full=False)
    ids = checker.llm().tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    ran = [o for o in checker.check([ids]) if o.skipped is None]
    assert len(ran) == 8 and all(o.identical for o in ran), [(o.condition.name, o.diff.first) for o in ran]
