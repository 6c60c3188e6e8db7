"""``minillama generate | info | record | check-invariance | diff | trace``: the engine from the shell.

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
    p.add_argument("--batch-invariant", action="store_true",
                   help="compute each request's rows independently of the batch and of chunking (slower)")


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
               enforce_eager=a.enforce_eager, batch_invariant=a.batch_invariant, **extra)


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


def cmd_record(a: argparse.Namespace) -> int:
    """Generate for the prompts while recording every step to a trace folder."""
    from rich.console import Console
    from rich.markup import escape

    from minillama.debug.manifest import build_manifest
    from minillama.debug.recorder import Recorder
    from minillama.trace.cli import human_bytes
    from minillama.trace.reader import TraceError, TraceReader
    from minillama.trace.writer import BackgroundWriter, TraceWriter

    if a.max_bytes is not None and a.max_bytes <= 0:
        raise TraceError(f"--max-bytes must be a positive number of bytes, got {a.max_bytes}: leave it out for no cap")
    if os.path.exists(a.out) and (not os.path.isdir(a.out) or os.listdir(a.out)):
        raise TraceError(f"{a.out} exists and is not empty: choose another --out or delete it")
    params = sampling_params(a)
    llm = make_llm(a)
    shadow = a.shadow
    if shadow == "auto":
        shadow = "reference" if llm.backend.name == "torch" else "torch"
    recorder = Recorder(llm, shadow=shadow, full_sites=a.full)
    tok = llm.tokenizer
    ids = [tok.encode(p) if a.raw else tok.encode_chat([{"role": "user", "content": p}]) for p in a.prompt]
    seqs = [llm.add_request(x, params) for x in ids]
    manifest = build_manifest(llm, recorder, prompts=a.prompt, params=params, seqs=seqs, chat=not a.raw,
                              max_bytes=a.max_bytes)
    writer = BackgroundWriter(TraceWriter(a.out, manifest, a.max_bytes))
    recorder.set_sink(writer)
    recorder.attach()
    reason = "finished"
    start = time.perf_counter()
    try:
        while llm.has_unfinished() and not writer.stopped:
            llm.step()
    except KeyboardInterrupt:
        reason = "interrupted by the user"
        raise
    except Exception as e:
        reason = "error: " + (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise
    finally:
        recorder.detach(reason)  # writes what is queued, then the end line with our reason
    dt = time.perf_counter() - start
    reader = TraceReader(a.out)
    console = Console()
    shadow_name = recorder.shadow.name if recorder.shadow is not None else None
    console.print(f"recorded [bold]{escape(a.out)}[/]: {reader.num_steps} steps in {dt:.2f} s, "
                  f"{human_bytes(reader.size_bytes)}, {escape(reader.status)}"
                  + (f", shadow {escape(shadow_name)}" if shadow_name else ""))
    for k, (_sid, r) in enumerate(reader.requests().items()):
        text = r["text"].replace("\n", " ")
        console.print(f"  [dim]request {k}:[/] {escape(text[:100] + ('...' if len(text) > 100 else ''))}")
    console.print(f"[dim]next: minillama trace info {escape(a.out)} | minillama diff {escape(a.out)} OTHER[/]")
    return 0


def _gpu_kernels(head_dim: int, device) -> str:
    """Which Triton kernels replace plain PyTorch on this device, or why none do."""
    from minillama.attention import triton_decode
    from minillama.layers import triton_ops

    if device.type != "cuda":
        return "none: plain PyTorch on CPU"
    if triton_ops.triton is None:
        return "none: Triton is not installed (plain PyTorch everywhere)"
    decode = ("Triton" if triton_decode.covers(head_dim, device)
              else "plain PyTorch (MINILLAMA_TORCH_DECODE=pytorch, or a head size Triton's dot cannot take)")
    ops = "Triton" if triton_ops.switched_on() else "plain PyTorch (MINILLAMA_TRITON_OPS=0)"
    return f"torch backend decode: {decode}; RMSNorm, SiLU-and-mul, rotary, K/V store, greedy argmax: {ops}"


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
    r = sub.add_parser("record", help="generate while recording every step to a trace folder")
    r.add_argument("--out", required=True, help="new (or empty) trace folder, e.g. traces/NAME")
    r.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    r.add_argument("--raw", action="store_true", help="send prompts as is, without the chat template")
    r.add_argument("--shadow", nargs="?", const="auto", default=None, metavar="BACKEND",
                   help="redo each layer's attention with BACKEND (default: torch, or the yardstick alone, "
                        "'reference', when the active backend is torch) and record the differences")
    r.add_argument("--full", nargs="+", action="extend", default=[], metavar="SITE_PATTERN",
                   help="save full tensors of matching sites (fnmatch, e.g. 'layers.2.*' 'logits' "
                        "'layers.*.attn.out@shadow'); other sites keep per-request statistics only")
    r.add_argument("--max-bytes", type=int, default=None, metavar="N",
                   help="stop recording cleanly before the trace grows past N bytes")
    _engine_args(r)
    _sampling_args(r)
    r.set_defaults(fn=cmd_record)
    from minillama.debug import invariance_cli
    from minillama.trace import cli as trace_cli

    invariance_cli.add_command(sub, _engine_args)
    trace_cli.add_commands(sub)
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
