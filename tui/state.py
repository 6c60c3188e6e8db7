"""What every view is handed on each redraw: the timeline and where the cursor stands on it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tui.navigation import BEGIN, site_layer


@dataclass
class ViewState:
    """A read-only snapshot of the debugger's cursor; views render from it and nothing else."""

    timeline: Any  # LiveSource or TraceSource (the Timeline interface plus ``keys``)
    step: int
    site: str
    event: dict[str, Any] | None
    mode: str  # "live head", "history (read-only)", "replay", "running", "idle", "loading"
    reason: str = ""
    seq_id: int | None = None  # the request chosen for the KV cache and attention views
    head: int = 0  # the attention head chosen for the heatmap
    breakpoints: list[Any] = field(default_factory=list)
    requests: dict[int, dict[str, Any]] = field(default_factory=dict)  # after the previous step
    recording: str | None = None

    @property
    def layer(self) -> int | None:
        return site_layer(self.site)

    @property
    def batch(self) -> dict[str, Any]:
        return (self.event or {}).get("batch") or {}

    @property
    def seqs(self) -> list[dict[str, Any]]:
        return self.batch.get("seqs") or []

    def chosen_seq(self) -> dict[str, Any] | None:
        """The batch entry of the chosen request (the first one if none is chosen or it is not in the batch)."""
        for s in self.seqs:
            if s["seq_id"] == self.seq_id:
                return s
        return self.seqs[0] if self.seqs else None

    @property
    def at_begin(self) -> bool:
        return self.site == BEGIN
