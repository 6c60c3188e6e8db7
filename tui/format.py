"""Small formatting helpers shared by the views: numbers, request colours, sparklines, text tails."""

from __future__ import annotations

import math

from rich.text import Text

#: One colour per request (by seq_id modulo the length); chosen to stay readable on dark and light themes.
SEQ_COLOURS = ("#4e9a06", "#3465a4", "#c4a000", "#75507b", "#06989a", "#cc0000", "#ce5c00", "#8f5902")
SPARK = "▁▂▃▄▅▆▇█"


def seq_colour(seq_id: int | str) -> str:
    """The colour of request ``seq_id`` in every view."""
    return SEQ_COLOURS[int(seq_id) % len(SEQ_COLOURS)]


def seq_label(seq_id: int | str) -> Text:
    """``#3`` in the request's colour."""
    return Text(f"#{seq_id}", style=f"bold {seq_colour(seq_id)}")


def num(x: float | int | None, digits: int = 4) -> str:
    """A compact number: ``1.234e-05``, ``0.1234``, ``12.35``; ``-`` for None, ``nan`` for NaN."""
    if x is None:
        return "-"
    if isinstance(x, int):
        return str(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0"
    a = abs(x)
    if a >= 1e4 or a < 1e-3:
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}"


def tail(text: str, width: int) -> str:
    """The last ``width`` characters of ``text`` on one line (newlines shown as ⏎), with a leading ellipsis."""
    flat = text.replace("\r", "").replace("\n", "⏎")
    if width <= 1:
        return flat[-max(width, 0):] if width > 0 else ""
    return flat if len(flat) <= width else "…" + flat[-(width - 1):]


def head(text: str, width: int) -> str:
    """The first ``width`` characters of ``text`` on one line, with a trailing ellipsis."""
    flat = text.replace("\r", "").replace("\n", "⏎")
    if width <= 1:
        return flat[: max(width, 0)]
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def sparkline(values: list[float | None], *, log: bool = True, highlight: set[int] | None = None,
              style: str = "cyan", hot: str = "bold red") -> Text:
    """One block character per value (log scale by default); indices in ``highlight`` drawn in ``hot``."""
    highlight = highlight or set()
    vals = []
    for v in values:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            vals.append(None)
        else:
            vals.append(math.log10(max(v, 1e-30)) if log else v)
    finite = [v for v in vals if v is not None and not math.isinf(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 0.0)
    out = Text()
    for i, v in enumerate(vals):
        if v is None:
            out.append(" ")
            continue
        level = 0 if hi - lo < 1e-12 else round((min(v, hi) - lo) / (hi - lo) * (len(SPARK) - 1))
        out.append(SPARK[level], style=hot if i in highlight else style)
    return out


def heat_colour(w: float) -> str:
    """A background colour for an attention weight in [0, 1] (dark blue -> yellow), as a hex string."""
    w = min(max(w, 0.0), 1.0) ** 0.5  # square root: small weights stay visible
    stops = ((0.0, (16, 20, 48)), (0.35, (40, 70, 160)), (0.7, (200, 80, 60)), (1.0, (255, 230, 80)))
    for (p0, c0), (p1, c1) in zip(stops, stops[1:], strict=False):
        if w <= p1:
            t = (w - p0) / (p1 - p0)
            rgb = tuple(round(a + (b - a) * t) for a, b in zip(c0, c1, strict=True))
            return "#{:02x}{:02x}{:02x}".format(*rgb)
    return "#ffe650"
