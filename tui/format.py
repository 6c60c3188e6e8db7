"""Small formatting helpers the views share: numbers, plurals, request colours, fixed-scale bars, text.

Strings that come from a trace or a model (prompts, generated text, token pieces) are always put in
``rich.text.Text`` as plain text, never parsed as markup: a trace may contain ``[/x]``.
"""

from __future__ import annotations

import math

from rich.text import Text

#: One colour per request (seq id modulo the length), bright enough on dark and light terminals.
SEQ_COLOURS = ("#8ae234", "#87cefa", "#fce94f", "#e0a0ff", "#34e2e2", "#ff8c8c", "#fcaf3e", "#d7d7af")
BARS = "▁▂▃▄▅▆▇█"


def seq_colour(seq_id: int | str) -> str:
    """The colour of request ``seq_id`` in every view."""
    return SEQ_COLOURS[int(seq_id) % len(SEQ_COLOURS)]


def seq_label(seq_id: int | str) -> Text:
    """``#3`` in the request's colour."""
    return Text(f"#{seq_id}", style=f"bold {seq_colour(seq_id)}")


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 token``, ``2 tokens`` (``many``: an irregular plural)."""
    return f"{n} {word if n == 1 else (many or word + 's')}"


def num(x: float | int | None, digits: int = 4) -> str:
    """A compact number: ``1.234e-05``, ``0.1234``, ``12.35``; ``-`` for None."""
    if x is None:
        return "-"
    if isinstance(x, bool | int):
        return str(int(x))
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0"
    if abs(x) >= 1e4 or abs(x) < 1e-3:
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}"


def flat(text: str) -> str:
    """One line: newlines shown as ⏎, carriage returns dropped."""
    return text.replace("\r", "").replace("\n", "⏎")


def tail(text: str, width: int) -> str:
    """The last ``width`` characters of ``text`` on one line, with a leading ellipsis when cut."""
    text = flat(text)
    if width <= 1:
        return text[-width:] if width == 1 else ""
    return text if len(text) <= width else "…" + text[-(width - 1):]


def head(text: str, width: int) -> str:
    """The first ``width`` characters of ``text`` on one line, with a trailing ellipsis when cut."""
    text = flat(text)
    if width <= 1:
        return text[:max(width, 0)]
    return text if len(text) <= width else text[: width - 1] + "…"


def middle(text: str, width: int) -> str:
    """``text`` on one line in ``width`` characters, cut in the middle when too long: prompts that start
    alike ("What is the capital of ...") still differ by their ends."""
    text = flat(text)
    if len(text) <= width or width < 5:
        return head(text, width)
    end = (width - 1) // 2
    return text[: width - 1 - end] + "…" + text[len(text) - end:]


def rows_text(spans: list) -> str:
    """Row ranges ``[..., start, end]`` as text, adjacent ones merged (a whole batch is one range)."""
    merged: list[list[int]] = []
    for r in spans:
        if merged and merged[-1][1] == r[-2]:
            merged[-1][1] = r[-1]
        else:
            merged.append([r[-2], r[-1]])
    if not merged:
        return "-"
    return ", ".join(f"{a}-{b}" for a, b in merged[:2]) + (", …" if len(merged) > 2 else "")


def user_part(prompt: str) -> str:
    """The user's message of a chat-templated prompt (the whole text when there is no template)."""
    for start, end in (("<|im_start|>user\n", "<|im_end|>"),
                       ("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>")):
        if start in prompt:
            return prompt.split(start)[-1].split(end)[0]
    return prompt


def log_level(x: float | None, lo: float, hi: float, levels: int = len(BARS)) -> int | None:
    """Where ``x`` falls on a FIXED log scale ``lo..hi`` (0..levels-1); None for no value."""
    if x is None or math.isnan(x):
        return None
    if x <= lo:
        return 0
    if x >= hi:
        return levels - 1
    return min(levels - 1, int((math.log10(x) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)) * levels))


def bars(values: list[float | None], lo: float, hi: float, threshold: float | None = None,
         style: str = "cyan", hot: str = "bold red") -> Text:
    """One bar per value on a fixed log scale ``lo..hi`` (the same height means the same value on every
    line and every step); values over ``threshold`` in ``hot``; ``·`` where there is no value."""
    out = Text()
    for v in values:
        level = log_level(v, lo, hi)
        if level is None:
            out.append("·", style="grey50")
            continue
        over = threshold is not None and (v is None or not v <= threshold)
        out.append(BARS[level], style=hot if over else style)
    return out


def ratio_colour(r: float | None, threshold: float) -> str:
    """Background of a budget-ratio cell on a fixed scale: within (blue/green), near (yellow), over (red)."""
    if r is None or math.isnan(r):
        return "grey23"
    if r > threshold * 5:
        return "#ff0000"
    if r > threshold:
        return "#d75f00"
    if r > threshold / 2:
        return "#afaf00"
    if r > threshold / 8:
        return "#2e7d32"
    return "#1c3a5e"


def diff_colour(d: float | None, threshold: float) -> str:
    """Background of an |A - B| cell: 0 (dark), below the threshold (greens), over it (reds), fixed scale."""
    if d is None or math.isnan(d):
        return "grey23"
    if d == 0:
        return "#1c1c1c"
    if d > threshold * 100:
        return "#ff0000"
    if d > threshold:
        return "#d75f00"
    if d > threshold / 100:
        return "#5f8700"
    return "#2e5d32"


def heat_colour(w: float) -> str:
    """A background colour for a weight in [0, 1] (dark blue -> yellow), square-root scaled."""
    w = min(max(w, 0.0), 1.0) ** 0.5
    stops = ((0.0, (16, 20, 48)), (0.35, (40, 70, 160)), (0.7, (200, 80, 60)), (1.0, (255, 230, 80)))
    for (p0, c0), (p1, c1) in zip(stops, stops[1:], strict=False):
        if w <= p1:
            t = (w - p0) / (p1 - p0)
            return "#{:02x}{:02x}{:02x}".format(*(round(a + (b - a) * t) for a, b in zip(c0, c1, strict=True)))
    return "#ffe650"
