"""``minillama generate | info | record | diff | trace``: the engine from the shell.

User mistakes end in one line on stderr and exit code 2, never a traceback
(set MINILLAMA_DEBUG=1 to see the traceback anyway).
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="Hugging Face model folder or .gguf file (default: built-in SmolLM2-135M-Instruct)")
    p.add_argument("--backend", default="torch", help="attention backend: torch or flash-attn")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")


def sampling_params(a: argparse.Namespace):
    from minillama.sampling_params import SamplingParams

    return SamplingParams(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, max_tokens=a.max_tokens,
                          ignore_eos=a.ignore_eos, seed=a.seed)


def make_llm(a: argparse.Namespace, **extra):
    from minillama import LLM

    return LLM(a.model, backend=a.backend, device=a.device, dtype=a.dtype, max_model_len=a.max_model_len,
               enforce_eager=a.enforce_eager, **extra)


def cmd_generate(a: argparse.Namespace) -> int:
    params = sampling_params(a)
    llm = make_llm(a)
    prompt = a.prompt
    if not a.raw:
        prompt = llm.tokenizer.encode_chat([{"role": "user", "content": a.prompt}])
    start, n = time.perf_counter(), 0
    for piece in llm.stream(prompt, params):
        n += 1
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if a.stats:
        dt = time.perf_counter() - start
        print(f"[{llm.num_steps} steps, {dt:.2f} s]", file=sys.stderr)
    return 0


def cmd_info(a: argparse.Namespace) -> int:
    import torch
    from rich.console import Console
    from rich.table import Table

    from minillama.attention import available_backends
    from minillama.engine.llm_engine import resolve_device, resolve_dtype
    from minillama.models.loader import open_model

    console = Console()
    loaded = open_model(a.model)
    c = loaded.config
    device = resolve_device(a.device)
    t = Table(title="minillama", show_header=False)
    t.add_row("model", f"{os.path.basename(loaded.path.rstrip('/'))} ({loaded.format})")
    t.add_row("path", loaded.path)
    t.add_row("architecture", f"{c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.num_attention_heads} heads, "
                              f"{c.num_key_value_heads} kv heads, head_dim {c.head_dim}, vocab {c.vocab_size}")
    t.add_row("rope", f"theta {c.rope_theta}, scaling {c.rope_scaling or 'none'}")
    t.add_row("context", f"{c.max_position_embeddings} positions; eos ids {c.eos_token_ids}")
    t.add_row("chat template", "yes" if loaded.tokenizer.chat_template else "no")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA GPU"
    t.add_row("device", f"{device} ({gpu}); dtype {resolve_dtype(a.dtype, device)}; torch {torch.__version__}")
    for name, why in available_backends().items():
        t.add_row(f"backend {name}", "[green]available[/]" if why is None else f"[red]unavailable[/]: {why}")
    t.add_row("GPU kernels", _gpu_kernels(c.head_dim, device))
    console.print(t)
    return 0


def _gpu_kernels(head_dim: int, device) -> str:
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
    return f"attention: {attention} (torch stays plain PyTorch); RMSNorm, SiLU-and-mul, rotary, K/V store, greedy argmax: {ops}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minillama", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="stream an answer from the model")
    g.add_argument("prompt")
    g.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    g.add_argument("--stats", action="store_true", help="print steps and time to stderr")
    _engine_args(g)
    _sampling_args(g)
    g.set_defaults(fn=cmd_generate)
    i = sub.add_parser("info", help="model, device and available attention backends")
    _engine_args(i)
    i.set_defaults(fn=cmd_info)
    try:
        from minillama.trace import cli as trace_cli
    except ImportError:
        trace_cli = None
    if trace_cli is not None:
        trace_cli.add_commands(sub, _engine_args, _sampling_args)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, RuntimeError, OSError) as e:
        if os.environ.get("MINILLAMA_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"minillama: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
