"""``minillama diff A B``: which layer first changed each request, aligned by request, not by step.

Requests are matched by prompt token ids (``align.match``), so the two traces may differ in batch
composition, other requests, chunking, block size, prefix-cache hits, preemptions, backend, device
or dtype. For each matched request the positions both traces computed are walked in order, and at
each position the sites in firing order (catalog order): the first (position, site) whose rows are
not bit-identical (per-row hash lanes) is where the request first changed. Its size is exact where
both traces kept the full tensor, else a lower bound from the per-request statistics (``sizes``).
Positions after the first diverging generated token are not compared: their inputs differ.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from minillama.trace import align, sizes
from minillama.trace.format import TraceError
from minillama.trace.reader import TraceReader


class TraceMismatchError(TraceError):
    """Two traces that cannot be compared (different models, or no per-request statistics)."""


#: What runs between the previous site and this one: the op a first difference points at.
OPS = {"embed": "embedding lookup", "input": "nothing (the same tensor as the layer before's output)",
       "attn.q": "input_layernorm, q projection, rotary", "attn.k": "input_layernorm, k projection, rotary",
       "attn.v": "input_layernorm, v projection", "attn.out": "attention",
       "mlp.out": "o_proj, residual add, post_attention_layernorm, gate/up projection, SiLU, down_proj",
       "output": "residual add (fused with the next norm)", "final_norm": "final norm", "logits": "LM head",
       "sampled": "sampler"}
_ARCH = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
         "intermediate_size", "vocab_size", "rms_norm_eps", "rope_theta", "rope_scaling", "tie_word_embeddings")


def site_part(site: str) -> tuple[int | None, str]:
    """``layers.3.attn.q`` -> (3, "attn.q"); ``logits`` -> (None, "logits")."""
    if site.startswith("layers."):
        _, layer, part = site.split(".", 2)
        return int(layer), part
    return None, site


@dataclass
class FirstDiff:
    """Where a request's rows first stop being bit-identical."""

    position: int
    site: str
    layer: int | None
    part: str
    op: str
    size: float | None  # max |A - B| there (exact), or a lower bound, or None (unknown)
    how: str  # "full" (exact, from both tensors), "stats" (a lower bound), "none"
    generated: int | None  # index of the generated token at this position (None: a prompt position)
    where_a: dict[str, Any]
    where_b: dict[str, Any]


@dataclass
class RequestDiff:
    """One matched request: identical, or where it first changed, by how much, and its tokens."""

    index_a: int
    index_b: int
    seq_a: int
    seq_b: int
    prompt: str
    prompt_len: int
    positions: int  # positions compared (computed by both)
    identical: bool
    first: FirstDiff | None = None
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)  # differing site -> worst size, count
    token: dict[str, Any] | None = None  # the first diverging generated token
    cached_a: list[list[int]] = field(default_factory=list)  # [start, end) served from the prefix cache
    cached_b: list[list[int]] = field(default_factory=list)
    only_a: int = 0  # positions only A computed (B cached them or stopped earlier)
    only_b: int = 0
    notes: list[str] = field(default_factory=list)

    def over(self, threshold: float | None) -> bool:
        """Over the gate: tokens differ, or rows differ (any, without a threshold; else by more than it)."""
        if self.token is not None:
            return True
        if self.identical:
            return False
        if threshold is None:
            return True
        worst = [s["size"] for s in self.sites.values()]
        return any(w is None or not w <= threshold for w in worst)


@dataclass
class TraceDiff:
    """``diff_traces``'s answer; ``exit_code`` 1 when a matched request is over the gate."""

    path_a: str
    path_b: str
    threshold: float | None
    requests: list[RequestDiff]
    only_a: list[dict[str, Any]]
    only_b: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return all(r.identical and r.token is None for r in self.requests)

    @property
    def exit_code(self) -> int:
        return 1 if any(r.over(self.threshold) for r in self.requests) else 0

    def to_json(self) -> dict[str, Any]:
        """Plain JSON (sizes that are not finite become null)."""
        return json_safe({"a": self.path_a, "b": self.path_b, "threshold": self.threshold,
                        "identical": self.identical, "exit_code": self.exit_code,
                        "requests": [asdict(r) for r in self.requests], "only_a": self.only_a,
                        "only_b": self.only_b, "notes": self.notes})


def json_safe(x: Any) -> Any:
    """``x`` with non-finite floats as None (strict JSON has no NaN or Infinity)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_safe(v) for v in x]
    return x


def check_comparable(a: TraceReader, b: TraceReader) -> list[str]:
    """Raise ``TraceMismatchError`` (one line) unless both traces have per-request statistics of one
    model; returns notes on what differs harmlessly (dtype, device, backend)."""
    for r in (a, b):
        if r.version < 2:
            raise TraceMismatchError(f"{r.path} has no per-request statistics (format {r.version}): record it again "
                                     "with `minillama record` to diff it by request")
        if not r.catalog:
            raise TraceMismatchError(f"{r.path} has no per-request statistics (no site catalog in its manifest): "
                                     "record it again with `minillama record`")
    ca, cb = a.manifest.get("model_config") or {}, b.manifest.get("model_config") or {}
    arch_a, arch_b = ({k: c.get(k) for k in _ARCH} for c in (ca, cb))
    name_a, name_b = ((r.manifest.get("model") or {}).get("name") for r in (a, b))
    if arch_a != arch_b or name_a != name_b:
        what = next((f"{k} {arch_a[k]} vs {arch_b[k]}" for k in _ARCH if arch_a[k] != arch_b[k]),
                    f"{name_a} vs {name_b}")
        raise TraceMismatchError(f"the traces are of different models ({what}): diff compares two recordings of "
                                 "the same model")
    notes = []
    for key in ("dtype", "device", "backend"):
        x, y = a.manifest.get(key), b.manifest.get(key)
        if x != y:
            notes.append(f"{key}: A {x}, B {y}" + (" (no row can be bit-identical)" if key == "dtype" else ""))
    return notes


def diff_traces(a: TraceReader, b: TraceReader, threshold: float | None = None) -> TraceDiff:
    """Compare every request the two traces share (see the module docstring)."""
    notes = check_comparable(a, b)
    pairs, only_a, only_b = align.match(align.index_requests(a), align.index_requests(b))
    catalog = [e["name"] for e in a.catalog]
    paired = [align.pair_rows(qa, qb) for qa, qb in pairs]
    # every request's rows at once: each step's tables are read once per trace
    ga = align.gather(a, [r for p in paired for r in p.a])
    gb = align.gather(b, [r for p in paired for r in p.b])
    out, at = [], 0
    for (qa, qb), p in zip(pairs, paired, strict=True):
        span = slice(at, at + len(p.a))
        at = span.stop
        out.append(_request(a, b, qa, qb, p, {k: v[span] for k, v in ga.items()},
                            {k: v[span] for k, v in gb.items()}, catalog))
    brief = lambda q: {"index": q.index, "seq_id": q.seq_id, "prompt": _prompt(q), "prompt_len": len(q.prompt_ids)}
    return TraceDiff(a.path, b.path, threshold, out, [brief(q) for q in only_a], [brief(q) for q in only_b], notes)


def diff_request(a: TraceReader, b: TraceReader, seq_a: int, seq_b: int) -> RequestDiff:
    """Compare request ``seq_a`` of ``a`` with request ``seq_b`` of ``b`` (whatever their prompts)."""
    check_comparable(a, b)
    qa, qb = align.index_requests(a), align.index_requests(b)
    for r, q, sid in ((a, qa, seq_a), (b, qb, seq_b)):
        if sid not in q:
            raise TraceMismatchError(f"{r.path} has no request with seq id {sid}: pick one `minillama trace info` lists")
    p = align.pair_rows(qa[seq_a], qb[seq_b])
    return _request(a, b, qa[seq_a], qb[seq_b], p, align.gather(a, p.a), align.gather(b, p.b),
                    [e["name"] for e in a.catalog])


def _prompt(q: align.RequestRows) -> str:
    return q.prompt if q.prompt is not None else f"<{len(q.prompt_ids)} prompt tokens>"


def _request(a: TraceReader, b: TraceReader, qa: align.RequestRows, qb: align.RequestRows, paired: align.PairedRows,
             ga: dict[str, np.ndarray], gb: dict[str, np.ndarray], catalog: list[str]) -> RequestDiff:
    res = RequestDiff(qa.index, qb.index, qa.seq_id, qb.seq_id, _prompt(qa), len(qa.prompt_ids),
                      len(set(paired.positions.tolist())), True,
                      cached_a=[[s, e] for s, e, _ in qa.cached], cached_b=[[s, e] for s, e, _ in qb.cached],
                      only_a=len(paired.only_a), only_b=len(paired.only_b))
    k = align.first_token_divergence(qa, qb)
    if k is not None:
        res.token = {"generated": k, "position": len(qa.prompt_ids) + k, "token_a": qa.tokens[k],
                     "token_b": qb.tokens[k]}
    if len(qa.tokens) != len(qb.tokens) and k is None:
        res.notes.append(f"A generated {len(qa.tokens)} tokens, B {len(qb.tokens)}: compared the common part")
    if not len(paired.positions):
        res.notes.append("no position was computed by both traces")
        return res
    valid = ga["valid"] & gb["valid"]
    differs = (ga["lanes"] != gb["lanes"]).any(-1) & valid
    expected = ga["valid"] | gb["valid"]  # sample sites exist only at sampling rows
    expected[:, [j for j, e in enumerate(a.catalog) if e.get("rows") != "samples"]] = True
    if (expected & ~valid).any():
        res.notes.append(f"{int((expected & ~valid).sum())} (position, site) rows have no statistics on one side "
                         "(not compared)")
    if not differs.any():
        return res
    res.identical = False
    est = sizes.Sizes(a, b, paired, qa, qb, ga, gb)
    for slot in np.flatnonzero(differs.any(0)):
        ks = np.flatnonzero(differs[:, slot])
        size, how = est.worst(int(slot), ks)
        res.sites[catalog[slot]] = {"size": size, "how": how, "positions": int(len(ks)),
                                    "first_position": int(paired.positions[ks[0]])}
    k0, s0 = divmod(int(np.argmax(differs.reshape(-1))), differs.shape[1])
    site = catalog[s0]
    layer, part = site_part(site)
    size, how = est.at(s0, k0)
    pos = int(paired.positions[k0])
    gen = pos - len(qa.prompt_ids) + 1 if part in ("logits", "sampled") else pos - len(qa.prompt_ids)
    res.first = FirstDiff(pos, site, layer, part, OPS.get(part, part), size, how, gen if gen >= 0 else None,
                          align.describe_rows(a, paired.a[k0]), align.describe_rows(b, paired.b[k0]))
    return res
