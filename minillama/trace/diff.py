"""Compare two traces step by step and layer by layer, or one trace's shadow-backend records.

``diff_traces(a, b)`` walks both recordings in lockstep: at each step it checks that the same
requests ran the same chunks, compares every site (bit-equal by hash; the exact max abs difference
where both saved the full tensor; otherwise a lower bound from the statistics), and compares the
sampled tokens to name the first diverging token. Steps after a diverging token or a different
batch are not compared: their inputs differ by construction.

``diff_shadow(reader)`` summarises per layer how far the shadow backend strayed from the active one.
Both results carry ``exit_code`` (1 = over the threshold) so ``minillama diff`` can gate CI.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from minillama.trace.reader import TraceError, TraceReader

#: Default ``--threshold``: the largest max abs difference of any tensor site that still counts as equal.
DEFAULT_THRESHOLD = 1e-3
#: ``diff --shadow`` without a threshold: a kernel whose error exceeds this many times plain attention's is over.
DEFAULT_BUDGET_RATIO = 2.0

LAYER_PARTS = ("input", "attn.q", "attn.k", "attn.v", "attn.out", "mlp.out", "output")
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_SKIP_SITES = ("sampled",)  # token ids: compared as tokens, not as numbers


class TraceMismatchError(TraceError):
    """Two traces that cannot be compared (different prompts)."""


@dataclass
class SiteDiff:
    """How one site differs at one step. ``method``: equal (same hash), full (exact, from both full
    tensors), stats (a lower bound from mean and absmax), shape, or nan/inf (counts differ)."""

    step: int
    site: str
    max_abs: float
    method: str
    detail: str = ""

    @property
    def exact(self) -> bool:
        return self.method in ("equal", "full")


@dataclass
class TokenDivergence:
    """The first sampled token that differs between the two traces."""

    step: int
    request: int  # index in prompt order
    seq_id_a: int
    seq_id_b: int
    position: int  # index of the token among the request's generated tokens
    token_a: int | None
    token_b: int | None
    text_a: str
    text_b: str
    text_before: str  # the generated text both agree on


@dataclass
class TraceDiff:
    """Everything ``diff_traces`` found; ``exit_code`` is 1 when anything is over the threshold."""

    path_a: str
    path_b: str
    threshold: float
    num_steps_a: int
    num_steps_b: int
    steps_compared: int = 0
    worst: dict[str, SiteDiff] = field(default_factory=dict)  # per site: its largest difference over steps
    first_over: SiteDiff | None = None
    divergence: TokenDivergence | None = None
    structure: str | None = None  # first batch that differs, if any
    notes: list[str] = field(default_factory=list)

    @property
    def max_abs(self) -> float:
        return max((d.max_abs for d in self.worst.values()), default=0.0)

    @property
    def exceeded(self) -> bool:
        return self.first_over is not None or self.divergence is not None or self.structure is not None

    @property
    def exit_code(self) -> int:
        return 1 if self.exceeded else 0


@dataclass
class ShadowLayer:
    """One layer's worst values over every step. ``max_abs``/``rel``: active vs shadow backend;
    ``err_*``: each one vs the float64 reference; ``budget_ratio*``: that error over plain attention's."""

    layer: int
    backend: str
    steps: int = 0
    max_abs: float | None = None
    rel: float | None = None
    err_active: float | None = None
    err_shadow: float | None = None
    budget_ratio: float | None = None
    budget_ratio_shadow: float | None = None
    step_of_max: int = 0
    first_step_over: int | None = None

    @property
    def over(self) -> bool:
        return self.first_step_over is not None


@dataclass
class ShadowDiff:
    """Per-layer shadow summary of one trace; ``gate`` says what counts as over."""

    path: str
    layers: list[ShadowLayer]
    gate: str
    threshold: float | None
    steps: int

    @property
    def first_over(self) -> ShadowLayer | None:
        return next((lay for lay in self.layers if lay.over), None)

    @property
    def exit_code(self) -> int:
        return 1 if self.first_over is not None else 0


# ---- two traces -----------------------------------------------------------------------------------
def _prompts(r: TraceReader) -> list[Any]:
    """What each request asked, in prompt order: token ids when recorded, else text, else prompt length."""
    every = r.requests()
    reqs = [every[sid] for sid in r.request_order() if sid in every]
    if all(x["prompt_token_ids"] is not None for x in reqs):
        return [list(x["prompt_token_ids"]) for x in reqs]
    if all(x["prompt"] is not None for x in reqs):
        return [x["prompt"] for x in reqs]
    lens: dict[int, int] = {}
    for ev in r.steps():
        for s in ev.get("batch", {}).get("seqs", []):
            lens.setdefault(int(s["seq_id"]), int(s.get("prompt_len", -1)))
    return [f"<{n} prompt tokens>" for n in lens.values()]


def _short(x: Any, n: int = 60) -> str:
    s = repr(x)
    return s if len(s) <= n else s[: n - 3] + "..."


def check_same_prompts(a: TraceReader, b: TraceReader) -> None:
    """Raise ``TraceMismatchError`` unless both traces ran the same prompts in the same order."""
    pa, pb = _prompts(a), _prompts(b)
    if len(pa) != len(pb):
        raise TraceMismatchError(f"{a.path} ran {len(pa)} prompts but {b.path} ran {len(pb)}: diff needs two "
                                 "recordings of the same prompts; record both with the same --prompt arguments")
    for i, (x, y) in enumerate(zip(pa, pb, strict=True)):
        if type(x) is not type(y) and not (isinstance(x, list) and isinstance(y, list)):
            continue  # one recorded ids, the other text: nothing reliable to compare
        if x != y:
            raise TraceMismatchError(f"prompt {i} differs ({_short(x, 40)} vs {_short(y, 40)}): diff needs two "
                                     "recordings of the same prompts; record both with the same --prompt arguments")


def _composition(ev: dict[str, Any], index: dict[int, int]) -> list[tuple[int, int, int]]:
    """The batch as (request index, chunk start, chunk end), independent of seq ids and block numbers."""
    out = []
    for s in ev.get("batch", {}).get("seqs", []):
        start, end = s.get("chunk") or [s.get("num_computed", 0), s.get("num_computed", 0) + s.get("num_new", 0)]
        out.append((index.get(int(s["seq_id"]), -1), int(start), int(end)))
    return out


def _num(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def compare_site(a: TraceReader, b: TraceReader, i: int, site: str, sa: dict, sb: dict) -> SiteDiff:
    """Compare ``site`` at step ``i`` of both traces, as exactly as what was recorded allows."""
    shape_a, shape_b = sa.get("shape"), sb.get("shape")
    if shape_a != shape_b:
        return SiteDiff(i, site, math.inf, "shape", f"shape {shape_a} vs {shape_b}")
    if sa.get("hash") is not None and sa.get("hash") == sb.get("hash") and sa.get("dtype") == sb.get("dtype"):
        return SiteDiff(i, site, 0.0, "equal")
    bad_a, bad_b = (sa.get("nan", 0), sa.get("inf", 0)), (sb.get("nan", 0), sb.get("inf", 0))
    if bad_a != bad_b:
        return SiteDiff(i, site, math.inf, "nan/inf", f"A has {bad_a[0]} NaN, {bad_a[1]} Inf; "
                                                      f"B has {bad_b[0]} NaN, {bad_b[1]} Inf")
    if sa.get("full") and sb.get("full"):
        ta, tb = a.tensor(i, site), b.tensor(i, site)
        if ta is not None and tb is not None and ta.shape == tb.shape:
            fa, fb = ta.double(), tb.double()
            d = (fa - fb).abs()
            same = (fa == fb) | (fa.isnan() & fb.isnan())  # equal infinities and NaNs at the same place
            d = d.masked_fill(same, 0.0)
            if d.numel() and d.isnan().any():
                return SiteDiff(i, site, math.inf, "nan/inf", "NaN at different positions")
            return SiteDiff(i, site, float(d.max()) if d.numel() else 0.0, "full")
    bound = 0.0
    for key in ("mean", "absmax"):
        x, y = _num(sa.get(key)), _num(sb.get(key))
        if math.isfinite(x) and math.isfinite(y):
            bound = max(bound, abs(x - y))
    return SiteDiff(i, site, bound, "stats", "lower bound from mean and absmax (record with --full for exact)")


def _piece(now: str, before: str) -> str:
    return now[len(before):] if now.startswith(before) else now


def diff_traces(a: TraceReader, b: TraceReader, threshold: float = DEFAULT_THRESHOLD) -> TraceDiff:
    """Compare ``a`` and ``b`` step by step; raises ``TraceMismatchError`` if they ran different prompts."""
    check_same_prompts(a, b)
    res = TraceDiff(a.path, b.path, threshold, a.num_steps, b.num_steps)
    order_a, order_b = a.request_order(), b.request_order()
    index_a = {sid: k for k, sid in enumerate(order_a)}
    index_b = {sid: k for k, sid in enumerate(order_b)}
    texts_a: dict[int, str] = {}
    texts_b: dict[int, str] = {}
    ntok: dict[int, int] = {}
    only_a: set[str] = set()
    only_b: set[str] = set()
    for i in range(min(a.num_steps, b.num_steps)):
        ea, eb = a.step(i), b.step(i)
        ca, cb = _composition(ea, index_a), _composition(eb, index_b)
        if ca != cb:
            res.structure = (f"step {i}: the batches differ (A runs {_fmt_comp(ca)}, B runs {_fmt_comp(cb)}); "
                             "later steps are not compared")
            break
        res.steps_compared += 1
        sites_a, sites_b = ea.get("sites", {}), eb.get("sites", {})
        only_a.update(set(sites_a) - set(sites_b))
        only_b.update(set(sites_b) - set(sites_a))
        for site, sa in sites_a.items():
            sb = sites_b.get(site)
            if site in _SKIP_SITES or not isinstance(sa, dict) or not isinstance(sb, dict):
                continue
            d = compare_site(a, b, i, site, sa, sb)
            worst = res.worst.get(site)
            if worst is None or d.max_abs > worst.max_abs:
                res.worst[site] = d
            if res.first_over is None and d.max_abs > threshold:
                res.first_over = d
        res.divergence = _tokens(i, ea, eb, order_a, order_b, texts_a, texts_b, ntok)
        if res.divergence is not None:
            if i + 1 < min(a.num_steps, b.num_steps):
                res.notes.append(f"steps after {i} are not compared: the inputs differ after the first diverging "
                                 "token")
            break
    if only_a:
        res.notes.append(f"sites only in A (not compared): {', '.join(sorted(only_a)[:6])}"
                         + (" ..." if len(only_a) > 6 else ""))
    if only_b:
        res.notes.append(f"sites only in B (not compared): {', '.join(sorted(only_b)[:6])}"
                         + (" ..." if len(only_b) > 6 else ""))
    if a.num_steps != b.num_steps and res.divergence is None and res.structure is None:
        res.notes.append(f"A has {a.num_steps} steps ({a.status}), B has {b.num_steps} ({b.status}): "
                         f"compared the first {res.steps_compared}")
    if any(d.method == "stats" for d in res.worst.values()):
        res.notes.append("some sites were compared by statistics only (a lower bound): record with --full "
                         "'layers.*' for exact differences")
    return res


def _fmt_comp(comp: list[tuple[int, int, int]]) -> str:
    return ", ".join(f"request {r} [{s}:{e}]" for r, s, e in comp) or "nothing"


def _tokens(i: int, ea: dict, eb: dict, order_a: list[int], order_b: list[int], texts_a: dict[int, str],
            texts_b: dict[int, str], ntok: dict[int, int]) -> TokenDivergence | None:
    """Compare the tokens sampled at step ``i`` request by request (in prompt order); update running texts."""
    sam_a = {int(k): v for k, v in (ea.get("sampled") or {}).items()}
    sam_b = {int(k): v for k, v in (eb.get("sampled") or {}).items()}
    txt_a = {int(k): v for k, v in (ea.get("texts") or {}).items()}
    txt_b = {int(k): v for k, v in (eb.get("texts") or {}).items()}
    found = None
    for k in range(max(len(order_a), len(order_b))):
        sid_a = order_a[k] if k < len(order_a) else -1
        sid_b = order_b[k] if k < len(order_b) else -1
        ta, tb = sam_a.get(sid_a), sam_b.get(sid_b)
        if ta is None and tb is None:
            continue
        before_a, before_b = texts_a.get(sid_a, ""), texts_b.get(sid_b, "")
        now_a, now_b = txt_a.get(sid_a, before_a), txt_b.get(sid_b, before_b)
        if found is None and ta != tb:
            found = TokenDivergence(i, k, sid_a, sid_b, ntok.get(k, 0), ta, tb, _piece(now_a, before_a),
                                    _piece(now_b, before_b), before_a)
        texts_a[sid_a], texts_b[sid_b] = now_a, now_b
        ntok[k] = ntok.get(k, 0) + 1
    return found


# ---- one trace's shadow records -------------------------------------------------------------------
_SHADOW_KEYS = ("max_abs", "rel", "err_active", "err_shadow", "budget_ratio", "budget_ratio_shadow")


def _worst_ratio(rec: dict) -> float | None:
    ratios = [_num(rec[k]) for k in ("budget_ratio", "budget_ratio_shadow") if rec.get(k) is not None]
    return max(ratios) if ratios else None


def diff_shadow(reader: TraceReader, threshold: float | None = None) -> ShadowDiff:
    """Per-layer maxima over steps of the shadow records.

    Over = ``max_abs > threshold`` (``err_active`` when no shadow backend ran) when a threshold is
    given; else either backend's ``budget_ratio > DEFAULT_BUDGET_RATIO`` when budgets were recorded;
    else ``max_abs > DEFAULT_THRESHOLD``.
    """
    layers: dict[int, ShadowLayer] = {}
    records: list[tuple[int, int, dict]] = []
    for i, ev in enumerate(reader.steps()):
        for key, rec in (ev.get("shadow") or {}).items():
            if not isinstance(rec, dict):
                continue
            layer = int(key)
            records.append((i, layer, rec))
            lay = layers.setdefault(layer, ShadowLayer(layer, str(rec.get("backend", "?"))))
            lay.steps += 1
            for k in _SHADOW_KEYS:
                if rec.get(k) is None:
                    continue
                v, cur = _num(rec[k]), getattr(lay, k)
                if cur is None or v > cur or (math.isnan(v) and not math.isnan(cur)):
                    setattr(lay, k, v)
                    if k == ("max_abs" if "max_abs" in rec else "err_active"):
                        lay.step_of_max = i
    if not layers:
        raise TraceError(f"{reader.path} has no shadow records: record it with `minillama record --shadow ...`")
    any_budget = any(_worst_ratio(rec) is not None for _i, _l, rec in records)
    if threshold is not None:
        gate = f"max_abs > {threshold:g}"
        over = lambda r: not _num(r.get("max_abs", r.get("err_active"))) <= threshold
    elif any_budget:
        gate = f"budget_ratio > {DEFAULT_BUDGET_RATIO:g} (error beyond plain attention's at this precision)"
        over = lambda r: (x := _worst_ratio(r)) is not None and not x <= DEFAULT_BUDGET_RATIO
    else:
        gate = f"max_abs > {DEFAULT_THRESHOLD:g}"
        over = lambda r: not _num(r.get("max_abs", r.get("err_active"))) <= DEFAULT_THRESHOLD
    for i, layer, rec in records:
        lay = layers[layer]
        if lay.first_step_over is None and over(rec):
            lay.first_step_over = i
    return ShadowDiff(reader.path, [layers[k] for k in sorted(layers)], gate, threshold, reader.num_steps)


# ---- rendering ------------------------------------------------------------------------------------
def _fmt(d: SiteDiff | None, threshold: float) -> str:
    if d is None:
        return "[dim]-[/]"
    if d.method == "equal":
        return "[green]0[/]"
    if d.method in ("shape", "nan/inf"):
        return f"[red]{d.method}[/]"
    text = ("≥" if d.method == "stats" else "") + f"{d.max_abs:.2e}"
    return f"[red]{text}[/]" if d.max_abs > threshold else text


def render_diff(res: TraceDiff, console=None) -> None:
    """Print a ``TraceDiff`` as rich tables: model sites, a layer-by-site matrix, then the verdict."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    console.print(f"[bold]A[/] {escape(res.path_a)} ({res.num_steps_a} steps)   "
                  f"[bold]B[/] {escape(res.path_b)} ({res.num_steps_b} steps)   "
                  f"compared {res.steps_compared} steps, threshold {res.threshold:g}")
    layers: dict[int, dict[str, SiteDiff]] = {}
    other: dict[str, SiteDiff] = {}
    for site, d in res.worst.items():
        m = _LAYER_RE.match(site)
        if m:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = d
        else:
            other[site] = d
    if other:
        t = Table(title="max |A - B| per site (over steps)")
        for col in ("site", "max |A-B|", "at step", "how"):
            t.add_column(col)
        for site, d in other.items():
            t.add_row(site, _fmt(d, res.threshold), str(d.step), d.method + (f": {d.detail}" if d.detail and
                                                                            d.method != "stats" else ""))
        console.print(t)
    if layers:
        parts = [p for p in LAYER_PARTS if any(p in v for v in layers.values())]
        parts += sorted({p for v in layers.values() for p in v} - set(parts))
        t = Table(title="max |A - B| per layer and site (over steps; ≥ = lower bound from stats)")
        t.add_column("layer", justify="right")
        for p in parts:
            t.add_column(p, justify="right")
        for layer in sorted(layers):
            t.add_row(str(layer), *[_fmt(layers[layer].get(p), res.threshold) for p in parts])
        console.print(t)
    if res.first_over is not None:
        d = res.first_over
        how = "full tensors" if d.method == "full" else d.detail or d.method
        console.print(f"[red]first over {res.threshold:g}:[/] step {d.step}, [bold]{d.site}[/]: "
                      f"max |A-B| {d.max_abs:.3e} ({escape(how)})")
    if res.divergence is not None:
        v = res.divergence
        console.print(f"[red]first diverging token:[/] step {v.step}, request {v.request} (seq {v.seq_id_a} in A, "
                      f"seq {v.seq_id_b} in B), generated token #{v.position}: "
                      f"A {v.token_a} {escape(repr(v.text_a))} vs B {v.token_b} {escape(repr(v.text_b))}"
                      f" after {escape(repr(v.text_before[-60:]))}")
    if res.structure:
        console.print(f"[red]batch mismatch:[/] {escape(res.structure)}")
    for note in res.notes:
        console.print(f"[dim]note: {escape(note)}[/]")
    if res.exceeded:
        console.print(f"[bold red]DIFFERENT[/] (exit 1); largest difference {res.max_abs:.3e}")
    else:
        console.print(f"[bold green]SAME[/] within {res.threshold:g} (exit 0); largest difference {res.max_abs:.3e}")


def render_shadow(res: ShadowDiff, console=None) -> None:
    """Print a ``ShadowDiff`` as a per-layer table and the first layer over the gate."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    t = Table(title=f"shadow vs active backend, {escape(res.path)} ({res.steps} steps); over = {escape(res.gate)}")
    f = lambda x, spec=".2e": "-" if x is None else format(x, spec)
    cols = [("layer", lambda lay: str(lay.layer)), ("shadow", lambda lay: lay.backend),
            ("max|a-s|", lambda lay: f(lay.max_abs)), ("rel", lambda lay: f(lay.rel)),
            ("err act", lambda lay: f(lay.err_active)), ("err shd", lambda lay: f(lay.err_shadow)),
            ("ratio", lambda lay: f(lay.budget_ratio, ".2f")), ("ratio shd", lambda lay: f(lay.budget_ratio_shadow, ".2f")),
            ("worst@", lambda lay: str(lay.step_of_max)),
            ("over@", lambda lay: "-" if lay.first_step_over is None else str(lay.first_step_over))]
    cols = [(name, get) for name, get in cols if any(get(lay) != "-" for lay in res.layers) or name == "over@"]
    for name, _get in cols:
        t.add_column(name, justify="right", no_wrap=True)
    for lay in res.layers:
        t.add_row(*[get(lay) for _n, get in cols], style="red" if lay.over else "")
    console.print(t)
    first = res.first_over
    if first is None:
        console.print(f"[bold green]no layer over[/] ({escape(res.gate)}) (exit 0)")
    else:
        console.print(f"[bold red]first layer over:[/] layer {first.layer} (from step {first.first_step_over}; "
                      f"worst at step {first.step_of_max}) (exit 1)")
