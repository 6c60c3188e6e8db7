"""Checks on a model's hyper-parameters: every value a file can hold, typed and in range.

A config that passes can be built into a network without a ``ZeroDivisionError``, a ``KeyError``
deep in the RoPE code or an unbounded allocation; each failure is one ``ModelLoadError`` line
that names the file, the key and what a good value looks like.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from minillama.models.errors import ModelLoadError

#: RoPE scaling kinds the rotary layer implements (``None`` = plain RoPE).
ROPE_TYPES = ("llama3",)
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


_FIX = "use the config that came with the model weights"


def as_int(value: Any, key: str, where: str, low: int = 1) -> int:
    """``value`` as an int >= ``low`` (an integral float such as 2048.0 is accepted), else ``ModelLoadError``."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ModelLoadError(f"{where} has {key}={value!r}, not an integer: {_FIX}")
    if value < low:
        raise ModelLoadError(f"{where} has {key}={value}, which must be >= {low}: {_FIX}")
    return int(value)


def as_float(value: Any, key: str, where: str, positive: bool = True) -> float:
    """``value`` as a finite float (> 0 when ``positive``), else ``ModelLoadError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ModelLoadError(f"{where} has {key}={value!r}, not a finite number: {_FIX}")
    if positive and value <= 0:
        raise ModelLoadError(f"{where} has {key}={value}, which must be > 0: {_FIX}")
    return float(value)


def check_rope_scaling(scaling: Any, where: str) -> None:
    """``scaling`` is None or a complete llama3 dict with sane numbers."""
    if scaling is None:
        return
    if not isinstance(scaling, dict):
        raise ModelLoadError(f"{where} has rope_scaling={scaling!r}, not a dict: {_FIX}")
    kind = scaling.get("rope_type")
    if kind not in ROPE_TYPES:
        raise ModelLoadError(f"{where} uses RoPE scaling {kind!r}, which minillama does not run: use a model "
                             "with llama3 RoPE scaling or none")
    missing = [k for k in _LLAMA3_KEYS if scaling.get(k) is None]
    if missing:
        raise ModelLoadError(f"{where} has llama3 rope_scaling without {', '.join(missing)}: "
                             f"{_FIX}")
    factor = as_float(scaling["factor"], "rope_scaling.factor", where)
    low = as_float(scaling["low_freq_factor"], "rope_scaling.low_freq_factor", where)
    high = as_float(scaling["high_freq_factor"], "rope_scaling.high_freq_factor", where)
    as_int(scaling["original_max_position_embeddings"], "rope_scaling.original_max_position_embeddings", where)
    if factor < 1 or high <= low:
        raise ModelLoadError(f"{where} has llama3 rope_scaling with factor {factor} (needs >= 1) and frequency "
                             f"factors {low} / {high} (needs low < high): {_FIX}")


def check_model_config(c: Any) -> None:
    """Raise ``ModelLoadError`` unless ``c`` (a ``ModelConfig``) describes a network minillama can build."""
    where = c.source or "the model config"
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "intermediate_size", "vocab_size", "max_position_embeddings"):
        setattr(c, key, as_int(getattr(c, key), key, where))
    if c.num_attention_heads % c.num_key_value_heads:
        raise ModelLoadError(f"{where} has {c.num_attention_heads} attention heads, not a multiple of its "
                             f"{c.num_key_value_heads} key/value heads: {_FIX}")
    if c.head_dim % 2:
        raise ModelLoadError(f"{where} has head_dim {c.head_dim}: RoPE needs an even head size, "
                             f"{_FIX}")
    c.rms_norm_eps = as_float(c.rms_norm_eps, "rms_norm_eps", where)
    c.rope_theta = as_float(c.rope_theta, "rope_theta", where)
    check_rope_scaling(c.rope_scaling, where)
    if not isinstance(c.tie_word_embeddings, bool):
        raise ModelLoadError(f"{where} has tie_word_embeddings={c.tie_word_embeddings!r}, not true/false")
    if c.bos_token_id is not None:
        c.bos_token_id = as_int(c.bos_token_id, "bos_token_id", where, low=0)
    if not isinstance(c.eos_token_ids, list):
        raise ModelLoadError(f"{where} has eos_token_ids={c.eos_token_ids!r}, not a list of token ids")
    c.eos_token_ids = [as_int(t, "eos_token_id", where, low=0) for t in c.eos_token_ids]


def num_parameters(c: Any) -> int:
    """Weights a Llama with config ``c`` has (LM head counted unless tied): what a file must hold."""
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    per_layer = c.hidden_size * (q + 2 * kv) + q * c.hidden_size + 3 * c.hidden_size * c.intermediate_size
    per_layer += 2 * c.hidden_size
    lm_head = 0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size
    return c.num_hidden_layers * per_layer + c.vocab_size * c.hidden_size + c.hidden_size + lm_head
