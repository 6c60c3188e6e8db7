"""Recorded traces: a folder of JSON and safetensors that replays, diffs and exports one engine run.

Format: traces/README.md. Write with ``TraceWriter`` (the ``Recorder``'s sink), read with
``TraceReader`` (lazy, no model code, no GPU), compare two traces request by request with
``diff_traces`` (or one trace's shadow records with ``diff_shadow``),
and export to ui.perfetto.dev with ``export_perfetto``.
"""

from minillama.trace.diff import RequestDiff, TraceDiff, TraceMismatchError, diff_traces
from minillama.trace.format import FORMAT_NAME, FORMAT_VERSION, TraceError
from minillama.trace.perfetto import export_perfetto
from minillama.trace.reader import TraceReader
from minillama.trace.shadow_diff import ShadowDiff, diff_shadow
from minillama.trace.writer import TraceWriter

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "RequestDiff",
    "ShadowDiff",
    "TraceDiff",
    "TraceError",
    "TraceMismatchError",
    "TraceReader",
    "TraceWriter",
    "diff_shadow",
    "diff_traces",
    "export_perfetto",
]
