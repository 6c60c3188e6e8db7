"""Where the cursor can go: positions (step, site) over a timeline, forward and backward.

A position is a step and a site of that step; ``step.begin`` comes before every tensor site. Steps
list their sites in the order they fired (the event's ``sites`` dict keeps that order), so the same
moves work on a trace, on a live session's finished steps and on the step in progress.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

BEGIN = "step.begin"
_LAYER_RE = re.compile(r"layers\.(\d+)\.")
_LAYER_STOP = re.compile(r"layers\.\d+\.output$")


def site_layer(site: str) -> int | None:
    """Layer index of a per-layer site name (``layers.4.attn.q`` -> 4), else None."""
    m = _LAYER_RE.match(site)
    return int(m.group(1)) if m else None


def is_layer_stop(site: str) -> bool:
    """The sites ``n`` stops at, as the live session does: each layer's output and the logits."""
    return bool(_LAYER_STOP.match(site)) or site == "logits"


@dataclass(frozen=True, order=True)
class Pos:
    """A cursor position: step index and site (``step.begin`` or a tensor site)."""

    step: int
    site: str = BEGIN


def sites_of(event: dict[str, Any] | None) -> list[str]:
    """The step's positions in order: ``step.begin`` then every recorded tensor site."""
    return [BEGIN, *((event or {}).get("sites") or {})]


def index_of(event: dict[str, Any] | None, site: str) -> int:
    """Ordinal of ``site`` within its step (0 = step.begin); -1 if the step has no such site."""
    try:
        return sites_of(event).index(site)
    except ValueError:
        return -1


def before(a: Pos, b: Pos, timeline) -> bool:
    """True when ``a`` comes strictly before ``b`` on the timeline."""
    if a.step != b.step:
        return a.step < b.step
    ev = timeline.event(a.step)
    return index_of(ev, a.site) < index_of(ev, b.site)


def next_pos(timeline, pos: Pos, unit: str) -> Pos | None:
    """The position after ``pos`` by ``unit`` ("step", "layer" or "site"); None past the last step."""
    if unit != "step":
        ev = timeline.event(pos.step)
        sites = sites_of(ev)
        i = sites.index(pos.site) if pos.site in sites else 0
        for s in sites[i + 1:]:
            if unit == "site" or is_layer_stop(s):
                return Pos(pos.step, s)
    if pos.step + 1 < timeline.num_steps():
        return Pos(pos.step + 1, BEGIN)
    return None


def prev_pos(timeline, pos: Pos, unit: str) -> Pos | None:
    """The position before ``pos`` by ``unit``; stepping back over a step boundary lands on its last stop."""
    ev = timeline.event(pos.step)
    sites = sites_of(ev)
    i = sites.index(pos.site) if pos.site in sites else 0
    if unit == "step":
        if i > 0:
            return Pos(pos.step, BEGIN)
        return Pos(pos.step - 1, BEGIN) if pos.step > 0 else None
    for s in reversed(sites[:i]):
        if unit == "site" or is_layer_stop(s) or s == BEGIN:
            return Pos(pos.step, s)
    if pos.step <= 0:
        return None
    prev = sites_of(timeline.event(pos.step - 1))
    for s in reversed(prev):
        if unit == "site" or is_layer_stop(s) or s == BEGIN:
            return Pos(pos.step - 1, s)
    return Pos(pos.step - 1, BEGIN)


def breakpoint_hit(bp, site: str, event: dict[str, Any] | None) -> bool:
    """Does breakpoint ``bp`` (``minillama.debug.session.Breakpoint``) fire at ``site`` of a recorded step?

    Conditions are judged from the recorded statistics (NaN/Inf counts, absmax) and shadow metrics,
    so breakpoints work the same over history and traces as they do live.
    """
    if not bp.matches(site):
        return False
    if bp.condition is None:
        return True
    ev = event or {}
    if bp.condition == "shadow":
        layer = site_layer(site)
        m = (ev.get("shadow") or {}).get(str(layer), {}) if layer is not None else {}
        return m.get("max_abs", m.get("err_active", 0.0)) > bp.value
    rec = (ev.get("sites") or {}).get(site)
    if not rec:
        return False
    if bp.condition == "nan":
        return (rec.get("nan") or 0) + (rec.get("inf") or 0) > 0
    if bp.condition == "absmax":
        return (rec.get("absmax") or 0.0) > bp.value
    return False


def find_breakpoint(timeline, pos: Pos, breakpoints, limit: Pos | None = None) -> tuple[Pos, str] | None:
    """The first position after ``pos`` (and before ``limit``) where a breakpoint fires, with its reason."""
    active = [bp for bp in breakpoints if bp.enabled]
    if not active:
        return None
    step = pos.step
    first = True
    while step < timeline.num_steps():
        ev = timeline.event(step)
        sites = sites_of(ev)
        start = (sites.index(pos.site) + 1 if pos.site in sites else 1) if first else 0
        for s in sites[start:]:
            here = Pos(step, s)
            if limit is not None and not before(here, limit, timeline):
                return None
            for bp in active:
                if breakpoint_hit(bp, s, ev):
                    return here, f"breakpoint: {bp.describe()}"
        first = False
        step += 1
    return None
