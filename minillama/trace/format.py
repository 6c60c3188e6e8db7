"""The trace format's names and numbers, shared by the writer, the reader and the recorder.

Everything a producer and a consumer must agree on lives here once: file names, the version, the
per-step tables and their fields, and how content-hash lanes become the hash people compare. See
traces/README.md for the prose.
"""

from __future__ import annotations

import numpy as np

#: The ``format`` field of every manifest.json.
FORMAT_NAME = "minillama-trace"
#: The newest format version this package reads and the one it writes (1: JSON statistics per site).
FORMAT_VERSION = 2

MANIFEST = "manifest.json"
EVENTS = "events.jsonl"
TENSOR_DIR = "tensors"  # version 1: one safetensors file per step
DATA = "data.bin"  # version 2: every step's safetensors blob, appended

#: Per (request, site) statistics in the table ``stats.req`` (float32), in this order.
STAT_FIELDS = ("mean", "std", "min", "max")
#: Per (request, layer) shadow-attention metrics in ``shadow.req`` (float32), in this order.
SHADOW_FIELDS = ("diff_max", "diff_sq", "err_active_max", "err_active_sq", "err_shadow_max", "err_shadow_sq",
                 "budget_max", "budget_sq", "ref_absmax")
#: Tensor names of the per-step tables.
T_STATS, T_BAD, T_HASH, T_SHADOW = "stats.req", "stats.bad", "stats.hash", "shadow.req"
#: Sites whose rows are the requests that sample (the others: the batch's new tokens).
SAMPLE_SITES = ("logits", "sampled")

_U = np.uint32


class TraceError(ValueError):
    """A trace folder that cannot be written or read; the message says what is wrong and how to fix it."""



def fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser: a bijection of uint32 that mixes every bit into every other."""
    h = np.asarray(h, dtype=np.uint32)
    h = h ^ (h >> _U(16))
    h = h * _U(0x85EBCA6B)
    h ^= h >> _U(13)
    h *= _U(0xC2B2AE35)
    h ^= h >> _U(16)
    return h


def add_lanes(lanes: np.ndarray) -> np.ndarray:
    """Sum ``(..., 2)`` int32/uint32 hash lanes modulo 2**32 over all leading axes -> (2,) uint32."""
    a = np.asarray(lanes).reshape(-1, 2).astype(np.int64) & 0xFFFFFFFF
    return (a.sum(0) & 0xFFFFFFFF).astype(np.uint32)


def finalize(lanes: np.ndarray, count: int) -> str:
    """The 16-hex-digit content hash of summed lanes over ``count`` elements (equal: bit-identical)."""
    lo, hi = (int(x) for x in np.asarray(lanes, dtype=np.uint64) & np.uint64(0xFFFFFFFF))
    a = int(fmix32(np.array([lo ^ (count & 0xFFFFFFFF)], dtype=np.uint32))[0])
    b = int(fmix32(np.array([(hi + (count >> 32) + 0x632BE5AB) & 0xFFFFFFFF], dtype=np.uint32))[0])
    return f"{a:08x}{b:08x}"
