"""The one gate: every manifest and step event is checked against the format's types when it is read.

A trace from a stranger may hold well-formed JSON of the wrong shape (a string where an object
belongs, huge numbers, NaN counts). Readers check each record once here, so every consumer (CLI,
diff, TUI, Perfetto) sees valid data or one ``TraceError`` naming the field. Numbers a file claims
are bounded (layers, blocks, shapes, lengths), so no claim can make a view allocate without end.
"""

from __future__ import annotations

import math
from typing import Any

from minillama.trace.format import TraceError

#: Upper bounds of what a trace may claim (far above any real model or run).
MAX_LAYERS, MAX_BLOCKS, MAX_DIM, MAX_IDS = 4096, 1 << 24, 1 << 22, 1 << 24
SITE_DTYPES = {"float32", "float16", "bfloat16", "float64", "int64", "int32"}


def _fail(where: str, field: str, want: str, got: Any) -> TraceError:
    shown = type(got).__name__ if not isinstance(got, int | float | str) else repr(got)[:40]
    return TraceError(f"{where}: field {field!r} must be {want} (got {shown}): the trace is damaged or foreign; "
                      "record it again")


def _int(v: Any, where: str, field: str, lo: int = 0, hi: int = 1 << 62) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise _fail(where, field, f"an integer in [{lo}, {hi}]", v)
    return v


def _num(v: Any, where: str, field: str) -> float:
    if not isinstance(v, int | float) or isinstance(v, bool):
        raise _fail(where, field, "a number", v)
    return float(v)


def _str(v: Any, where: str, field: str, none: bool = False) -> str | None:
    if v is None and none:
        return None
    if not isinstance(v, str):
        raise _fail(where, field, "text", v)
    return v


def _ids(v: Any, where: str, field: str) -> list[int]:
    if not isinstance(v, list) or len(v) > MAX_IDS:
        raise _fail(where, field, "a list of token ids", v)
    for t in v:
        _int(t, where, field, 0, 1 << 31)
    return v


def _obj(v: Any, where: str, field: str, none: bool = False) -> dict | None:
    if v is None and none:
        return None
    if not isinstance(v, dict):
        raise _fail(where, field, "an object", v)
    return v


def check_manifest(m: dict[str, Any], where: str) -> None:
    """Types and bounds of the manifest fields readers use (``format``/``version`` are checked before)."""
    if isinstance(m.get("model"), str):  # a bare name: what it means
        m["model"] = {"name": m["model"]}
    model = _obj(m.get("model"), where, "model", none=True) or {}
    for key in ("name", "path", "format"):
        if model.get(key) is not None:
            _str(model[key], where, f"model.{key}")
    for key in ("sampling", "recording", "versions", "engine_config"):
        _obj(m.get(key), where, key, none=True)
    cfg = _obj(m.get("model_config"), where, "model_config", none=True) or {}
    for key in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size", "head_dim",
                "vocab_size"):
        if key in cfg:
            _int(cfg[key], where, f"model_config.{key}", 0, MAX_DIM if key != "num_hidden_layers" else MAX_LAYERS)
    reqs = m.get("requests")
    if reqs is not None and not isinstance(reqs, list):
        raise _fail(where, "requests", "a list", reqs)
    for k, r in enumerate(reqs or []):
        r = _obj(r, where, f"requests[{k}]")
        _int(r.get("seq_id"), where, f"requests[{k}].seq_id")
        if r.get("prompt") is not None and not isinstance(r["prompt"], str | list):
            raise _fail(where, f"requests[{k}].prompt", "text", r["prompt"])
        if r.get("prompt_token_ids") is not None:
            _ids(r["prompt_token_ids"], where, f"requests[{k}].prompt_token_ids")
    for key in ("backend", "dtype", "device", "created"):
        _str(m.get(key), where, key, none=True)
    _str(m.get("shadow"), where, "shadow", none=True)
    _int(m.get("num_kvcache_blocks", 0) or 0, where, "num_kvcache_blocks", 0, MAX_BLOCKS)
    sites = m.get("sites")
    if sites is not None:
        if not isinstance(sites, list) or len(sites) > 64 * MAX_LAYERS:
            raise _fail(where, "sites", "a list of sites", sites)
        for k, s in enumerate(sites):
            s = _obj(s, where, f"sites[{k}]")
            _str(s.get("name"), where, f"sites[{k}].name")
            shape = s.get("shape")
            if not isinstance(shape, list) or len(shape) > 4 or math.prod(_int(d, where, f"sites[{k}].shape", 0,
                                                                              MAX_DIM) for d in shape) > 1 << 31:
                raise _fail(where, f"sites[{k}].shape", "a short list of sizes", shape)
            if s.get("dtype") not in SITE_DTYPES or s.get("rows") not in ("tokens", "samples"):
                raise _fail(where, f"sites[{k}]", "a site with a known dtype and rows", s.get("dtype"))


def check_step(ev: dict[str, Any], where: str, version: int) -> None:
    """Types and bounds of one step event's fields."""
    _int(ev.get("step", 0), where, "step")
    _str(ev.get("phase", "?"), where, "phase")
    for key in ("sampled", "pieces", "prompts", "kv", "texts", "token_ids", "shadow", "sites"):
        _obj(ev.get(key), where, key, none=True)
    for key in ("sampled", "pieces", "prompts", "texts", "token_ids"):
        for sid in ev.get(key) or {}:
            if not (isinstance(sid, str) and sid.isdecimal() and len(sid) < 19):
                raise _fail(where, key, "keys that are sequence ids", sid)
    for sid, tok in (ev.get("sampled") or {}).items():
        _int(tok, where, f"sampled[{sid}]", 0, 1 << 31)
    for sid, piece in (ev.get("pieces") or {}).items():
        _str(piece, where, f"pieces[{sid}]")
    for sid, p in (ev.get("prompts") or {}).items():
        p = _obj(p, where, f"prompts[{sid}]")
        _ids(p.get("token_ids", []), where, f"prompts[{sid}].token_ids")
        _ids(p.get("generated") or [], where, f"prompts[{sid}].generated")
        _str(p.get("text", ""), where, f"prompts[{sid}].text")
        _str(p.get("text_so_far", ""), where, f"prompts[{sid}].text_so_far")
    finished = ev.get("finished") or []
    if not isinstance(finished, list):
        raise _fail(where, "finished", "a list", finished)
    for f in finished:
        if not (isinstance(f, list) and len(f) == 2):
            raise _fail(where, "finished", "[seq_id, reason] pairs", f)
        _int(f[0], where, "finished", 0)
        _str(f[1], where, "finished", none=True)
    for key, kind in (("missing_sites", str), ("preempted", int), ("waiting", int)):
        v = ev.get(key) or []
        if not isinstance(v, list) or len(v) > MAX_IDS or not all(isinstance(x, kind) for x in v):
            raise _fail(where, key, f"a list of {kind.__name__}", v)
    for key, v in (ev.get("kv") or {}).items():
        if v is not None:
            _int(v, where, f"kv.{key}", 0, MAX_BLOCKS * 4096 if "tokens" in key else MAX_BLOCKS)
    if "data" in ev:
        d = ev["data"]
        if not (isinstance(d, list) and len(d) == 2):
            raise _fail(where, "data", "[offset, length]", d)
        _int(d[0], where, "data")
        _int(d[1], where, "data")
    _str(ev.get("tensor_file"), where, "tensor_file", none=True)
    for key in ("elapsed_ms",):
        if key in ev:
            _num(ev[key], where, key)
    if version < 2:
        _check_v1(ev, where)


def _check_v1(ev: dict[str, Any], where: str) -> None:
    batch = _obj(ev.get("batch", {}), where, "batch")
    for k, s in enumerate(batch.get("seqs", [])):
        s = _obj(s, where, f"batch.seqs[{k}]")
        for key in ("seq_id", "num_new", "num_computed", "prompt_len", "len"):
            if key in s:
                _int(s[key], where, f"batch.seqs[{k}].{key}", 0, MAX_IDS)
        _ids(s.get("block_table", []), where, f"batch.seqs[{k}].block_table")
    for key in ("num_blocks", "block_size", "num_free_blocks"):
        if batch.get(key) is not None:
            _int(batch[key], where, f"batch.{key}", 0, MAX_BLOCKS)
    for name, rec in (ev.get("sites") or {}).items():
        rec = _obj(rec, where, f"sites[{name}]")
        if "shape" in rec and not (isinstance(rec["shape"], list) and all(isinstance(d, int) for d in rec["shape"])):
            raise _fail(where, f"sites[{name}].shape", "a list of sizes", rec["shape"])
    for layer, rec in (ev.get("shadow") or {}).items():
        rec = _obj(rec, where, f"shadow[{layer}]")
        for key, v in rec.items():
            if key != "backend" and v is not None:
                _num(v, where, f"shadow[{layer}].{key}")


def check_batch_tables(seqs: Any, tables: Any, blocks: Any, kv: dict[str, Any], where: str) -> None:
    """Format 2's batch tables: shapes, and ids and counts within what the step says it holds."""
    import numpy as np

    if seqs.ndim != 2 or seqs.shape[1] != 8 or tables.ndim != 2 or tables.shape[0] != seqs.shape[0] \
            or blocks.ndim != 2 or blocks.shape[1] != 3:
        raise TraceError(f"{where}: its batch tables have the wrong shapes: the trace is damaged; record it again")
    num_blocks = kv.get("num_blocks") or MAX_BLOCKS
    if len(seqs) and (seqs[:, :7].min() < 0 or seqs[:, 1:6].max() > MAX_IDS):
        raise TraceError(f"{where}: its batch table holds impossible lengths: the trace is damaged; record it again")
    if (tables.size and (tables.max() >= num_blocks or tables.min() < -1)) or \
            (blocks.size and (blocks[:, 0].max() >= num_blocks or blocks.min() < 0)) or \
            not np.issubdtype(tables.dtype, np.integer):
        raise TraceError(f"{where}: its block tables name blocks outside the cache ({num_blocks} blocks): the trace "
                         "is damaged; record it again")


def check_stat_tables(t: dict[str, Any], num_sites: int, num_reqs: int, num_rows: int, where: str) -> None:
    """Format 2's statistics tables against the catalog and the batch (``num_rows``: rows its sites have)."""
    ok = (t["stats"] is not None and t["stats"].shape == (num_reqs, num_sites, 4) and t["bad"].ndim == 2
          and t["bad"].shape[1] == 4 and t["hash"] is not None and t["hash"].ndim == 3
          and t["hash"].shape[1:] == (num_sites, 2) and t["hash"].shape[0] >= num_rows
          and (t["shadow"] is None or (t["shadow"].ndim == 3 and t["shadow"].shape[0] == num_reqs
                                       and t["shadow"].shape[1] <= MAX_LAYERS)))
    if ok and len(t["bad"]):
        ok = bool((t["bad"][:, 0] < num_sites).all() and (t["bad"][:, 1] < num_reqs).all() and (t["bad"] >= 0).all())
    if not ok:
        raise TraceError(f"{where}: its statistics tables do not match its sites and batch: the trace is damaged; "
                         "record it again")
