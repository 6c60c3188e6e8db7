"""``minillama generate | info | record | check-invariance | diff | trace``: the engine from the shell.

User mistakes end in one line on stderr and exit code 2, never a traceback (set MINILLAMA_DEBUG=1
to see the traceback anyway). Options are checked before torch is imported or a model is loaded.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

from minillama import __version__, progress
from minillama.options import (
    backend_arg,
    device_arg,
    dtype_arg,
    non_negative_int,
    positive_int,
    probability,
    seed,
    temperature,
)

DESCRIPTION = "minillama: a small, readable Llama inference engine with a paged KV cache."
EPILOG = """examples:
  minillama generate "What is the capital of France?"      stream an answer (built-in model, greedy)
  minillama generate "Hi" --model PATH --temperature 0.7 --seed 1
  minillama info --json                                     model, device and backends as JSON
  minillama record --out traces/NAME --prompt "Hi"          record every step to a trace folder
  minillama COMMAND --help                                  the options of one command"""
GENERATE_EPILOG = """examples:
  minillama generate "What is the capital of France?"
  minillama generate "Once upon a time" --raw --max-tokens 64 --temperature 0.8 --seed 1
  minillama generate "Hi" --model ~/models/Llama-3.2-1B-Instruct --device cuda"""
_CORE = ("generate", "info")  # commands that need no trace code (their parser builds without torch)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's layout and shows each option's default, except None and False."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("%(default)" not in text and action.default is not None and action.default is not False
                and action.default is not argparse.SUPPRESS
                and action.option_strings and not isinstance(action.default, list)):
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line naming the problem and where help is."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):  # name commands, not argparse's dest
                names = ", ".join(action.choices)
                if re.search(rf"required: .*\b({re.escape(str(action.dest))}|COMMAND)\b", message):
                    message = f"choose a command: {names}"
                bad = re.match(rf"argument ({re.escape(str(action.dest))}|COMMAND): invalid choice: '(.*?)'", message)
                if bad:
                    message = f"unknown command '{bad.group(2)}': choose one of {names}"
        self.exit(2, f"{self.prog.split()[0]}: error: {message} (see '{self.prog} --help')\n")


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="PATH",
                   help="Hugging Face model folder or .gguf file (default: built-in SmolLM2-135M-Instruct)")
    p.add_argument("--backend", type=backend_arg, default="torch", help="attention backend: torch, triton or flash-attn")
    p.add_argument("--device", type=device_arg, default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--dtype", type=dtype_arg, default="auto",
                   help="auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16 or float16")
    p.add_argument("--max-model-len", type=positive_int, default=4096, metavar="N",
                   help="longest prompt + answer in tokens (capped by the model's context)")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--batch-invariant", action="store_true",
                   help="compute each request's rows independently of the batch and of chunking (slower)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars on stderr")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=positive_int, default=256, metavar="N", help="tokens to generate at most")
    p.add_argument("--temperature", type=temperature, default=0.0, metavar="T",
                   help="0 = greedy; e.g. 0.7 samples (the Python API's default is 1.0)")
    p.add_argument("--top-p", type=probability, default=1.0, metavar="P",
                   help="sample from the smallest set of tokens whose probability reaches P (1 = off)")
    p.add_argument("--top-k", type=non_negative_int, default=0, metavar="K",
                   help="sample from the K most likely tokens (0 = off)")
    p.add_argument("--seed", type=seed, default=None, metavar="S",
                   help="seed for reproducible sampling, 0 <= S < 2**63 (default: random)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")


def sampling_params(a: argparse.Namespace):
    """The ``SamplingParams`` of parsed ``_sampling_args``."""
    from minillama.sampling_params import SamplingParams

    return SamplingParams(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, max_tokens=a.max_tokens,
                          ignore_eos=a.ignore_eos, seed=a.seed)


def make_llm(a: argparse.Namespace, **extra):
    """An ``LLM`` from parsed ``_engine_args``."""
    from minillama import LLM

    return LLM(a.model, backend=a.backend, device=a.device, dtype=a.dtype, max_model_len=a.max_model_len,
               enforce_eager=a.enforce_eager, batch_invariant=a.batch_invariant, **extra)


def _check_text(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # argv that was not UTF-8 arrives with surrogate escapes
        raise ValueError(f"the {what} is not valid UTF-8 (bad byte at character {e.start}): pass UTF-8 text") from None


def cmd_generate(a: argparse.Namespace) -> int:
    """Stream one answer to stdout."""
    _check_text(a.prompt, "prompt")
    params = sampling_params(a)
    llm = make_llm(a)
    prompt = a.prompt
    if not a.raw:
        prompt = llm.tokenizer.encode_chat([{"role": "user", "content": a.prompt}])
    start = time.perf_counter()
    for piece in llm.stream(prompt, params):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if a.stats:
        print(f"[{llm.num_steps} steps, {time.perf_counter() - start:.2f} s]", file=sys.stderr)
    return 0


def cmd_info(a: argparse.Namespace) -> int:
    """Model, device and backends (see ``minillama.cli_info``)."""
    from minillama.cli_info import print_info

    return print_info(a)


def cmd_record(a: argparse.Namespace) -> int:
    """Generate for the prompts while recording every step to a trace folder."""
    from rich.console import Console
    from rich.markup import escape

    from minillama.debug.manifest import build_manifest
    from minillama.debug.recorder import Recorder
    from minillama.debug.writer_process import trace_sink
    from minillama.trace.cli import human_bytes
    from minillama.trace.format import TraceError
    from minillama.trace.reader import TraceReader
    from minillama.trace.writer import TraceWriter

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
    writer = trace_sink(TraceWriter(a.out, manifest, a.max_bytes), recorder, a.trace_writer)
    recorder.set_sink(writer)
    recorder.attach()
    reason = "finished"
    start = time.perf_counter()
    total = sum(min(params.max_tokens, llm.config.max_model_len - len(x)) for x in ids)
    try:
        with progress.task("recording", total=total, unit="tokens") as bar:
            while llm.has_unfinished() and not writer.stopped:
                llm.step()
                if bar.watched:
                    made = sum(len(s.completion_token_ids) for s in seqs)
                    rate = made / max(time.perf_counter() - start, 1e-9)
                    bar.update(completed=made, description=f"recording: step {llm.num_steps}, {rate:.0f} tok/s, "
                               f"{writer.num_steps} steps written")
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


def build_parser(with_trace: bool = True) -> argparse.ArgumentParser:
    """The whole command line; ``with_trace=False`` leaves out record/diff/trace (which import torch)."""
    parser = Parser(prog="minillama", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"minillama {__version__}")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    g = sub.add_parser("generate", help="stream an answer from the model", epilog=GENERATE_EPILOG)
    g.add_argument("prompt", help="the question or text to continue (wrapped in the chat template unless --raw)")
    g.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    g.add_argument("--stats", action="store_true", help="print steps and time to stderr")
    _engine_args(g)
    _sampling_args(g)
    g.set_defaults(fn=cmd_generate)
    i = sub.add_parser("info", help="model, device and available attention backends")
    _engine_args(i)
    i.add_argument("--json", action="store_true", help="print the same facts as one JSON object")
    i.set_defaults(fn=cmd_info)
    if with_trace:
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
        r.add_argument("--max-bytes", type=positive_int, default=None, metavar="N",
                       help="stop recording cleanly before the trace grows past N bytes")
        r.add_argument("--trace-writer", choices=("auto", "thread", "process"), default="auto",
                       help="write the trace on a thread of this process or in a process of its own, whose Python "
                            "then never holds the engine's GIL (auto, the default: the process on CUDA)")
        _engine_args(r)
        _sampling_args(r)
        r.set_defaults(fn=cmd_record)
        from minillama.debug import invariance_cli
        from minillama.trace import cli as trace_cli

        invariance_cli.add_command(sub, _engine_args)
        trace_cli.add_commands(sub)
    return parser


def _command(argv: list[str]) -> str | None:
    """The subcommand named in ``argv`` (the first word that is not an option), if any."""
    return next((w for w in argv if not w.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    """The ``minillama`` entry point."""
    argv = sys.argv[1:] if argv is None else list(argv)
    cmd = _command(argv)
    core = cmd in _CORE
    try:
        if not core:  # the trace commands' parser imports torch: check the cheap things first
            early = Parser(prog=f"minillama {cmd}" if cmd else "minillama", add_help=False, allow_abbrev=False)
            for flag, kind in (("--backend", backend_arg), ("--device", device_arg), ("--dtype", dtype_arg)):
                early.add_argument(flag, type=kind)
            early.parse_known_args(argv)
        args = build_parser(with_trace=not core).parse_args(argv)
    except SystemExit as e:  # --help, --version, or a bad option (already printed as one line)
        return e.code if isinstance(e.code, int) else 2
    if getattr(args, "quiet", False):
        progress.set_quiet(True)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `minillama generate ... | head -1`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, RuntimeError, OSError) as e:
        if os.environ.get("MINILLAMA_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"minillama: error: {msg}", file=sys.stderr)
        return 2
    finally:
        if getattr(args, "quiet", False):
            progress.set_quiet(False)


if __name__ == "__main__":
    sys.exit(main())
