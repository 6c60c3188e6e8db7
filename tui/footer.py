"""The footer: Textual's, with help, quit and the palette pinned at the right, so a narrow terminal
never hides them (the other keys show from the left as far as they fit)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import HorizontalGroup
from textual.widgets import Footer
from textual.widgets._footer import FooterKey

PINNED = ("help", "quit", "app.help", "app.quit", "command_palette", "app.command_palette")


class DebugFooter(Footer):
    """Bindings left to right as they fit; ``? help  q quit  ^p palette`` in one group docked right."""

    # styled in app.tcss ("DebugFooter .-pinned"): docked right, so it stays when the rest is cut off

    def __init__(self) -> None:
        super().__init__(show_command_palette=False)

    def compose(self) -> ComposeResult:
        pinned = []
        for widget in super().compose():
            if isinstance(widget, FooterKey) and widget.action in PINNED:
                pinned.append(widget)
            else:
                yield widget
        palette = self.screen.active_bindings.get(self.app.COMMAND_PALETTE_BINDING)
        if palette is not None and not any(w.action == palette[1].action for w in pinned):
            _node, binding, enabled, tooltip = palette
            pinned.append(FooterKey(binding.key, self.app.get_key_display(binding), "palette", binding.action,
                                    disabled=not enabled, tooltip=tooltip or binding.description))
        if pinned:
            yield HorizontalGroup(*pinned, classes="-pinned")
