"""What a trace says about the run it records: model, prompts, sampling, engine, versions, recording mode."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import os
import platform
import sys
from collections.abc import Sequence
from typing import Any

from minillama.trace.format import SHADOW_FIELDS, STAT_FIELDS


def _version_of(dist: str, module: str) -> str | None:
    """A package's installed version without importing it (None when it is not importable)."""
    if importlib.util.find_spec(module) is None:
        return None
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def software_versions() -> dict[str, str | None]:
    """minillama, torch, python, and transformers / flash_attn when importable."""
    import torch

    import minillama

    out: dict[str, str | None] = {"minillama": getattr(minillama, "__version__", "unknown"), "torch": torch.__version__,
                                  "python": platform.python_version(),
                                  "safetensors": _version_of("safetensors", "safetensors")}
    for dist, module in (("transformers", "transformers"), ("flash-attn", "flash_attn")):
        v = _version_of(dist, module)
        if v is not None:
            out[module] = v
    return out


def build_manifest(llm, recorder, *, prompts: Sequence[str | list[int]] = (), params=None,
                   seqs: Sequence[Any] | None = None, chat: bool | None = None,
                   max_bytes: int | None = None) -> dict[str, Any]:
    """The manifest of a trace of ``llm`` recorded by ``recorder`` (``seqs`` ties each prompt to its seq_id)."""
    import torch

    src = llm.model_source
    requests = []
    for k, seq in enumerate(seqs or []):
        prompt = prompts[k] if k < len(prompts) else None
        requests.append({"index": k, "seq_id": seq.seq_id, "prompt": prompt, "chat": chat,
                         "prompt_token_ids": list(seq.token_ids[: seq.num_prompt_tokens])})
    device_name = (torch.cuda.get_device_name(llm.device) if llm.device.type == "cuda"
                   else platform.processor() or "cpu")
    shadow = recorder.shadow.name if recorder.shadow is not None else None
    model = ({"name": os.path.basename(str(src.path).rstrip("/")), "path": str(src.path), "format": src.format}
             if src is not None else {"name": "random weights", "path": None, "format": "ModelConfig"})
    return {
        "model": model,
        "model_config": llm.model_config.to_dict(),
        "requests": requests,
        "sampling": dataclasses.asdict(params) if params is not None else None,
        "backend": llm.backend.name,
        "shadow": shadow,
        "device": str(llm.device),
        "device_name": device_name,
        "dtype": str(llm.dtype).removeprefix("torch."),
        "sites": [spec.to_json() for spec in recorder.catalog],
        "stat_fields": list(STAT_FIELDS),
        "shadow_fields": list(SHADOW_FIELDS) if shadow else [],
        "recording": {"stats": "per request, on the device", "full_sites": list(recorder.full_sites),
                      "max_bytes": max_bytes, "always_full": ["sampled", "batch.block_tables", "batch.slot_mapping"]},
        "engine_config": {k: (v if isinstance(v, int | float | str | bool | type(None)) else str(v))
                          for k, v in dataclasses.asdict(llm.config).items()},
        "num_kvcache_blocks": getattr(llm, "num_kvcache_blocks", None),
        "versions": software_versions(),
        "command": " ".join(["minillama", *sys.argv[1:]]) if sys.argv and "minillama" in sys.argv[0] else None,
    }
