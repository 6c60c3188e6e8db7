"""Batch-invariant mode on a GPU (the built-in model, bfloat16): every ``check-invariance`` condition, CUDA
graphs against eager included, bit-identical with the torch backend; and the default mode's table for both
backends (printed, for the record).

Skips cleanly without CUDA. Run on the device: ``pytest -s tests/test_invariance_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SHORT = "What is the capital of France?"
# long enough (about 300 tokens) for a prefix-cache hit on a 256-token block (flash-attn's size)
LONG = ("Summarise the following notes in two sentences. " + " ".join(
    f"Note {i}: the river town's market opens at dawn, traders bring wool and cheese, and the ferry leaves at noon."
    for i in range(12)))


def _backend_or_skip(name: str) -> None:
    from minillama.attention import available_backends

    why = available_backends().get(name)
    if why is not None:
        pytest.skip(f"{name}: {why}")


def _check(tmp_path, backend: str, invariant: bool):
    from minillama.attention import get_backend
    from minillama.debug.invariance import Checker

    multiple = get_backend(backend).block_size_multiple
    engine = dict(model=None, backend=backend, device="cuda", dtype="bfloat16", max_model_len=1024,
                  kvcache_block_size=16 if multiple <= 16 else multiple, batch_invariant=invariant)
    checker = Checker(engine, str(tmp_path), max_tokens=8)
    tok = checker.llm().tokenizer
    ids = [tok.encode_chat([{"role": "user", "content": p}]) for p in (SHORT, LONG)]
    return checker.check(ids, [SHORT, LONG])


@pytest.mark.parametrize("backend", ["torch", "triton", "flash-attn"])
def test_batch_invariant_mode_is_bit_identical_under_every_condition(tmp_path, backend):
    _backend_or_skip(backend)
    outcomes = _check(tmp_path, backend, invariant=True)
    ran = [o for o in outcomes if o.skipped is None]
    assert any(o.condition.eager for o in ran), "the CUDA graphs vs eager condition must run on a GPU"
    assert any(o.condition.warm for o in ran) and any(o.condition.preempt_after for o in ran)
    changed = [(o.prompt, o.condition.name, o.diff.first and (o.diff.first.position, o.diff.first.site))
               for o in ran if not o.identical]
    assert not changed, f"batch-invariant mode changed: {changed}"


@pytest.mark.parametrize("backend", ["torch", "triton", "flash-attn"])
def test_default_mode_table(backend, capsys):
    """Not an assertion about the numbers: the table of where each condition first changes the default mode."""
    from minillama.cli import main

    _backend_or_skip(backend)
    code = main(["check-invariance", "--device", "cuda", "--dtype", "bfloat16", "--backend", backend,
                 "--max-model-len", "1024", "--prompt", SHORT, "--prompt", LONG])
    out = capsys.readouterr().out
    with capsys.disabled():
        print(f"\n--- check-invariance, {backend}, default mode ({torch.cuda.get_device_name()}) ---\n{out}")
    assert code in (0, 1) and "check-invariance (default mode)" in out
