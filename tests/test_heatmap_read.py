"""How the heatmap reads a format-2 trace fast (``TraceReader.step_heads`` / ``step_arrays``) gives what
the full parse gives, falls back to it for anything unexpected, and builds the same map in slices as at once."""

from __future__ import annotations

import json
import mmap
import os
import struct

import numpy as np
import pytest

from minillama.debug.heatmap import BudgetMapper
from minillama.debug.sources import open_trace
from minillama.trace.batch import T_SEQS
from minillama.trace.format import DATA, T_SHADOW, TraceError
from minillama.trace.reader_open import step_heads
from minillama.trace.safetensors_blob import Blob
from tests.tui_pilot import planted

__all__ = ["planted"]  # fixture


def test_step_heads_match_the_full_parse(planted, tmp_path):
    tl = open_trace(planted)
    got = tl.reader.step_heads(list(range(tl.num_steps())))
    assert [(g["step"], g["data"]) for g in got] == [(tl.event(i)["step"], tl.event(i)["data"])
                                                     for i in range(tl.num_steps())]
    other = tmp_path / "other.jsonl"  # another layout ("data" not last, compact separators): the full parse
    other.write_text(json.dumps({"type": "step", "data": [8, 16], "step": 7}, separators=(",", ":")) + "\n"
                     + json.dumps({"type": "step", "step": 9, "data": [1, 2], "x": {"data": [3, 4]}}) + "\n")
    assert step_heads(str(other), [0, len(other.read_text().splitlines()[0]) + 1]) == [
        {"type": "step", "data": [8, 16], "step": 7}, {"type": "step", "step": 9, "data": [1, 2], "x": {"data": [3, 4]}}]


def test_step_arrays_match_blob_and_refuse_damage_in_its_words(planted, tmp_path):
    tl = open_trace(planted)
    with open(os.path.join(planted, DATA), "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    span = tl.event(1)["data"]
    blob = Blob(mm, span[0], span[1], "step 1")
    shadow, seqs, missing = tl.reader.step_arrays(1, (T_SHADOW, T_SEQS, "no.such"))
    assert np.array_equal(shadow, blob.get(T_SHADOW).numpy()) and np.array_equal(seqs, blob.get(T_SEQS).numpy())
    assert missing is None and not shadow.flags.writeable  # a view of the map, not a copy
    (n,) = struct.unpack_from("<Q", mm, span[0])
    header = json.loads(mm[span[0] + 8: span[0] + 8 + n])
    header[T_SHADOW]["data_offsets"][1] += 4  # lies about its size
    raw = json.dumps(header).encode()
    body = mm[span[0] + 8 + n: span[0] + span[1]]
    bad = struct.pack("<Q", len(raw)) + raw + body
    with pytest.raises(TraceError, match="damaged header"):
        Blob(bad, 0, len(bad), "step 1", names=(T_SHADOW,))
    Blob(bad, 0, len(bad), "step 1", names=(T_SEQS,))  # only the tensors read are checked
    with pytest.raises(TraceError, match="outside data.bin"):
        tl.reader.step_arrays(1, (T_SHADOW,), [len(mm) - 4, 8])


def test_a_map_built_in_slices_is_the_map_built_at_once(planted):
    tl = open_trace(planted)
    whole = BudgetMapper(tl).build()
    sliced = BudgetMapper(tl)
    assert sliced.sliceable
    reads = 0
    while sliced.read_slice(2):
        reads += 1
    assert reads == -(-tl.num_steps() // 2) and not sliced.read_slice(2)
    m = sliced.build()
    assert m.index == whole.index and m.steps == whole.steps and m.why == whole.why and m.why
    for name in ("ratio", "over", "diff"):
        assert np.array_equal(getattr(m, name), getattr(whole, name), equal_nan=True), name
