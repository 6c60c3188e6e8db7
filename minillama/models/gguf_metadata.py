"""Turn the metadata of a parsed GGUF file into a ``ModelConfig`` and the raw tokenizer data."""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf.constants import LlamaFileType

from minillama.models.config import ModelConfig
from minillama.models.config_checks import as_float, as_int, num_parameters
from minillama.models.errors import ModelLoadError
from minillama.models.gguf_file import _GGUFFile
from minillama.models.gguf_tensors import _ROPE_FREQS, _tensor_array

_SUPPORTED_ARCHITECTURES = ("llama",)


@dataclass
class GGUFTokenizerData:
    """The tokenizer a GGUF file describes, as raw metadata (``tokenizer.ggml.*`` keys).

    ``model`` is llama.cpp's tokenizer kind: ``"gpt2"`` is byte-level BPE, ``"llama"`` is
    SentencePiece. ``pre`` names the pre-tokenizer llama.cpp recognised (e.g. ``"smollm"``).
    ``token_types`` follow llama.cpp: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused,
    6 byte.
    """

    model: str
    pre: str | None
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    scores: list[float] | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    eot_token_id: int | None = None
    eom_token_id: int | None = None
    unk_token_id: int | None = None
    pad_token_id: int | None = None
    add_bos_token: bool | None = None
    add_eos_token: bool | None = None
    add_space_prefix: bool | None = None
    chat_template: str | None = None
    source: str = ""


def _float32(value: Any) -> float:
    """Metadata floats are float32: ``1e-5`` is stored as 9.9999997e-06. Give back the short
    decimal that float32 round-trips to, which is what the original config said."""
    return float(str(np.float32(value)))


def _meta(gf: _GGUFFile, key: str, default: Any = None) -> Any:
    return gf.metadata.get(key, default)


def _rope_scaling(gf: _GGUFFile, buf: mmap.mmap, arch: str, head_dim: int, theta: float) -> dict | None:
    """RoPE scaling from ``{arch}.rope.scaling.*`` keys, or recovered from a ``rope_freqs`` tensor."""
    kind = _meta(gf, f"{arch}.rope.scaling.type")
    factor = _meta(gf, f"{arch}.rope.scaling.factor", _meta(gf, f"{arch}.rope.scale_linear"))
    orig = _meta(gf, f"{arch}.rope.scaling.original_context_length")
    if kind is None and factor is not None:
        kind = "linear"  # old files only had rope.scale_linear
    if kind in ("linear", "yarn") and factor is not None and _float32(factor) != 1.0:
        out: dict[str, Any] = {"rope_type": kind, "factor": _float32(factor)}
        if orig is not None:
            out["original_max_position_embeddings"] = int(orig)
        attn = _meta(gf, f"{arch}.rope.scaling.attn_factor")
        if kind == "yarn" and attn is not None:
            out["attention_factor"] = _float32(attn)
        return out
    if kind not in (None, "none", "linear", "yarn"):
        raise ModelLoadError(
            f"GGUF file {gf.path} uses RoPE scaling {kind!r}, which minillama does not support: "
            "use a model with linear, yarn or llama3 RoPE scaling"
        )

    info = next((t for t in gf.tensors if t.name == _ROPE_FREQS), None)
    if info is None:
        return None
    stored = _tensor_array(buf, info).astype(np.float64).reshape(-1)
    return _llama3_scaling_from_factors(gf.path, stored, head_dim, theta)


def _llama3_scaling_from_factors(path: str, stored: np.ndarray, head_dim: int, theta: float) -> dict | None:
    """Turn llama.cpp's per-frequency divisors back into HF's ``llama3`` rope_scaling dict.

    Every Llama 3.1/3.2 release used low_freq_factor 1, high_freq_factor 4 and an original context
    of 8192, varying only ``factor``; we rebuild the divisors from those and insist they match, so a
    file with anything else fails loudly instead of generating garbage.
    """
    if np.allclose(stored, 1.0):
        return None
    factor = float(stored.max())
    low, high, orig = 1.0, 4.0, 8192
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    smooth = np.clip((orig / wavelen - low) / (high - low), 0.0, 1.0)
    expected = 1.0 / ((1 - smooth) / factor + smooth)
    if stored.shape != expected.shape or not np.allclose(stored, expected, rtol=1e-3):
        raise ModelLoadError(
            f"GGUF file {path} has RoPE frequency factors (rope_freqs) that are not Llama 3 style: "
            "use the model's Hugging Face folder instead"
        )
    return {
        "rope_type": "llama3",
        "factor": round(factor, 4),
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": orig,
    }


def _build(gf: _GGUFFile, buf: mmap.mmap) -> tuple[ModelConfig, GGUFTokenizerData]:
    path = gf.path
    arch = _meta(gf, "general.architecture")
    if arch not in _SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"GGUF file {path} holds a {arch!r} model, but minillama runs only Llama-architecture "
            "models: pick a Llama-family GGUF (Llama, SmolLM, TinyLlama, Mistral 7B...)"
        )

    def need(key: str) -> Any:
        value = _meta(gf, f"{arch}.{key}")
        if value is None:
            raise ModelLoadError(
                f"GGUF file {path} lacks the metadata key {arch}.{key}: convert the model again with llama.cpp"
            )
        return value

    tok = _tokenizer_data(gf)
    where = f"GGUF file {path}"
    hidden = as_int(need("embedding_length"), f"{arch}.embedding_length", where)
    heads = as_int(need("attention.head_count"), f"{arch}.attention.head_count", where)
    kv_heads = _meta(gf, f"{arch}.attention.head_count_kv", heads)
    head_dim = as_int(_meta(gf, f"{arch}.attention.key_length", hidden // heads), f"{arch}.attention.key_length",
                      where)
    rope_dim = _meta(gf, f"{arch}.rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != head_dim:
        raise ModelLoadError(
            f"GGUF file {path} rotates only {rope_dim} of {head_dim} head dims (partial RoPE), which "
            "Llama models do not do: use a Llama-architecture model"
        )
    theta = _float32(as_float(_meta(gf, f"{arch}.rope.freq_base", 10000.0), f"{arch}.rope.freq_base", where))
    tensor_names = {t.name for t in gf.tensors}
    token_embd = next((t for t in gf.tensors if t.name == "token_embd.weight"), None)
    # The embedding's row count is what the weights need; it can exceed the token list when a
    # vocabulary was padded, so the token list is only the fallback.
    if token_embd is not None and len(token_embd.dims) == 2:
        vocab = token_embd.dims[1]
    else:
        vocab = len(tok.tokens) or _meta(gf, f"{arch}.vocab_size", 0)

    eos_ids = [i for i in (tok.eos_token_id, tok.eot_token_id, tok.eom_token_id) if i is not None]
    file_type = _meta(gf, "general.file_type")
    try:
        file_type_name = LlamaFileType(file_type).name.removeprefix("MOSTLY_") if file_type is not None else ""
    except ValueError:
        file_type_name = f"file_type {file_type}"
    dtype = {0: "float32", 1: "float16", 32: "bfloat16"}.get(file_type) if file_type is not None else None

    config = ModelConfig(
        hidden_size=hidden,
        num_hidden_layers=need("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=need("feed_forward_length"),
        vocab_size=vocab,
        rms_norm_eps=_float32(as_float(need("attention.layer_norm_rms_epsilon"), "layer_norm_rms_epsilon", where)),
        rope_theta=theta,
        rope_scaling=_rope_scaling(gf, buf, arch, head_dim, theta),
        max_position_embeddings=_meta(gf, f"{arch}.context_length", 2048),
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=tok.bos_token_id,
        eos_token_ids=list(dict.fromkeys(eos_ids)),
        torch_dtype=dtype,
        source=f"{path} (GGUF v{gf.version}{', ' + file_type_name if file_type_name else ''})",
    )
    return config, tok


def _check_holds(gf: _GGUFFile, config: ModelConfig) -> None:
    """Bound what the header claims by what the file holds, before anything is sized from it
    (a flipped bit must not make the engine allocate 1e9 layers)."""
    held = sum(math.prod(t.dims) for t in gf.tensors)
    if num_parameters(config) > held:
        raise ModelLoadError(
            f"GGUF file {gf.path} describes a model of {num_parameters(config):,} weights but holds only "
            f"{held:,}: the header is corrupt, copy or download the file again"
        )


def _tokenizer_data(gf: _GGUFFile) -> GGUFTokenizerData:
    def opt_int(key: str) -> int | None:
        value = _meta(gf, f"tokenizer.ggml.{key}")
        return int(value) if value is not None else None

    def opt_bool(key: str) -> bool | None:
        value = _meta(gf, f"tokenizer.ggml.{key}")
        return bool(value) if value is not None else None

    tokens = list(_meta(gf, "tokenizer.ggml.tokens", []))
    return GGUFTokenizerData(
        model=str(_meta(gf, "tokenizer.ggml.model", "")),
        pre=_meta(gf, "tokenizer.ggml.pre"),
        tokens=tokens,
        token_types=list(_meta(gf, "tokenizer.ggml.token_type", [])),
        merges=list(_meta(gf, "tokenizer.ggml.merges", [])),
        scores=_meta(gf, "tokenizer.ggml.scores"),
        bos_token_id=opt_int("bos_token_id"),
        eos_token_id=opt_int("eos_token_id"),
        eot_token_id=opt_int("eot_token_id"),
        eom_token_id=opt_int("eom_token_id"),
        unk_token_id=opt_int("unknown_token_id"),
        pad_token_id=opt_int("padding_token_id"),
        add_bos_token=opt_bool("add_bos_token"),
        add_eos_token=opt_bool("add_eos_token"),
        add_space_prefix=opt_bool("add_space_prefix"),
        chat_template=_meta(gf, "tokenizer.chat_template"),
        source=gf.path,
    )
