"""Where a cursor can stand on a timeline, how it moves, and where breakpoints fire over history.

A position is a timeline index and a site of that step: ``step.begin`` first, then the tensor sites
the step recorded, in firing order (``Timeline.site_names``). The same moves serve a trace, a live
session's history and the step in progress. Over history a breakpoint is decided by ``Breakpoint``'s
own checks on the recorded statistics (``first_hit``, ``holds_on_stats``, ``holds_on_shadow``), the
checks the live session uses, so a breakpoint stops at the same place live and in replay.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

from minillama import hooks
from minillama.debug.breakpoints import Breakpoint

BEGIN = hooks.STEP_BEGIN
UNITS = ("step", "layer", "site")


@dataclass(frozen=True, order=True)
class Pos:
    """A cursor position: a timeline index and a site of that step (``step.begin`` or a tensor site)."""

    step: int
    site: str = BEGIN

    @property
    def layer(self) -> int | None:
        return hooks.site_layer(self.site)


def first_index(tl: Any) -> int:
    """The oldest timeline index still readable (a live history forgets its oldest steps)."""
    first = getattr(tl, "first_step", None)
    return int(first()) if callable(first) else 0


def positions(tl: Any, i: int) -> list[str]:
    """The positions of step ``i`` in order: ``step.begin`` then every recorded tensor site."""
    return [BEGIN, *tl.site_names(i)] if tl.event(i) is not None else []


def is_layer_stop(site: str) -> bool:
    """The sites ``n`` stops at, as the live session does: each layer's output, and the logits."""
    return site == "logits" or (hooks.site_layer(site) is not None and hooks.site_part(site) == "output")


def _stops(sites: list[str], unit: str) -> list[str]:
    if unit == "site":
        return sites
    return [s for s in sites if s == BEGIN or (unit == "layer" and is_layer_stop(s))]


def last_pos(tl: Any) -> Pos | None:
    """The end of the newest step (its last recorded site)."""
    n = tl.num_steps()
    if n <= first_index(tl):
        return None
    sites = positions(tl, n - 1)
    return Pos(n - 1, sites[-1] if sites else BEGIN)


def next_pos(tl: Any, pos: Pos, unit: str) -> Pos | None:
    """The position after ``pos`` by ``unit`` ("step", "layer" or "site"); None past the newest step."""
    if unit != "step":
        sites = positions(tl, pos.step)
        i = sites.index(pos.site) if pos.site in sites else 0
        later = _stops(sites[i + 1:], unit)
        if later:
            return Pos(pos.step, later[0])
    return Pos(pos.step + 1, BEGIN) if pos.step + 1 < tl.num_steps() else None


def prev_pos(tl: Any, pos: Pos, unit: str) -> Pos | None:
    """The position before ``pos``; going back over a step boundary lands on that step's last stop."""
    sites = positions(tl, pos.step)
    i = sites.index(pos.site) if pos.site in sites else 0
    earlier = _stops(sites[:i], unit)
    if earlier:
        return Pos(pos.step, earlier[-1])
    if pos.step - 1 < first_index(tl):
        return None
    if unit == "step":
        return Pos(pos.step - 1, BEGIN)
    stops = _stops(positions(tl, pos.step - 1), unit)
    return Pos(pos.step - 1, stops[-1] if stops else BEGIN)


def before(tl: Any, a: Pos, b: Pos) -> bool:
    """True when ``a`` comes strictly before ``b``."""
    if a.step != b.step:
        return a.step < b.step
    sites = positions(tl, a.step)
    return (sites.index(a.site) if a.site in sites else 0) < (sites.index(b.site) if b.site in sites else 0)


def index_of_step(tl: Any, engine_step: int) -> int | None:
    """The timeline index of engine step ``engine_step`` (live sessions may start after the engine did)."""
    for i in range(tl.num_steps() - 1, first_index(tl) - 1, -1):
        ev = tl.event(i)
        if ev is None:
            continue
        if int(ev.get("step", i)) == engine_step:
            return i
        if int(ev.get("step", i)) < engine_step:
            return None
    return None


# ---- breakpoints over history -------------------------------------------------------------------
def holds_at(bp: Breakpoint, tl: Any, i: int, site: str, shadow: dict[str, Any] | None = None) -> bool:
    """Does ``bp`` fire at ``site`` of recorded step ``i``? (``shadow``: ``tl.shadow(i)``, if already read.)"""
    if not bp.matches(site):
        return False
    if bp.condition is None:
        return True
    if bp.condition == "shadow":
        layer = hooks.site_layer(site)
        if layer is None or hooks.site_part(site) != "attn.out":
            return False
        return bp.holds_on_shadow((tl.shadow(i) if shadow is None else shadow).get(str(layer)))
    return bp.holds_on_stats(tl.stats(i, site))


def _tables(tl: Any, i: int) -> tuple[dict[str, Any], Any, list[dict[str, Any]], bool] | None:
    """A format-2 step's event, tables, catalog and whether a second backend ran (for ``first_hit``)."""
    reader = getattr(tl, "reader", None)
    if reader is not None and getattr(reader, "version", 1) >= 2:
        with getattr(tl, "lock", None) or nullcontext():
            tabs = reader.tables(i)
        backend = reader.manifest.get("shadow") not in (None, "reference")
        return (tl.event(i), tabs, reader.catalog, backend) if tabs is not None else None
    live = getattr(tl, "_tables", None)  # LiveTimeline: finished steps' decoded tables
    if live is None or getattr(tl, "recorder", None) is None:
        return None
    got = live(i)
    if got is None or (got[0] or {}).get("in_progress"):
        return None
    shadow = tl.recorder.shadow
    return got[0], got[1], tl.catalog, shadow is not None and shadow.backend is not None


def _hit_in_step(tl: Any, i: int, sites: list[str], bps: list[Breakpoint]) -> tuple[str, Breakpoint] | None:
    """The first of ``sites`` (in order) of step ``i`` where a breakpoint fires."""
    shadow = tl.shadow(i) if any(bp.condition == "shadow" for bp in bps) else None
    for site in sites:
        for bp in bps:
            if holds_at(bp, tl, i, site, shadow):
                return site, bp
    return None


def _fast_hit(tl: Any, i: int, bps: list[Breakpoint]) -> tuple[str, Breakpoint] | None | bool:
    """The first hit of a whole step from its tables (False: no tables, use the per-site check)."""
    if any(bp.condition is None for bp in bps):
        return False
    got = _tables(tl, i)
    if got is None:
        return False
    ev, tabs, catalog, backend = got
    order = {s: k for k, s in enumerate(positions(tl, i))}
    best = None
    for bp in bps:
        site = bp.first_hit(ev, tabs, catalog, tl.dtype, backend)
        if site and (best is None or order.get(site, 1 << 30) < order.get(best[0], 1 << 30)):
            best = (site, bp)
    return best


def find_breakpoint(tl: Any, start: Pos, breakpoints: Iterable[Breakpoint],
                    limit: Pos | None = None) -> tuple[Pos, str] | None:
    """The first position after ``start`` (and before ``limit``) where an enabled breakpoint fires, with
    the reason the live session would give (``breakpoint: ...``)."""
    bps = [bp for bp in breakpoints if bp.enabled]
    if not bps:
        return None
    for i in range(start.step, tl.num_steps()):
        sites = positions(tl, i)
        if i == start.step:
            sites = sites[sites.index(start.site) + 1:] if start.site in sites else sites[1:]
            hit = _hit_in_step(tl, i, sites, bps)
        else:
            hit = _fast_hit(tl, i, bps)
            if hit is False:
                hit = _hit_in_step(tl, i, sites, bps)
        if hit:
            pos = Pos(i, hit[0])
            if limit is not None and not before(tl, pos, limit):
                return None
            return pos, f"breakpoint: {hit[1].describe()}"
        if limit is not None and i >= limit.step:
            return None
    return None
