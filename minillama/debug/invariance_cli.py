"""``minillama check-invariance``: each prompt under conditions that must not change it, one table, exit codes for CI.

Exit code 0 when every condition that ran left every prompt bit-identical to its run alone, 1 when
one did not, 2 for a user error (one line).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from minillama.debug.invariance import Outcome


def add_command(sub: argparse._SubParsersAction, engine_args) -> None:
    """Add ``check-invariance`` to the main CLI (``engine_args`` adds --model, --backend, --device, ...)."""
    from minillama.options import positive_int

    c = sub.add_parser("check-invariance", help="run prompts alone, batched, chunked, after a prefix-cache hit, "
                                                "preempted, ... and say where each run first changed them")
    c.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for several")
    c.add_argument("--raw", action="store_true", help="send prompts as is, without the chat template")
    c.add_argument("--max-tokens", type=positive_int, default=8, metavar="N",
                   help="tokens generated per run (greedy, EOS ignored; at least 3)")
    c.add_argument("--block-size", type=positive_int, default=None, metavar="N",
                   help="KV block size of the reference (default: 16 where the backend allows, so that short "
                        "prompts still have a full block for the prefix-cache condition)")
    c.add_argument("--stats-only", action="store_true",
                   help="record statistics only (sizes become lower bounds) instead of full tensors")
    c.add_argument("--out", default=None, help="keep the recorded traces in this new folder (for `minillama diff`)")
    c.add_argument("--json", action="store_true", help="print the results as JSON")
    engine_args(c)
    c.set_defaults(fn=cmd_check_invariance)


def cmd_check_invariance(a: argparse.Namespace) -> int:
    """Run the checker and print the table (or JSON)."""
    import os

    from minillama.attention import get_backend
    from minillama.debug.invariance import Checker, engine_config

    if a.max_tokens < 3:
        raise ValueError(f"--max-tokens must be at least 3 (the preemption happens after 2), got {a.max_tokens}")
    if a.out is not None and os.path.exists(a.out) and (not os.path.isdir(a.out) or os.listdir(a.out)):
        raise ValueError(f"{a.out} exists and is not empty: choose another --out or delete it")
    block = a.block_size
    if block is None and get_backend(a.backend).block_size_multiple <= 16:
        block = 16
    engine = engine_config(model=a.model, backend=a.backend, device=a.device, dtype=a.dtype,
                           max_model_len=a.max_model_len, enforce_eager=a.enforce_eager,
                           batch_invariant=a.batch_invariant, kvcache_block_size=block or 0)
    out = a.out or tempfile.mkdtemp(prefix="minillama-invariance-")
    os.makedirs(out, exist_ok=True)
    try:
        checker = Checker(engine, out, a.max_tokens, full=not a.stats_only)
        tok = checker.llm().tokenizer
        ids = [tok.encode(p) if a.raw else tok.encode_chat([{"role": "user", "content": p}]) for p in a.prompt]
        printer = None if a.json else _LivePrinter()
        outcomes = checker.check(ids, a.prompt, printer)
    finally:
        if a.out is None:
            shutil.rmtree(out, ignore_errors=True)
    code = 1 if any(o.diff is not None and not o.identical for o in outcomes) else 0
    if a.json:
        print(json.dumps({"exit_code": code, "batch_invariant": a.batch_invariant, "prompts": a.prompt,
                          "outcomes": [outcome_json(o) for o in outcomes]}, indent=1))
    else:
        render(outcomes, a.prompt, a.batch_invariant, code, kept=a.out)
    return code


def outcome_json(o: Outcome) -> dict:
    """One outcome as plain JSON."""
    from dataclasses import asdict

    from minillama.trace.diff import json_safe

    return json_safe({"prompt": o.prompt, "condition": o.condition.name, "skipped": o.skipped,
                    "identical": o.identical if o.diff is not None else None, "trace": o.trace,
                    "diff": asdict(o.diff) if o.diff is not None else None})


class _LivePrinter:
    """One line per condition as it finishes (the runs take a while on CPU)."""

    def __call__(self, o: Outcome) -> None:
        import sys

        print(f"  prompt {o.prompt}: {o.condition.name}: {summary(o)}", file=sys.stderr, flush=True)


def summary(o: Outcome) -> str:
    """``bit-identical``, ``skipped: why``, or where it first changed."""
    from minillama.trace.render import fmt_size, where

    if o.skipped:
        return f"skipped: {o.skipped}"
    d = o.diff
    if d.identical and d.token is None:
        return "bit-identical"
    size = fmt_size(d.first.size, d.first.how) if d.first else "-"
    return f"{where(d)}; max |A-B| there {size}; tokens {'same' if d.token is None else 'CHANGED'}"


def render(outcomes: list[Outcome], prompts: list[str], invariant: bool, code: int, kept: str | None) -> None:
    """The table: one row per (prompt, condition)."""
    from rich.table import Table
    from rich.text import Text

    from minillama.trace.render import console_for, fmt_size, token_text, where

    console = console_for()
    mode = "batch-invariant mode" if invariant else "default mode"
    t = Table(title=f"check-invariance ({mode}): each condition against the prompt run alone")
    for col in ("prompt", "condition", "result", "first change", "max |A-B| there", "tokens"):
        t.add_column(col, overflow="fold")
    for o in outcomes:
        prompt = Text(f"{o.prompt}: {' '.join(prompts[o.prompt].split())}")
        if o.skipped:
            t.add_row(prompt, o.condition.name, Text("skipped", style="dim"), Text(o.skipped), "", "")
            continue
        d = o.diff
        ok = d.identical and d.token is None
        t.add_row(prompt, o.condition.name, Text("bit-identical" if ok else "changed", style="green" if ok else "red"),
                  Text(where(d)), fmt_size(d.first.size, d.first.how) if d.first else "0", token_text(d))
    console.print(t)
    if kept:
        console.print(Text(f"traces kept in {kept} (reference first); compare two with `minillama diff A B`"))
    console.print(Text("every condition bit-identical (exit 0)" if code == 0 else "some condition changed a prompt's "
                       "computation (exit 1)", style="bold green" if code == 0 else "bold red"))
