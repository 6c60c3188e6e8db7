"""Requests: every request seen so far with its prompt, state and text; Enter picks one for the other views."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.widgets import DataTable, Static

from ..format import flat, middle, plural, seq_label, tail, user_part
from .base import Choose, View
from .where import seq_role


class RequestsView(View):
    """The long form of the where panel: prompts and generated texts, in the batch or not."""

    TITLE = "requests"

    def compose(self) -> ComposeResult:
        yield DataTable(cursor_type="row", id="requests-table")
        yield Static(classes="view-body")

    def render_view(self) -> Any:
        table = self.query_one(DataTable)
        if self.pos is None:
            return Text("No request has run yet.", style="dim")
        i = self.pos.step
        now = known = self.requests_now()
        in_batch = {s["seq_id"]: s for s in self.step_batch.get("seqs") or []}
        waiting = set(self.step_batch.get("waiting") or [])
        ids = list(dict.fromkeys([*known, *in_batch, *waiting]))
        width = max(self.size.width, 40)
        text_w = max(8, (width - 40) // 2)
        key = (i, self.pos.site, tuple(ids), width)
        if getattr(self, "_filled", None) != key:
            table.clear(columns=True)
            for col in ("request", "state", "tokens", "prompt", "text so far"):
                table.add_column(col, key=col)
            for sid in ids:
                r, k = now.get(sid) or {}, known.get(sid) or {}
                if sid in in_batch:  # a request that ends with this step says so (the header does too)
                    state = Text(seq_role(in_batch[sid]), style="bold")
                    if r.get("finish_reason"):
                        state.append(f" → {r['finish_reason']}", style="dim")
                elif sid in waiting:
                    state = Text("waiting", style="#ffd75f")
                elif r.get("finish_reason"):
                    state = Text(f"finished: {r['finish_reason']}", style="dim")
                else:
                    state = Text("not in this step", style="dim")
                prompt = user_part(self.prompt_of(sid, known))
                table.add_row(seq_label(sid), state, Text(str(len(r.get("token_ids") or [])), justify="right"),
                              Text(middle(prompt, text_w) if prompt else "(prompt not recorded)",
                                   style="italic" if prompt else "dim"),
                              Text(tail(r.get("text") or "", text_w)), key=str(sid))
            self._filled = key
        if self.seq_id in ids:
            table.move_cursor(row=ids.index(self.seq_id), animate=False)
        sid = self.seq_id if self.seq_id in ids else (ids[0] if ids else None)
        if sid is None:
            return Text("No request has run yet.", style="dim")
        r, k = now.get(sid) or {}, known.get(sid) or {}
        out = Text("\n")
        out.append_text(seq_label(sid))
        out.append(f"  {plural(len(r.get('token_ids') or []), 'token')} generated"
                   + (f", finished: {r['finish_reason']}" if r.get("finish_reason") else ""), style="dim")
        out.append("\nprompt: ", style="bold")
        out.append(flat(user_part(self.prompt_of(sid, known))) or "(not recorded)", style="italic")
        if k.get("prompt_token_ids"):
            out.append(f"  ({plural(len(k['prompt_token_ids']), 'prompt token')})", style="dim")
        out.append("\ntext:   ", style="bold")
        out.append(r.get("text") or "")
        return out

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.post_message(Choose(seq_id=int(str(event.row_key.value))))
