"""Printing request-aligned diffs: rich tables on a terminal, full values when piped, JSON for CI.

Strings that come from a trace (prompts, paths) are printed as text, never parsed as Rich markup.
"""

from __future__ import annotations

import sys

from minillama.trace.diff import RequestDiff, TraceDiff, site_part

LAYER_PARTS = ("input", "attn.q", "attn.k", "attn.v", "attn.out", "mlp.out", "output")
MODEL_SITES = ("embed", "final_norm", "logits", "sampled")


def console_for(file=None):
    """A Rich console; when the output is not a terminal, wide enough that no value is cut short."""
    from rich.console import Console

    out = file or sys.stdout
    if out.isatty():
        return Console(file=out)
    return Console(file=out, width=100_000, no_color=True, highlight=False)


def fmt_size(size: float | None, how: str) -> str:
    """``0``, ``1.2e-07`` (exact), ``≥1.2e-07`` (a lower bound), ``≠`` (differs, size unknown)."""
    if how == "tokens":
        return "tokens"
    if size is None:
        return "≠"
    return ("≥" if how == "stats" else "") + f"{size:.2e}"


def where(r: RequestDiff) -> str:
    """The first difference in words: position, what that position is, site and op."""
    f = r.first
    if f is None:
        return "-"
    if f.part in ("logits", "sampled"):
        what = f"the logits choosing generated token {f.generated}"
    elif f.generated is None:
        what = "prompt"
    else:
        what = f"generated token {f.generated}'s row"
    again = "; recomputed after a preemption" if f.where_a["recompute"] or f.where_b["recompute"] else ""
    return f"position {f.position} ({what}{again}), {f.site}: {f.op}"


def token_text(r: RequestDiff) -> str:
    t = r.token
    if t is None:
        return "same"
    return f"#{t['generated']} differs: A {t['token_a']} vs B {t['token_b']}"


def _cached(spans: list[list[int]]) -> str:
    return ", ".join(f"[{s}:{e})" for s, e in spans) or "-"


def render_diff(res: TraceDiff, console=None) -> None:
    """Print a ``TraceDiff``: one summary row per request, then each changed request's layer table."""
    from rich.table import Table
    from rich.text import Text

    console = console or console_for()
    full = not console.is_terminal
    console.print(Text(f"A {res.path_a}   B {res.path_b}   {len(res.requests)} requests matched by prompt ids; "
                       + ("any bit difference counts" if res.threshold is None else f"threshold {res.threshold:g}")))
    for note in res.notes:
        console.print(Text(f"note: {note}"))
    t = Table(title="requests (first change: the first position, then the first site in firing order)")
    for col in ("A#", "B#", "prompt", "positions", "result", "first change", "size there", "tokens",
                "cached in A", "cached in B"):
        t.add_column(col, overflow="fold")
    for r in res.requests:
        size = fmt_size(r.first.size, r.first.how) if r.first else "0"
        result = Text("bit-identical", style="green") if r.identical else Text("differs", style="red")
        t.add_row(str(r.index_a), str(r.index_b), Text(_short(r.prompt, full)), str(r.positions), result, Text(where(r)),
                  size, token_text(r), _cached(r.cached_a), _cached(r.cached_b))
    console.print(t)
    for r in res.requests:
        if not r.identical:
            render_layers(r, console)
        for note in r.notes:
            console.print(Text(f"note (request A#{r.index_a}): {note}"))
    for side, reqs in (("A", res.only_a), ("B", res.only_b)):
        for q in reqs:
            console.print(Text(f"only in {side}: request {q['index']} (seq {q['seq_id']}, {q['prompt_len']} prompt "
                               f"tokens): {_short(q['prompt'], full)}"))
    if res.exit_code:
        console.print(Text("DIFFERENT (exit 1)", style="bold red"))
    else:
        console.print(Text("IDENTICAL (exit 0)" if res.identical else "SAME within the threshold (exit 0)",
                           style="bold green"))


def render_layers(r: RequestDiff, console) -> None:
    """One request's worst difference per layer and site over its positions (0: bit-identical)."""
    from rich.table import Table

    layers: dict[int, dict[str, str]] = {}
    model: dict[str, str] = {}
    for site, d in r.sites.items():
        layer, part = site_part(site)
        (layers.setdefault(layer, {}) if layer is not None else model)[part] = fmt_size(d["size"], d["how"])
    t = Table(title=f"request A#{r.index_a} / B#{r.index_b}: max |A-B| per layer and site over its "
                    f"{r.positions} positions (blank: bit-identical; ≥: lower bound from statistics; ≠: "
                    "differs, size unknown)")
    t.add_column("layer", justify="right")
    for p in LAYER_PARTS:
        t.add_column(p, justify="right")
    for layer in sorted(layers):
        t.add_row(str(layer), *[layers[layer].get(p, "") for p in LAYER_PARTS])
    console.print(t)
    if model:
        console.print("model sites: " + ", ".join(f"{s} {model[s]}" for s in MODEL_SITES if s in model))


def _short(text: str, full: bool, n: int = 60) -> str:
    """One line; cut to ``n`` characters only on a terminal (piped output keeps full values)."""
    text = " ".join(str(text).split())
    return text if full or len(text) <= n else text[: n - 3] + "..."
