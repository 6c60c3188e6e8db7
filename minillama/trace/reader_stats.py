"""``TraceReader``'s statistics: the site catalog, per-step tables, per-site statistics, shadow metrics.

Format 2 keeps a step's statistics as integer and float tables in its blob (``stats.req``,
``stats.bad``, ``stats.hash``, ``shadow.req``); the numbers people read are derived from them in
``trace.tables``. Format 1 kept them as JSON in the step line. A mixin: ``TraceReader`` holds the
state and provides ``step``, ``num_steps``, ``_blob`` and ``tensor_keys``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import numpy as np

from minillama.trace import schema
from minillama.trace import tables as _tables
from minillama.trace.format import T_BAD, T_HASH, T_SHADOW, T_STATS


class StepStats:
    """The statistics methods of ``TraceReader``."""

    # set by TraceReader.__init__
    path: str
    manifest: dict[str, Any]
    version: int
    _slot: dict[str, int] | None
    _tables_cache: OrderedDict[int, dict[str, np.ndarray]]

    @property
    def catalog(self) -> list[dict[str, Any]]:
        """Format 2: every tensor site with its trailing ``shape``, ``dtype`` and ``rows`` kind, in firing order."""
        cat = self.manifest.get("sites")
        return cat if isinstance(cat, list) else []

    def _slots(self) -> dict[str, int]:
        if self._slot is None:
            self._slot = {e["name"]: k for k, e in enumerate(self.catalog) if isinstance(e, dict) and "name" in e}
        return self._slot

    def site_names(self, i: int) -> list[str]:
        """Site names recorded at step ``i``, in the order they fired."""
        ev = self.step(i)
        if self.version < 2:
            return list(ev.get("sites", {}))
        missing = set(ev.get("missing_sites") or [])
        return [e["name"] for e in self.catalog if e["name"] not in missing
                and not (e.get("rows") == "samples" and not ev.get("sampled"))]

    def tables(self, i: int) -> dict[str, np.ndarray] | None:
        """Format 2: step ``i``'s statistics tables as numpy arrays (``stats``, ``bad``, ``hash``, ``shadow``)."""
        if self.version < 2:
            return None
        i %= max(self.num_steps, 1)
        if i in self._tables_cache:
            self._tables_cache.move_to_end(i)
            return self._tables_cache[i]
        blob = self._blob(i)
        if blob is None or T_STATS not in blob:
            return None
        get = lambda name: blob.get(name).numpy() if name in blob else None  # noqa: E731
        out = {"stats": get(T_STATS), "bad": get(T_BAD), "hash": get(T_HASH), "shadow": get(T_SHADOW)}
        if out["bad"] is None:
            out["bad"] = np.zeros((0, 4), np.int32)
        seqs = self.step(i)["batch"]["seqs"]
        rows = max(sum(s["num_new"] for s in seqs), sum(1 for s in seqs if s["samples"]))
        schema.check_stat_tables(out, len(self.catalog), len(seqs), rows, f"step {i} of {self.path}")
        self._tables_cache[i] = out
        if len(self._tables_cache) > 16:
            self._tables_cache.popitem(last=False)
        return out

    def _req_index(self, i: int, seq_id: int | None) -> int | None:
        if seq_id is None:
            return None
        for k, s in enumerate(self.step(i).get("batch", {}).get("seqs", [])):
            if int(s.get("seq_id", -1)) == int(seq_id):
                return k
        raise KeyError(f"request {seq_id} is not in step {i}'s batch")

    def stats(self, i: int, site: str, seq_id: int | None = None) -> dict[str, Any] | None:
        """Statistics of ``site`` at step ``i``: of request ``seq_id``, or of the whole batch.

        Keys: shape, dtype, mean, std, min, max, absmax, nan, inf, hash (16 hex digits; equal means
        bit-identical), rows ``[[start, end], ...]``, full. None if the site did not fire. Format 1
        traces have whole-batch statistics only (``seq_id`` gives None there).
        """
        ev = self.step(i)
        if self.version < 2:
            rec = ev.get("sites", {}).get(site)
            return rec if seq_id is None else None
        slot = self._slots().get(site)
        if slot is None or site in (ev.get("missing_sites") or ()) or (
                self.catalog[slot].get("rows") == "samples" and not ev.get("sampled")):
            return None
        tabs = self.tables(i)
        if tabs is None:
            return None
        out = _tables.site_stats(tabs, self.catalog[slot], slot, ev["batch"], self._req_index(i, seq_id))
        out["full"] = site in self.tensor_keys(i)
        return out

    def shadow(self, i: int, seq_id: int | None = None) -> dict[str, Any]:
        """Shadow-attention comparison of step ``i`` per layer (key: the layer index as a string).

        Each record: ``backend``, ``max_abs``/``rms`` (active vs shadow), ``err_active``/``err_shadow``
        (max-abs vs the reference) and their ``_rms``, ``budget``/``budget_rms`` (plain attention's),
        ``budget_ratio*`` (each error over its budget). Format 1 traces keep what they recorded.
        """
        ev = self.step(i)
        if self.version < 2:
            return ev.get("shadow") or {}
        tabs = self.tables(i)
        if tabs is None or tabs.get("shadow") is None:
            return {}
        name = self.manifest.get("shadow")
        slot = self._slots().get("layers.0.attn.out")
        per_row = math.prod(self.catalog[slot]["shape"]) if slot is not None else 1
        req = self._req_index(i, seq_id)
        dtype = str(self.manifest.get("dtype", "float32"))
        out = {}
        for layer in range(tabs["shadow"].shape[1]):
            rec = _tables.layer_metrics(tabs["shadow"], ev["batch"], layer, per_row, dtype,
                                        name not in (None, "reference"), req)
            if rec:
                out[str(layer)] = {"backend": name, **rec}
        return out
