"""``minillama info``: the model, the device and the attention backends, without loading weights.

On a terminal: a table whose long values wrap instead of being cut. Piped or redirected: one
``key: value`` line per fact, in full. ``--json``: the same facts as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any


def gather(a: argparse.Namespace) -> dict[str, Any]:
    """Every fact ``minillama info`` shows, as plain JSON-ready values."""
    import torch

    import minillama
    from minillama.attention import available_backends
    from minillama.engine.llm_engine import resolve_device, resolve_dtype
    from minillama.models.loader import open_model

    loaded = open_model(a.model)
    device = resolve_device(a.device)
    return {
        "minillama": minillama.__version__,
        "model": os.path.basename(loaded.path.rstrip("/")),
        "format": loaded.format,
        "path": os.path.abspath(loaded.path),
        "config": loaded.config.to_dict(),
        "chat_template": bool(loaded.tokenizer.chat_template),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "dtype": str(resolve_dtype(a.dtype, device)).removeprefix("torch."),
        "torch": torch.__version__,
        "backends": available_backends(),  # name -> None when usable, else why not
        "gpu_kernels": gpu_kernels(loaded.config.head_dim, device),
    }


def rows(info: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, text) for each line of the human-readable view."""
    c = info["config"]
    out = [
        ("model", f"{info['model']} ({info['format']})"),
        ("path", info["path"]),
        ("architecture", f"{c['num_hidden_layers']} layers, hidden {c['hidden_size']}, {c['num_attention_heads']} "
                         f"heads, {c['num_key_value_heads']} kv heads, head_dim {c['head_dim']}, "
                         f"vocab {c['vocab_size']}"),
        ("rope", f"theta {c['rope_theta']}, scaling {c['rope_scaling'] or 'none'}"),
        ("context", f"{c['max_position_embeddings']} positions; eos ids {c['eos_token_ids']}"),
        ("chat template", "yes" if info["chat_template"] else "no"),
        ("device", f"{info['device']} ({info['gpu'] or 'no CUDA GPU'}); dtype {info['dtype']}; "
                   f"torch {info['torch']}"),
    ]
    for name, why in info["backends"].items():
        out.append((f"backend {name}", "available" if why is None else f"unavailable: {why}"))
    out.append(("GPU kernels", info["gpu_kernels"]))
    out.append(("minillama", info["minillama"]))
    return out


def print_info(a: argparse.Namespace) -> int:
    """Print the facts as JSON, as a table on a terminal, or as full ``key: value`` lines otherwise."""
    info = gather(a)
    if a.json:
        print(json.dumps(info, indent=2))
        return 0
    if not sys.stdout.isatty():
        for label, text in rows(info):
            print(f"{label}: {text}")
        return 0
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    t = Table(title="minillama", show_header=False)
    t.add_column(no_wrap=True, style="bold")
    t.add_column(overflow="fold")  # wrap long paths, never cut them
    for label, text in rows(info):
        if text == "available":
            text = "[green]available[/]"
        elif text.startswith("unavailable: "):
            text = "[red]unavailable[/]: " + escape(text.removeprefix("unavailable: "))
        else:
            text = escape(text)
        t.add_row(label, text)
    Console().print(t)
    return 0


def gpu_kernels(head_dim: int, device: Any) -> str:
    """Which Triton kernels replace plain PyTorch on this device, or why none do."""
    from minillama.attention import triton_decode
    from minillama.layers import triton_ops

    if device.type != "cuda":
        return "none: plain PyTorch on CPU"
    if triton_ops.triton is None:
        return "none: Triton is not installed (plain PyTorch everywhere)"
    attention = ("the triton backend's prefill and decode" if triton_decode.covers(head_dim, device)
                 else f"none (the triton backend's kernels cannot take head_dim {head_dim})")
    ops = "Triton" if triton_ops.switched_on() else "plain PyTorch (MINILLAMA_TRITON_OPS=0)"
    return (f"attention: {attention} (torch stays plain PyTorch); RMSNorm, SiLU-and-mul, rotary, K/V store, "
            f"greedy argmax: {ops}")
