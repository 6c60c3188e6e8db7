"""The model hyper-parameters the engine needs, whatever format they came from."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from minillama.models.config_checks import as_int, check_model_config
from minillama.models.errors import ModelLoadError


@dataclass
class ModelConfig:
    """Shape and numerics of a Llama-architecture model.

    ``rope_scaling`` uses Hugging Face's spelling, e.g. ``{"rope_type": "llama3", "factor": 32.0,
    "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}``;
    ``None`` means plain RoPE.
    """

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: list[int]
    torch_dtype: str | None = None
    source: str = ""  # where it came from (path, format)

    @classmethod
    def from_hf_dict(
        cls, d: dict, generation_config: dict | None = None, source: str = ""
    ) -> ModelConfig:
        """Build from a ``config.json`` dict and, optionally, a ``generation_config.json`` dict.

        Copes with the spellings seen across transformers versions: a missing or null ``head_dim``
        or ``num_key_value_heads``, ``eos_token_id`` as an int or a list (the generation config
        often lists more stop tokens, e.g. Llama 3's ``<|eot_id|>``), ``rope_scaling`` keyed by
        ``type`` or ``rope_type``, and transformers 5's ``rope_parameters`` which also holds
        ``rope_theta``.
        """
        where = source or "config.json"
        if not isinstance(d, dict):
            raise ModelLoadError(f"{where} holds a JSON {type(d).__name__}, not an object of settings: "
                                 "use the config.json that came with the model weights")
        gen = generation_config if isinstance(generation_config, dict) else {}

        def need(key: str) -> Any:
            value = d.get(key)
            if value is None:
                raise ModelLoadError(
                    f"{where} has no '{key}': use the config.json that came with the model weights"
                )
            return value

        heads = as_int(need("num_attention_heads"), "num_attention_heads", where)
        hidden = as_int(need("hidden_size"), "hidden_size", where)
        kv_heads = d.get("num_key_value_heads")
        head_dim = d.get("head_dim")

        rope_params = d.get("rope_parameters")
        if not isinstance(rope_params, dict):
            rope_params = {}
        rope_theta = d.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        rope_scaling = _normalize_rope_scaling(d.get("rope_scaling") or rope_params or None, where)

        # Generation config first: it is what HF's generate() stops on.
        eos_ids = _as_id_list(gen.get("eos_token_id"), where) + _as_id_list(d.get("eos_token_id"), where)
        bos = gen.get("bos_token_id", d.get("bos_token_id"))
        if isinstance(bos, list):  # seen in the wild; the first one is the one a prompt starts with
            bos = bos[0] if bos else None
        dtype = d.get("torch_dtype") or d.get("dtype")

        return cls(
            hidden_size=hidden,
            num_hidden_layers=need("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads if kv_heads is not None else heads,
            head_dim=head_dim if head_dim is not None else hidden // heads,
            intermediate_size=need("intermediate_size"),
            vocab_size=need("vocab_size"),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),  # LlamaConfig's default
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            bos_token_id=bos,
            eos_token_ids=list(dict.fromkeys(eos_ids)),
            torch_dtype=dtype if isinstance(dtype, str) else None,
            source=source or where,
        )

    def __post_init__(self) -> None:
        check_model_config(self)

    def to_dict(self) -> dict:
        """A JSON-ready dict; ``ModelConfig(**cfg.to_dict())`` gives the config back."""
        return dataclasses.asdict(self)


def _as_id_list(value: Any, where: str) -> list[int]:
    """``eos_token_id`` may be missing, an int, or a list of ints."""
    if value is None:
        return []
    values = value if isinstance(value, list | tuple) else [value]
    return [as_int(v, "eos_token_id", where, low=0) for v in values if v is not None]


def _normalize_rope_scaling(scaling: Any, where: str) -> dict | None:
    """HF rope scaling with the type under ``rope_type``; ``None`` for plain RoPE.

    ``rope_parameters`` (transformers 5) carries ``rope_theta`` too, and says ``"default"`` when
    there is no scaling at all; both are dropped here so callers only test ``is None``.
    """
    if not scaling:
        return None
    if not isinstance(scaling, dict):
        raise ModelLoadError(f"{where} has rope_scaling={scaling!r}, not an object: "
                             "use the config.json that came with the model weights")
    out = {k: v for k, v in scaling.items() if k not in ("type", "rope_theta")}
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type in (None, "default", "none"):
        return None
    out["rope_type"] = rope_type
    return out
