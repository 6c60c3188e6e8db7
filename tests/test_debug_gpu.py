"""The debugger at engine speed on a GPU: device statistics, recording under CUDA graphs, no host sync.

Skips cleanly without CUDA (and without flash_attn where the test needs it). Run on the device:
``pytest tests/test_debug_gpu.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minillama import LLM, SamplingParams, hooks
from minillama.context import get_context
from minillama.debug import devstats
from minillama.debug import site_stats as held_sites
from minillama.debug.recorder import Recorder
from minillama.debug.snapshot import views
from minillama.debug.stepbuf import RING, StatsBuffer, stats_table
from minillama.trace.tables import site_stats
from tests.test_devstats import M32, py_lanes, row_words

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _tables(x: torch.Tensor, seq: torch.Tensor, pos: torch.Tensor, reqs: int, device: str):
    """Run one site's statistics on ``device``; return numpy (moments, keys, bad, lanes)."""
    from minillama.debug.stepbuf import StatsBuffer

    buf = StatsBuffer(1, reqs, x.shape[0], (0, 0), torch.device(device))
    buf.reset(reqs)
    if device == "cuda":
        devstats.site_stats_cuda(x.cuda(), 0, seq.cuda(), pos.cuda(), buf.moments, buf.keys, buf.bad, buf.rows)
    else:
        t = buf.numpy_tables()
        devstats.site_stats_cpu(x, 0, seq.numpy(), pos.numpy(), t["moments"], t["keys"], t["bad"], t["lanes"])
    counts = np.zeros((reqs, 2))
    counts[:, 0] = np.bincount(seq.numpy(), minlength=reqs)  # every row a new token, none samples
    snap = buf.snapshot(reqs, x.shape[0], counts).tables()
    return {k: v.copy() for k, v in snap.items() if k != "shadow"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16, torch.int32])
@pytest.mark.parametrize("width", [1, 64, 576, 5000])
def test_kernel_equals_the_definition(dtype, width):
    g = torch.Generator().manual_seed(width)
    rows = 37
    if dtype == torch.int32:
        x = torch.randint(-1000, 50000, (rows, width), generator=g, dtype=torch.int32)
    else:
        x = (torch.randn(rows, width, generator=g) * 3).to(dtype)
        x[3, 0] = float("nan")
        x[5, width // 2] = float("inf")
        x[5, 0] = float("-inf")
    seq = torch.tensor([0] * 10 + [1] * 1 + [2] * 20 + [3] * 6, dtype=torch.int32)
    pos = torch.cat([torch.arange(10), torch.tensor([99]), torch.arange(300, 320), torch.arange(6)]).long()
    gpu = _tables(x, seq, pos, 4, "cuda")
    cpu = _tables(x, seq, pos, 4, "cpu")
    assert np.array_equal(gpu["lanes"], cpu["lanes"]), "the kernel's hash lanes differ from the definition"
    assert np.array_equal(gpu["keys"], cpu["keys"]) and np.array_equal(gpu["bad"], cpu["bad"])
    np.testing.assert_allclose(gpu["moments"], cpu["moments"], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(gpu["stats"], cpu["stats"], rtol=1e-5, atol=1e-4)  # finished on either device
    words = row_words(x)
    for row in (0, 10, 36):  # and both against the plain-Python yardstick
        assert tuple(int(v) & M32 for v in gpu["lanes"][row, 0]) == py_lanes(words[row].tolist(), int(pos[row]))


def _gpu_llm(backend: str = "torch") -> LLM:
    return LLM(None, device="cuda", backend=backend, max_model_len=1024, max_num_seqs=16,
               max_num_batched_tokens=256, num_kvcache_blocks=64)


@pytest.mark.parametrize("decode", [True, False])
def test_gpu_yardstick_equals_the_torch_yardstick(decode):
    """The Triton op-by-op kernels give the torch yardstick's reference, and a budget of the same size."""
    from minillama.context import Context
    from minillama.debug import yardstick, yardstick_gpu
    from minillama.layers.attention import AttentionCall

    g = torch.Generator(device="cuda").manual_seed(1)
    heads, kv_heads, d, bs = 9, 3, 64, 16
    lens = [37, 300, 5, 129]
    qlens = [1] * 4 if decode else [37, 40, 5, 1]
    rows = sum(qlens)
    dev = "cuda"
    q = torch.randn(rows, heads, d, generator=g, device=dev).bfloat16()
    kc = torch.randn(200, bs, kv_heads, d, generator=g, device=dev).bfloat16()
    vc = torch.randn(200, bs, kv_heads, d, generator=g, device=dev).bfloat16()
    width = max(lens)
    bt = torch.randperm(199, generator=torch.Generator().manual_seed(0))[: 4 * (-(-width // bs))]
    bt = bt.view(4, -1).int().to(dev)
    seq = torch.tensor([i for i, n in enumerate(qlens) for _ in range(n)], dtype=torch.int32, device=dev)
    pos = torch.tensor([l_ - n + k for l_, n in zip(lens, qlens, strict=True) for k in range(n)], device=dev)
    cu_q = torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    cu_k = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    ctx = Context(is_prefill=not decode, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(qlens),
                  max_seqlen_k=width, block_tables=bt, context_lens=torch.tensor(lens, dtype=torch.int32, device=dev),
                  positions=pos, seq_index=seq)
    call = AttentionCall(0, q, q[:, :kv_heads], q[:, :kv_heads], kc, vc, ctx, d**-0.5)
    ref_t, plain_t = yardstick.judge(call, torch.bfloat16, width)
    ref_g, plain_g = yardstick_gpu.judge(call, torch.bfloat16, width)
    torch.testing.assert_close(ref_g, ref_t.float(), rtol=1e-5, atol=1e-6)
    budget_t = (plain_t.float() - ref_t.float()).abs()
    budget_g = (plain_g.float() - ref_g).abs()
    assert budget_g.max() <= 2 * budget_t.max() and budget_g.pow(2).mean() <= 2 * budget_t.pow(2).mean()
    assert budget_g.max() > 0


@pytest.fixture(scope="module")
def llm():
    return _gpu_llm()


@pytest.fixture(scope="module")
def flash_llm():
    if not _has_flash():
        pytest.skip("needs flash_attn")
    return _gpu_llm("flash-attn")


def _prompts(llm, n):
    tok = llm.tokenizer
    return [tok.encode_chat([{"role": "user", "content": f"Count to {i + 3}, please."}]) for i in range(n)]


class _StepSpy:
    """Keeps every tensor of each step with its rows' requests and positions, as device copies: no
    host copy at the sites, so the recorder's launches are not ordered by waits of the spy's own. Steps
    are kept apart: a "device" listener lets steps overlap, so the step that ``llm.step()`` returns
    after is not always the one the tensors came from."""

    def __init__(self, mode: str) -> None:
        self.hook_mode = mode
        self.steps: dict[int, dict] = {}

    def __call__(self, site, tensor, info) -> None:
        if hooks.capturing or tensor is None or site.endswith("attn.call") or site.startswith("step."):
            return  # (called during graph capture too: nothing belongs there)
        ctx = get_context()
        if site in ("logits", "sampled"):
            seq, pos = ctx.sample_index, ctx.positions[ctx.sample_rows]
        else:
            seq, pos = ctx.seq_index, ctx.positions
        self.steps.setdefault(ctx.step, {})[site] = (tensor.detach().clone(), seq.clone(), pos.clone())

    def seen(self, step: int) -> dict[str, tuple[torch.Tensor, np.ndarray, np.ndarray]]:
        return {k: (x, seq.cpu().numpy(), pos.cpu().numpy()) for k, (x, seq, pos) in self.steps[step].items()}


@pytest.mark.parametrize("spy_mode,hold", [("eager", None), ("device", None), ("device", 1 << 20)])
def test_bf16_step_stats_match_the_host(llm, spy_mode, hold, monkeypatch):
    """Every site of a mixed step on the GPU (bf16), per request, against the full tensors: with an
    eager listener (one kernel per site) and at speed (eager sites held, one kernel at the pass's end;
    with ``hold`` bytes, several launches within the pass)."""
    if hold is not None:
        monkeypatch.setattr(held_sites, "HOLD_BYTES", hold)
    launches: list[tuple[int, int]] = []  # (step, held sites) per launch of the held path
    flush = held_sites.SiteStats.flush

    def counted(self):
        if self._held:
            launches.append((get_context().step, len(self._held)))
        flush(self)
    monkeypatch.setattr(held_sites.SiteStats, "flush", counted)
    spy = _StepSpy(spy_mode)
    rec = Recorder(llm, history=16)
    hooks.attach(spy)  # either way the steps run without graphs: they prefill
    rec.attach()
    try:
        params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
        p = _prompts(llm, 3)
        llm.add_request(p[0], params)
        llm.step()
        llm.add_request(p[1], params)
        llm.add_request(p[2], params)
        while llm.has_unfinished():
            llm.step()
    finally:
        rec.detach()
        hooks.detach(spy)
    mixed = [r for r in rec.history if r.event["phase"] == "mixed"]
    assert mixed, [r.event["phase"] for r in rec.history]
    last = mixed[0]
    event = rec.event_of(last)
    assert not event["missing_sites"]
    tables = last.tables(False)
    catalog = [s.to_json() for s in rec.catalog]
    seen = spy.seen(last.step)
    tokens = len(hooks.expected_sites(llm.model_config.num_hidden_layers)) - 2  # all but logits, sampled
    mine = [n for step, n in launches if step == last.step]
    if spy_mode == "eager":
        assert launches == []
    elif hold is None:
        assert mine == [tokens], launches  # the pass's token sites, all in one launch
    else:
        assert len(mine) >= 2 and sum(mine) == tokens, launches  # each site once, over several launches
    for slot, spec in enumerate(catalog):
        x, seq, pos = seen[spec["name"]]
        words = row_words(x.cpu())
        for req in sorted(set(seq.tolist())):
            rows = np.flatnonzero(seq == req)
            got = site_stats(tables, spec, slot, event["batch"], req)
            vals = x.reshape(x.shape[0], -1)[torch.from_numpy(rows).to(x.device)].double().cpu().numpy()
            assert got["mean"] == pytest.approx(vals.mean(), rel=1e-4, abs=1e-5), spec["name"]
            assert (got["min"], got["max"]) == (vals.min(), vals.max()), spec["name"]
            row = int(rows[0])
            assert tuple(int(v) & M32 for v in tables["hash"][row, slot]) == py_lanes(words[row].tolist(), int(pos[row]))


def _record(llm, prompts, graphs: bool):
    saved = llm.runner.graphs
    if not graphs:
        llm.runner.graphs = None
    rec = Recorder(llm, history=256)
    rec.attach()
    try:
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    finally:
        rec.detach()
        llm.runner.graphs = saved
    return rec, [o.token_ids for o in outs]


def test_graph_recording_equals_eager_recording(llm):
    prompts = _prompts(llm, 8)  # 8 sequences: the graph for 8 has no padding rows
    replays = llm.runner.graphs.num_replays
    g_rec, g_tok = _record(llm, prompts, True)
    assert llm.runner.graphs.num_replays > replays, "recording must replay CUDA graphs"
    e_rec, e_tok = _record(llm, prompts, False)
    assert g_tok == e_tok
    g = [g_rec.event_of(r) for r in g_rec.history]
    e = [e_rec.event_of(r) for r in e_rec.history]
    assert [x["phase"] for x in g] == [x["phase"] for x in e]
    assert any(x["graphed"] for x in g) and not any(x["graphed"] for x in e)
    catalog = [s.to_json() for s in g_rec.catalog]
    same_math = ["embed", "layers.0.input", "layers.0.attn.q", "layers.0.attn.k", "layers.0.attn.v"]
    for rg, re_, eg, ee in zip(g_rec.history, e_rec.history, g, e, strict=True):
        assert not eg["missing_sites"] and not ee["missing_sites"]
        tg, te = rg.tables(False), re_.tables(False)
        for name in same_math:
            slot = next(k for k, s in enumerate(catalog) if s["name"] == name)
            for req in range(len(eg["batch"]["seqs"])):
                assert site_stats(tg, catalog[slot], slot, eg["batch"], req)["hash"] == \
                    site_stats(te, catalog[slot], slot, ee["batch"], req)["hash"], (eg["step"], name, req)


@pytest.mark.parametrize("decode", [True, False])
def test_the_finish_kernel_equals_stats_table(decode):
    """``StatsBuffer.finish`` runs one kernel on the GPU (``devstats.finish_cuda``); it must give what
    ``stats_table`` gives on the host from the same sums, for decode steps (no counts read) and others."""
    width = np.array([1.0, 7, 64, 64, 3, 5, 1000, 1])
    per_sample = np.array([0, 0, 0, 0, 1, 1, 0, 1], bool)
    buf = StatsBuffer(8, 300, 16, (2, 3), torch.device("cuda"), per_sample, width)
    g = torch.Generator(device="cuda").manual_seed(0)
    for reqs in (5, 300, 1):
        buf.reset(buf.max_reqs)
        buf.moments.copy_(torch.randn(buf.moments.shape, device="cuda", dtype=torch.float64, generator=g) * 9)
        buf.keys.copy_(torch.randint(-2**31, 2**31 - 1, buf.keys.shape, device="cuda", generator=g, dtype=torch.int32))
        buf.keys[0, 1] = torch.tensor([devstats.KEY_MIN_INIT, devstats.KEY_MAX_INIT])  # a site with no finite value
        buf.bad.copy_(torch.randint(0, 2, buf.bad.shape, device="cuda", generator=g, dtype=torch.int32))
        buf.shadow.fill_(7.0)
        counts = np.ones((reqs, 2))
        if not decode:
            counts[:, 0] = np.arange(reqs) % 5  # a request with no new tokens has no values: NaN statistics
            counts[:, 1] = np.arange(reqs) % 2
        rows = np.where(per_sample[None, :], counts[:, 1:2], counts[:, 0:1])
        want = stats_table(buf.moments[:reqs].cpu(), buf.keys[:reqs].cpu(), buf.bad[:reqs].cpu(),
                           torch.from_numpy(rows * width))
        sums = {k: v[:reqs].cpu() for k, v in (("moments", buf.moments), ("keys", buf.keys), ("bad", buf.bad))}
        peek = buf.finish(reqs, counts, clear=False).cpu()  # a session paused inside the step: sums stay
        assert torch.equal(buf.moments[:reqs].cpu(), sums["moments"]) and torch.equal(buf.bad[:reqs].cpu(), sums["bad"])
        got = buf.finish(reqs, None if decode else counts).cpu()
        torch.testing.assert_close(peek, got, rtol=0, atol=0, equal_nan=True)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0, equal_nan=True)
        assert torch.isnan(got[0, 1, 2:]).all()
        done = views(buf.finished.cpu().numpy(), buf.rows.cpu().numpy(), buf.num_sites, buf.shadow_shape)
        assert (done["shadow"][:reqs] == 7.0).all(), "the statistics land beside the shadow metrics, not on them"
        for k, v in sums.items():  # the sums copied beside their statistics (what the snapshot carries)
            assert np.array_equal(done[k][:reqs], v.numpy()), k
        # and every accumulating row cleared behind them, the step's and the rest (graph padding rows)
        assert (buf.moments == 0).all() and (buf.bad == 0).all() and (buf.shadow == 0).all()
        assert (buf.keys[..., 0] == devstats.KEY_MIN_INIT).all() and (buf.keys[..., 1] == devstats.KEY_MAX_INIT).all()


def _decode_tables(tail: bool, device: str, reqs: int = 37) -> dict[str, np.ndarray]:
    """A decode step of ``reqs`` requests: two token sites, then the two sampling sites (logits-like
    float32 with a NaN and an Inf, int64 tokens), finished. On the GPU with ``tail`` the sampling
    sites go through the finish kernel (``StatsBuffer.finish``'s tail), else one kernel each; on the
    CPU through the numpy definition."""
    from minillama.debug.recorder import _low_words

    g = torch.Generator().manual_seed(3)
    per_sample = np.array([0, 0, 1, 1], bool)
    width = np.array([64.0, 576, 1000, 1])
    buf = StatsBuffer(4, reqs + 5, reqs + 5, (0, 0), torch.device(device), per_sample, width)
    buf.reset(reqs)
    seq, pos = torch.arange(reqs, dtype=torch.int32), torch.randint(0, 900, (reqs,), generator=g)
    sites = [(torch.randn(reqs, 64, generator=g) * 2).to(torch.bfloat16), torch.randn(reqs, 576, generator=g),
             torch.randn(reqs, 1000, generator=g) * 5, torch.randint(0, 2**40, (reqs,), generator=g)]
    sites[2][4, 7], sites[2][9, 0] = float("nan"), float("-inf")
    if device == "cpu":
        t = buf.numpy_tables()
        for slot, x in enumerate(sites):
            x = x.to(torch.int32) if x.dtype == torch.int64 else x
            devstats.site_stats_cpu(x, slot, seq.numpy(), pos.numpy(), t["moments"], t["keys"], t["bad"], t["lanes"])
        return buf.snapshot(reqs, reqs, None).tables()
    seq, pos, sites = seq.cuda(), pos.cuda(), [x.cuda() for x in sites]
    sites[3] = _low_words(sites[3])
    for slot, x in enumerate(sites[: 2 if tail else 4]):
        devstats.site_stats_cuda(x, slot, seq, pos, buf.moments, buf.keys, buf.bad, buf.rows)
    rest = [(devstats.rows_view(x), slot) for slot, x in enumerate(sites) if slot >= 2] if tail else []
    return buf.snapshot(reqs, reqs, None, rest, pos).tables()


def test_the_finish_kernel_adds_a_decode_steps_sampling_sites():
    """A decode step at speed saves the sampling sites' launches: the finish kernel adds them itself.
    Its tables must equal those of one kernel per site, and the numpy definition's."""
    cpu, alone, folded = _decode_tables(False, "cpu"), _decode_tables(False, "cuda"), _decode_tables(True, "cuda")
    for got in (alone, folded):
        assert np.array_equal(got["lanes"], cpu["lanes"]), "hash lanes"
        assert np.array_equal(got["keys"], cpu["keys"]) and np.array_equal(got["bad"], cpu["bad"])
        np.testing.assert_allclose(got["moments"], cpu["moments"], rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(got["stats"], cpu["stats"], rtol=1e-5, atol=1e-4, equal_nan=True)
    assert folded["bad"][4, 2, 0] == 1 and folded["bad"][9, 2, 1] == 1
    for k in ("moments", "stats"):  # one row per request: the same float sums either way
        np.testing.assert_array_equal(folded[k], alone[k])


def test_steps_that_leave_a_short_history_free_their_ring_slots(llm):
    """No trace writer (a headless session): steps past the history give their pinned slot back unread,
    so the engine never copies a slot out, and the steps still held read back."""
    rec = Recorder(llm, history=4)
    first = rec.num_records
    rec.attach()
    try:
        llm.generate(_prompts(llm, 4), SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    finally:
        rec.detach()
    assert rec.num_records - first > 3 * RING
    assert rec.buffer.evictions == 0
    for r in rec.history:
        assert r.tables(False)["stats"].shape[0] == len(rec.event_of(r)["batch"]["seqs"])


@pytest.mark.parametrize("active,shadow", [("flash-attn", "torch"), ("torch", "reference")])
def test_no_host_sync_at_hook_sites_while_recording(active, shadow, request):
    llm = request.getfixturevalue("flash_llm" if active == "flash-attn" else "llm")
    out = "ref" if shadow == "reference" else "shadow"  # a reference shadow has no backend output of its own
    rec = Recorder(llm, shadow=shadow, full_sites=["layers.3.attn.out", f"layers.3.attn.out@{out}"], history=64)
    rec.attach()
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    try:
        for p in _prompts(llm, 4):
            llm.add_request(p, params)
        llm.step()  # prefill
        llm.step()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(4):
                llm.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        while llm.has_unfinished():
            llm.step()
    finally:
        rec.detach()
    events = [rec.event_of(r) for r in rec.history]
    assert any(e["graphed"] for e in events), "decode steps must replay graphs with the shadow inside"
    assert all(not e["missing_sites"] for e in events)


def test_shadow_metrics_on_the_gpu(flash_llm):
    """flash-attn active, torch shadow, bf16: both within about 2x of plain attention's error."""
    from minillama.trace.tables import judge, layer_metrics

    rec = Recorder(flash_llm, shadow="torch", history=64)
    rec.attach()
    try:
        flash_llm.generate(_prompts(flash_llm, 5), SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    finally:
        rec.detach()
    per_row = 9 * 64
    for r in rec.history:
        ev = rec.event_of(r)
        t = r.tables(True)
        for layer in range(30):
            m = layer_metrics(t["shadow"], ev["batch"], layer, per_row, "bfloat16", True)
            assert m["budget"] > 0 and 0 < m["err_active"] < 0.1
            assert judge(m) is None, (ev["step"], layer, m)


def _has_flash() -> bool:
    from minillama.attention import available_backends

    return available_backends().get("flash-attn") is None


def test_a_writer_process_writes_what_the_writer_thread_writes_on_the_gpu(tmp_path, monkeypatch):
    """A graphed GPU recording (pinned ring, events) written by a thread and by a process of its own:
    the same steps, hashes, statistics (float64 atomics: to rounding) and text. A fresh engine each,
    so the second finds no prefix in the cache. The process is lent the ring's slots in place (memory
    it maps, page-locked here): no step goes through its sender thread."""
    from minillama.debug.manifest import build_manifest
    from minillama.debug.writer_process import ProcessWriter, trace_sink
    from minillama.trace import TraceReader
    from minillama.trace.writer import TraceWriter

    sent: list = []
    real = ProcessWriter._send_step
    monkeypatch.setattr(ProcessWriter, "_send_step", lambda self, *a: (sent.append(a), real(self, *a))[1])
    readers = []
    for kind in ("thread", "process"):
        llm = _gpu_llm()
        prompts = _prompts(llm, 8)
        rec = Recorder(llm)
        rec.set_sink(trace_sink(TraceWriter(tmp_path / kind, build_manifest(llm, rec)), rec, kind))
        rec.attach()
        try:
            llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
        finally:
            rec.detach()
        readers.append(TraceReader(tmp_path / kind))
        if kind == "process":
            assert rec.buffer.ring.shared and rec.buffer.ring.num_lent() == 0 and rec.buffer.evictions == 0
    a, b = readers
    assert not sent, "every step was lent"
    assert a.num_steps == b.num_steps > 10 and a.status == b.status == "complete"
    assert any(a.step(i)["graphed"] for i in range(a.num_steps))
    assert [q["text"] for q in a.requests().values()] == [q["text"] for q in b.requests().values()]
    for i in range(a.num_steps):
        ta, tb = a.tables(i), b.tables(i)
        assert np.array_equal(ta["hash"], tb["hash"])
        np.testing.assert_allclose(ta["stats"], tb["stats"], rtol=1e-6, atol=1e-6)
        assert np.array_equal(np.asarray(a.tensor(i, "sampled")), np.asarray(b.tensor(i, "sampled")))
