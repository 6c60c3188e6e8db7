"""The base of every view: a scrollable panel that renders a ``ViewState`` into one ``Static``."""

from __future__ import annotations

from rich.console import RenderableType
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import Static

from tui.state import ViewState


class TimelineView(VerticalScroll):
    """Subclasses implement ``render_state``; the app calls ``show`` when the cursor moves."""

    TITLE = "view"

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.state: ViewState | None = None
        self.border_title = self.TITLE
        self._height: int | None = None
        self._width = 0

    def compose(self) -> ComposeResult:
        yield Static(classes="view-body")

    @property
    def width(self) -> int:
        """Usable columns (a sensible default before the first layout)."""
        return max(self.scrollable_content_region.width, 40) if self.size.width else 80

    def show(self, state: ViewState) -> None:
        """Redraw from ``state`` (nothing when hidden: the view redraws when shown).

        A layout pass of the whole screen costs more than everything else in a redraw, so it is
        asked for only when the content's height changes (counted by rendering it at the body's width).
        """
        self.state = state
        if not self.display:
            return
        renderable = self.render_state(state)
        body = self.query_one(".view-body", Static)
        width = body.content_region.width
        height = None
        if width > 0:
            console = self.app.console
            height = len(console.render_lines(renderable, console.options.update(width=width, height=None),
                                              pad=False, new_lines=False))
        layout = height is None or height != self._height or width != self._width
        self._height, self._width = height, width
        body.update(renderable, layout=layout)

    def on_resize(self) -> None:
        self._height = None
        if self.state is not None:
            self.show(self.state)

    def render_state(self, state: ViewState) -> RenderableType:
        raise NotImplementedError
