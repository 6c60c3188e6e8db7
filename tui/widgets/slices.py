"""A window of values of one row (and head) of one or more tensors, side by side, with a marked column.

The inspector and the attention view both show "this row, this head, columns col..col+n" of a few
tensors (active, shadow, difference; or A, B, difference) and mark the column the locator found.
"""

from __future__ import annotations

import torch
from rich.table import Table
from rich.text import Text

from minillama.debug.keys import Locus

from ..format import num


def pick(t: torch.Tensor, row: int, head: int) -> torch.Tensor:
    """Row ``row`` (and head ``head`` of a 3-D tensor) as a 1-D host tensor."""
    x = t[row]
    while x.dim() > 1:
        x = x[min(head, x.shape[0] - 1)]
    return x.detach().cpu()


def window(width: int, col: int, n_cols: int) -> range:
    """The columns shown: ``n_cols`` of them around the chosen column ``col`` (kept inside ``0..width``)."""
    start = max(0, min(col - n_cols // 2, width - n_cols))
    return range(start, min(width, start + n_cols))


def value_table(rows: list[tuple[str, torch.Tensor]], row: int, head: int, col: int, room: int,
                diff_style: str = "bold #ff5f5f") -> Table:
    """One line per named tensor: its values at ``row``/``head`` over a window of columns fitting ``room``
    characters around the chosen column ``col`` (highlighted); a row named ``difference`` is red."""
    width = pick(rows[0][1], row, head).shape[0]
    col = min(max(col, 0), width - 1)
    mark = col
    n_cols = max(2, (room - 12) // 10)
    cols = window(width, col, n_cols)
    t = Table(box=None, pad_edge=False, show_edge=False, header_style="bold", padding=(0, 1))
    t.add_column("", no_wrap=True, min_width=6)
    for c in cols:
        t.add_column(f"[{c}]", justify="right", no_wrap=True, style="bold reverse" if c == mark else "")
    for name, x in rows:
        vals = pick(x, row, head)
        cells = [Text(num(float(vals[c]) if vals.is_floating_point() else int(vals[c]), 3)) for c in cols]
        t.add_row(Text(name, style=diff_style if name == "difference" else "bold"), *cells)
    return t


def locus_line(loc: Locus | None, what: str, who: tuple[str, str], where: str) -> Text:
    """``largest |active - shadow| = 1.9e-03 at request #0, token 36, head 4, dim 17 (0.51 vs 0.5119)``."""
    if loc is None:
        return Text(f"no {what} to locate", style="dim")
    if loc.diff == 0 and who[0] != who[1]:
        return Text(f"{who[0]} and {who[1]} are bit-identical here", style="#5fd75f")
    t = Text(f"largest {what} = ", style="bold")
    t.append(num(loc.diff), style="bold #ff5f5f" if loc.diff > 0 else "bold #5fd75f")
    t.append(f"  at {where}" + (f", head {loc.head}" if loc.head is not None else "") + f", dim {loc.col}")
    t.append(f"  ({who[0]} {num(loc.a)} vs {who[1]} {num(loc.b)})", style="dim")
    return t
