"""Statistics and content hashes of one hook site, per request, computed where the tensor lives.

For a site tensor viewed as ``(rows, width)`` (one row per token of the flat batch, or per sampling
request for ``logits`` / ``sampled``) and ``seq_index[row]`` (which request of the batch the row
belongs to), this computes per request: the sum and the sum of squares of the finite values (in
float64), their min and max, the NaN and Inf counts; and per row a 64-bit content hash in two
32-bit lanes. Results go into a ``StatsBuffer``'s tables (``stepbuf.py``); nothing is read back.

The hash, defined here once (``row_lanes_np`` is the definition, the Triton kernel computes the
same bits): each element's raw bits ``w`` (float32/int32 as is, 16-bit types zero-extended, 8-bit
types likewise, float64 as two 32-bit words) is mixed with a key made from its column and its
row's token position in the sequence, ``t = fmix32(w ^ (colkey[col] + rowkey[pos]))``; a row's
lanes are ``sum(t)`` and ``sum(g(t))`` modulo 2**32 with ``g`` a second, non-linear mix. Because
``t`` is a bijection of ``w`` for a fixed place, changing any one element changes both lanes; and
because lanes add, a request's hash over several rows (or several prefill chunks, in any order) is
the sum of its rows' lanes, so two traces that chunked a prompt differently still compare.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from minillama.layers.triton_launch import FastLaunch
from minillama.trace.format import fmix32

try:  # absent on CPU-only installs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None

_U = np.uint32
K_COL, K_ROW, SEED, M3 = _U(0x9E3779B9), _U(0x7FEB352D), _U(0x165667B1), _U(0x27D4EB2F)
#: Order-preserving int32 keys of float32 values: the tables' initial min and max.
KEY_MIN_INIT, KEY_MAX_INIT = 2**31 - 1, -(2**31)


@lru_cache(maxsize=64)
def _colkey(width: int) -> np.ndarray:
    return fmix32(np.arange(width, dtype=np.uint32) * K_COL)


def words_np(x: torch.Tensor) -> np.ndarray:
    """The raw bits of a CPU tensor as ``(rows, words)`` uint32 (the hash's input)."""
    x = x.detach().reshape(x.shape[0], -1) if x.dim() else x.detach().reshape(1, 1)
    size = x.element_size()
    if x.dtype == torch.int64:  # token ids: hashed as int32 (the GPU kernel does the same)
        x = x.to(torch.int32)
        size = 4
    if size == 4:
        return x.contiguous().view(torch.int32).numpy().view(np.uint32)
    if size == 2:
        return x.contiguous().view(torch.int16).numpy().view(np.uint16).astype(np.uint32)
    if size == 1:
        return x.contiguous().view(torch.uint8).numpy().astype(np.uint32)
    return x.contiguous().view(torch.int32).numpy().view(np.uint32)  # 8-byte floats: two words each


def row_lanes_np(words: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """The definition of the hash: ``(rows, 2)`` uint32 lanes of ``words`` at token positions ``pos``."""
    rowkey = fmix32(pos.astype(np.uint32) * K_ROW + SEED)
    t = fmix32(words ^ (_colkey(words.shape[1])[None, :] + rowkey[:, None]))
    u = (t ^ (t >> _U(15))) * M3
    return np.stack([t.sum(1, dtype=np.uint32), u.sum(1, dtype=np.uint32)], axis=1)


def float_keys_np(f: np.ndarray) -> np.ndarray:
    """Order-preserving int32 keys of float32 values (``key(a) < key(b)`` iff ``a < b``)."""
    i = np.ascontiguousarray(f, dtype=np.float32).view(np.int32)
    return np.where(i >= 0, i, i ^ np.int32(0x7FFFFFFF))


# ---- CPU: numpy on the tensor's own memory --------------------------------------------------------
def site_stats_cpu(x: torch.Tensor, slot: int, seq_index: np.ndarray, pos: np.ndarray, moments: np.ndarray,
                   keys: np.ndarray, bad: np.ndarray, lanes: np.ndarray) -> None:
    """Fill ``slot`` of the tables for a CPU tensor. ``seq_index`` is sorted (requests are contiguous)."""
    rows = x.shape[0] if x.dim() else 1
    lanes[:rows, slot] = row_lanes_np(words_np(x), pos).view(np.int32)
    f = x.detach().reshape(rows, -1)
    f = (f if f.dtype == torch.float32 else f.float()).numpy()
    finite = np.isfinite(f)
    if finite.all():
        s, ss = f.sum(1, dtype=np.float64), np.square(f, dtype=np.float64).sum(1)
        lo, hi = f.min(1), f.max(1)
        nan = inf = None
    else:
        z = np.where(finite, f, 0)
        s, ss = z.sum(1, dtype=np.float64), np.square(z, dtype=np.float64).sum(1)
        lo, hi = np.where(finite, f, np.inf).min(1), np.where(finite, f, -np.inf).max(1)
        nan, inf = np.isnan(f).sum(1), np.isinf(f).sum(1)
    if rows > 1 and not (seq_index[1:] != seq_index[:-1]).all():  # several rows per request: reduce
        starts = np.flatnonzero(np.r_[True, seq_index[1:] != seq_index[:-1]])
        s, ss = np.add.reduceat(s, starts), np.add.reduceat(ss, starts)
        lo, hi = np.minimum.reduceat(lo, starts), np.maximum.reduceat(hi, starts)
        if nan is not None:
            nan, inf = np.add.reduceat(nan, starts), np.add.reduceat(inf, starts)
        req = seq_index[starts]
    else:
        req = seq_index[:rows]
    moments[req, slot, 0], moments[req, slot, 1] = s, ss
    keys[req, slot, 0], keys[req, slot, 1] = float_keys_np(lo), float_keys_np(hi)
    if nan is not None:
        bad[req, slot, 0], bad[req, slot, 1] = nan, inf


def sites_stats_cpu(items: list[tuple[torch.Tensor, int]], seq_index: np.ndarray, pos: np.ndarray,
                    moments: np.ndarray, keys: np.ndarray, bad: np.ndarray, lanes: np.ndarray) -> None:
    """``site_stats_cpu`` for several sites at once: tensors of one shape and dtype with the same rows
    (a decode step's many small sites), in a few numpy calls instead of a few per site."""
    if len(items) == 1:
        x, slot = items[0]
        site_stats_cpu(x, slot, seq_index, pos, moments, keys, bad, lanes)
        return
    slots = np.array([slot for _, slot in items])
    x = torch.stack([t.detach().reshape(t.shape[0], -1) for t, _ in items])  # (k, rows, width)
    k, rows, width = x.shape
    ln = row_lanes_np(words_np(x.reshape(k * rows, width)), np.tile(pos[:rows], k)).view(np.int32)
    lanes[:rows, slots] = ln.reshape(k, rows, 2).transpose(1, 0, 2)
    f = (x if x.dtype == torch.float32 else x.float()).numpy()
    finite = np.isfinite(f)
    nan = inf = None
    if finite.all():
        s, ss = f.sum(2, dtype=np.float64), np.square(f, dtype=np.float64).sum(2)  # (k, rows)
        lo, hi = f.min(2), f.max(2)
    else:
        z = np.where(finite, f, 0)
        s, ss = z.sum(2, dtype=np.float64), np.square(z, dtype=np.float64).sum(2)
        lo, hi = np.where(finite, f, np.inf).min(2), np.where(finite, f, -np.inf).max(2)
        nan, inf = np.isnan(f).sum(2), np.isinf(f).sum(2)
    seq = seq_index[:rows]
    if rows > 1 and not (seq[1:] != seq[:-1]).all():  # several rows per request: reduce
        starts = np.flatnonzero(np.r_[True, seq[1:] != seq[:-1]])
        s, ss = np.add.reduceat(s, starts, 1), np.add.reduceat(ss, starts, 1)
        lo, hi = np.minimum.reduceat(lo, starts, 1), np.maximum.reduceat(hi, starts, 1)
        if nan is not None:
            nan, inf = np.add.reduceat(nan, starts, 1), np.add.reduceat(inf, starts, 1)
        req = seq[starts]
    else:
        req = seq
    at = np.ix_(req, slots)
    moments[at + (0,)], moments[at + (1,)] = s.T, ss.T
    keys[at + (0,)], keys[at + (1,)] = float_keys_np(lo).T, float_keys_np(hi).T
    if nan is not None:
        bad[at + (0,)], bad[at + (1,)] = nan.T, inf.T


# ---- CUDA: one Triton kernel per site, writing the tables on the device -------------------------------
if triton is not None:

    @triton.jit
    def _fmix(h):
        h ^= h >> 16
        h *= 0x85EBCA6B
        h ^= h >> 13
        h *= 0xC2B2AE35
        h ^= h >> 16
        return h

    @triton.jit
    def _row(X, width, rowkey, WORD16: tl.constexpr, BLOCK: tl.constexpr):
        """Hash lanes and moments of one row at ``X`` (``width`` elements)."""
        s = tl.zeros([BLOCK], tl.float32)
        ss = tl.zeros([BLOCK], tl.float32)
        lo = tl.full([BLOCK], float("inf"), tl.float32)
        hi = tl.full([BLOCK], float("-inf"), tl.float32)
        n_nan = tl.zeros([BLOCK], tl.int32)
        n_inf = tl.zeros([BLOCK], tl.int32)
        l1 = tl.zeros([BLOCK], tl.uint32)
        l2 = tl.zeros([BLOCK], tl.uint32)
        for start in range(0, width, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            ok = cols < width
            x = tl.load(X + cols, mask=ok, other=0)
            if WORD16:
                w = x.to(tl.int16, bitcast=True).to(tl.int32).to(tl.uint32) & 0xFFFF
            else:
                w = x.to(tl.int32, bitcast=True).to(tl.uint32)
            t = _fmix(w ^ (_fmix(cols.to(tl.uint32) * 0x9E3779B9) + rowkey))
            l1 += tl.where(ok, t, 0)
            l2 += tl.where(ok, (t ^ (t >> 15)) * 0x27D4EB2F, 0)
            f = x.to(tl.float32)
            isnan = f != f
            isinf = (f == float("inf")) | (f == float("-inf"))
            fin = ok & ~isnan & ~isinf
            z = tl.where(fin, f, 0.0)
            s += z
            ss += z * z
            lo = tl.minimum(lo, tl.where(fin, f, float("inf")))
            hi = tl.maximum(hi, tl.where(fin, f, float("-inf")))
            n_nan += (ok & isnan).to(tl.int32)
            n_inf += (ok & isinf).to(tl.int32)
        return (tl.sum(l1, 0), tl.sum(l2, 0), tl.sum(s.to(tl.float64), 0), tl.sum(ss.to(tl.float64), 0),
                tl.min(lo, 0), tl.max(hi, 0), tl.sum(n_nan, 0), tl.sum(n_inf, 0))

    @triton.jit
    def _put(row, req, slot, l1, l2, s, ss, lo, hi, n_nan, n_inf, MOM, mom_stride, KEYS, keys_stride, BAD,
             bad_stride, LANES, lanes_stride):
        """A row's results into the tables: its lanes stored, its request's moments and keys combined."""
        lane = LANES + row.to(tl.int64) * lanes_stride + slot * 2
        tl.store(lane, l1.to(tl.int32, bitcast=True))
        tl.store(lane + 1, l2.to(tl.int32, bitcast=True))
        mom = MOM + req * mom_stride + slot * 2
        tl.atomic_add(mom, s)
        tl.atomic_add(mom + 1, ss)
        lo_i = lo.to(tl.int32, bitcast=True)
        hi_i = hi.to(tl.int32, bitcast=True)
        key = KEYS + req * keys_stride + slot * 2
        tl.atomic_min(key, tl.where(lo_i >= 0, lo_i, lo_i ^ 0x7FFFFFFF))
        tl.atomic_max(key + 1, tl.where(hi_i >= 0, hi_i, hi_i ^ 0x7FFFFFFF))
        if n_nan + n_inf > 0:
            bad = BAD + req * bad_stride + slot * 2
            tl.atomic_add(bad, n_nan)
            tl.atomic_add(bad + 1, n_inf)

    @triton.jit
    def _site_kernel(X, stride, width, SEQ, POS, MOM, mom_stride, KEYS, keys_stride, BAD, bad_stride, LANES,
                     lanes_stride, slot, WORD16: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        req = tl.load(SEQ + row).to(tl.int64)
        rowkey = _fmix(tl.load(POS + row).to(tl.uint32) * 0x7FEB352D + 0x165667B1)
        l1, l2, s, ss, lo, hi, n_nan, n_inf = _row(X + row.to(tl.int64) * stride, width, rowkey, WORD16, BLOCK)
        _put(row, req, slot, l1, l2, s, ss, lo, hi, n_nan, n_inf, MOM, mom_stride, KEYS, keys_stride, BAD, bad_stride,
             LANES, lanes_stride)

    @triton.jit
    def _sites_kernel(SITES, SEQ, POS, MOM, mom_stride, KEYS, keys_stride, BAD, bad_stride, LANES, lanes_stride,
                      DT: tl.constexpr, BLOCK: tl.constexpr):
        """Many sites of one dtype at once: ``SITES[k] = (address, row stride, width, slot)``; grid (rows, k)."""
        row, k = tl.program_id(0), tl.program_id(1)
        entry = SITES + k * 4
        stride, width, slot = tl.load(entry + 1), tl.load(entry + 2), tl.load(entry + 3)
        if DT == 0:
            X = tl.load(entry).to(tl.pointer_type(tl.bfloat16))
        elif DT == 1:
            X = tl.load(entry).to(tl.pointer_type(tl.float16))
        else:
            X = tl.load(entry).to(tl.pointer_type(tl.float32))
        req = tl.load(SEQ + row).to(tl.int64)
        rowkey = _fmix(tl.load(POS + row).to(tl.uint32) * 0x7FEB352D + 0x165667B1)
        l1, l2, s, ss, lo, hi, n_nan, n_inf = _row(X + row.to(tl.int64) * stride, width, rowkey, DT < 2, BLOCK)
        _put(row, req, slot, l1, l2, s, ss, lo, hi, n_nan, n_inf, MOM, mom_stride, KEYS, keys_stride, BAD, bad_stride,
             LANES, lanes_stride)

    @triton.jit
    def _key_float(k):
        """The float32 value of an order-preserving key (``float_keys_np``); NaN for the initial keys."""
        f = tl.where(k >= 0, k, k ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)
        return tl.where((k == 2147483647) | (k == -2147483648), float("nan"), f)

    @triton.jit
    def _finish_kernel(MOM, KEYS, BAD, SHADOW, OMOM, OKEYS, OBAD, OSHADOW, OUT, row_words, num_shadow, COUNTS,
                       PER_SAMPLE, WIDTH, num_sites, num_reqs, POS, LANES, lanes_stride, X1, stride1, width1, slot1,
                       X2, stride2, width2, slot2, ONES: tl.constexpr, RESET: tl.constexpr, BLOCK: tl.constexpr,
                       TAIL: tl.constexpr, W16_1: tl.constexpr, BT1: tl.constexpr, W16_2: tl.constexpr,
                       BT2: tl.constexpr):
        """``stepbuf.stats_table`` for request ``program_id(0)``, all its sites (float64 arithmetic), into
        the finished table (``O*``: the raw sums copied beside the statistics ``OUT``). ``RESET``: the
        accumulating row is cleared behind the copy (each thread its own elements, so no barrier), and
        programs past ``num_reqs`` only clear. ``ONES``: every request has one new token and samples it
        (a decode step: no counts are read). Pointers are typed views of the tables' int64 rows of
        ``row_words`` words.

        ``TAIL`` (0-2, decode steps only): the step's last sites (its sampling sites, row ``r`` of each
        being request ``r``'s, at ``POS[r]``) are computed here first, as ``_site_kernel`` would, which
        saves their launches; a barrier then orders their sums before this program reads them."""
        r = tl.program_id(0).to(tl.int64)
        mom = MOM + r * row_words
        keys = KEYS + r * 2 * row_words
        bad = BAD + r * 2 * row_words
        shadow = SHADOW + r * 2 * row_words
        if TAIL > 0:
            if r < num_reqs:
                rowkey = _fmix(tl.load(POS + r).to(tl.uint32) * 0x7FEB352D + 0x165667B1)
                l1, l2, s, ss, lo, hi, n_nan, n_inf = _row(X1 + r * stride1, width1, rowkey, W16_1, BT1)
                _put(r, r, slot1, l1, l2, s, ss, lo, hi, n_nan, n_inf, MOM, row_words, KEYS, 2 * row_words, BAD,
                     2 * row_words, LANES, lanes_stride)
                if TAIL > 1:
                    l1, l2, s, ss, lo, hi, n_nan, n_inf = _row(X2 + r * stride2, width2, rowkey, W16_2, BT2)
                    _put(r, r, slot2, l1, l2, s, ss, lo, hi, n_nan, n_inf, MOM, row_words, KEYS, 2 * row_words,
                         BAD, 2 * row_words, LANES, lanes_stride)
            tl.debug_barrier()  # (outside the branch: every thread of the program reaches it)
        if r < num_reqs:
            if ONES:
                tok = 1.0
                smp = 1.0
            else:
                tok = tl.load(COUNTS + 2 * r).to(tl.float64)
                smp = tl.load(COUNTS + 2 * r + 1).to(tl.float64)
            for start in range(0, num_sites, BLOCK):
                j = start + tl.arange(0, BLOCK)
                ok = j < num_sites
                s = tl.load(mom + 2 * j, mask=ok, other=0.0)
                ss = tl.load(mom + 2 * j + 1, mask=ok, other=0.0)
                k0 = tl.load(keys + 2 * j, mask=ok, other=0)
                k1 = tl.load(keys + 2 * j + 1, mask=ok, other=0)
                b0 = tl.load(bad + 2 * j, mask=ok, other=0)
                b1 = tl.load(bad + 2 * j + 1, mask=ok, other=0)
                per = tl.load(PER_SAMPLE + j, mask=ok, other=0)
                n = tl.where(per != 0, smp, tok) * tl.load(WIDTH + j, mask=ok, other=1.0) - (b0 + b1).to(tl.float64)
                mean = s / n
                var = tl.maximum(ss - s * mean, 0.0) / tl.maximum(n - 1.0, 1.0)
                std = tl.where(n > 1.0, tl.sqrt(var), tl.where(n == 1.0, 0.0, float("nan")))
                none = n == 0.0
                out = OUT + r * 2 * row_words + 4 * j
                tl.store(out, mean.to(tl.float32), mask=ok)
                tl.store(out + 1, std.to(tl.float32), mask=ok)
                tl.store(out + 2, tl.where(none, float("nan"), _key_float(k0)), mask=ok)
                tl.store(out + 3, tl.where(none, float("nan"), _key_float(k1)), mask=ok)
                tl.store(OMOM + r * row_words + 2 * j, s, mask=ok)
                tl.store(OMOM + r * row_words + 2 * j + 1, ss, mask=ok)
                tl.store(OKEYS + r * 2 * row_words + 2 * j, k0, mask=ok)
                tl.store(OKEYS + r * 2 * row_words + 2 * j + 1, k1, mask=ok)
                tl.store(OBAD + r * 2 * row_words + 2 * j, b0, mask=ok)
                tl.store(OBAD + r * 2 * row_words + 2 * j + 1, b1, mask=ok)
                if RESET:
                    _clear(mom, keys, bad, j, ok)
            for start in range(0, num_shadow, BLOCK):
                j = start + tl.arange(0, BLOCK)
                ok = j < num_shadow
                tl.store(OSHADOW + r * 2 * row_words + j, tl.load(shadow + j, mask=ok, other=0.0), mask=ok)
                if RESET:
                    tl.store(shadow + j, 0.0, mask=ok)
        elif RESET:
            for start in range(0, num_sites, BLOCK):
                j = start + tl.arange(0, BLOCK)
                _clear(mom, keys, bad, j, j < num_sites)
            for start in range(0, num_shadow, BLOCK):
                j = start + tl.arange(0, BLOCK)
                tl.store(shadow + j, 0.0, mask=j < num_shadow)

    @triton.jit
    def _clear(mom, keys, bad, j, ok):
        """One request row's sums back to their initial values (``StatsBuffer``'s template row)."""
        tl.store(mom + 2 * j, 0.0, mask=ok)
        tl.store(mom + 2 * j + 1, 0.0, mask=ok)
        tl.store(keys + 2 * j, 2147483647, mask=ok)
        tl.store(keys + 2 * j + 1, -2147483648, mask=ok)
        tl.store(bad + 2 * j, 0, mask=ok)
        tl.store(bad + 2 * j + 1, 0, mask=ok)

    _launch_site = FastLaunch(_site_kernel)
    _launch_sites = FastLaunch(_sites_kernel)
    _launch_finish = FastLaunch(_finish_kernel)


#: dtype codes of ``_sites_kernel``
BATCHED_DTYPES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}


def triton_covers(x: torch.Tensor) -> bool:
    """True when the Triton kernel computes this CUDA tensor's statistics (16/32-bit types)."""
    return triton is not None and x.is_cuda and x.element_size() in (2, 4) and x.dtype != torch.int16


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host ``values`` (a list or an array) as a tensor on ``device``; on CUDA copied from pinned memory
    without waiting (the pinned block is not reused before the copy has run)."""
    host = torch.as_tensor(values, dtype=dtype)
    return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host


def rows_view(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``(rows, width)`` with unit column stride (a copy only when the layout needs one)."""
    rows = x.shape[0] if x.dim() else 1
    x2 = x.reshape(rows, -1)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def sites_stats_cuda(table: torch.Tensor, num_sites: int, rows: int, dtype: torch.dtype, seq_index: torch.Tensor,
                     pos: torch.Tensor, moments: torch.Tensor, keys: torch.Tensor, bad: torch.Tensor,
                     lanes: torch.Tensor) -> None:
    """One launch for ``num_sites`` sites of one dtype listed in ``table`` ((n, 4) int64 on the device:
    address, row stride, width, slot), each with ``rows`` rows (a decode graph's sites)."""
    _launch_sites((rows, num_sites), (table, seq_index, pos, moments, moments.stride(0), keys, keys.stride(0), bad,
                                      bad.stride(0), lanes, lanes.stride(0)), (BATCHED_DTYPES[dtype], 512))


def site_stats_cuda(x: torch.Tensor, slot: int, seq_index: torch.Tensor, pos: torch.Tensor, moments: torch.Tensor,
                    keys: torch.Tensor, bad: torch.Tensor, lanes: torch.Tensor) -> None:
    """Launch the kernel for a CUDA tensor: one program per row, atomics into its request's entries."""
    x2 = rows_view(x)
    rows, width = x2.shape
    # at most 512, as the batched kernel: a 4,096 block keeps 8 accumulators x 32 values per thread
    # (1B's 8,192-wide MLP rows); rows 512 wide or more then get the same float sums eagerly as graphed
    block = min(512, max(128, triton.next_power_of_2(width)))
    _launch_site((rows,), (x2, x2.stride(0), width, seq_index, pos, moments, moments.stride(0), keys, keys.stride(0),
                           bad, bad.stride(0), lanes, lanes.stride(0), slot), (x2.element_size() == 2, block))


def finish_cuda(req: dict[str, torch.Tensor], out: dict[str, torch.Tensor], row_words: int, num_reqs: int,
                counts: torch.Tensor | None, per_sample: torch.Tensor, width: torch.Tensor, reset: bool,
                tail: list[tuple[torch.Tensor, int]] = (), pos: torch.Tensor | None = None,
                lanes: torch.Tensor | None = None) -> None:
    """``stepbuf.stats_table`` of the first ``num_reqs`` requests in one launch, from the accumulating
    table's typed views ``req`` (moments, keys, bad, shadow) into the finished table's ``out`` (the
    same, and stats). ``counts``: each request's new tokens and whether it samples (``(R, 2)`` int32 on
    the device); None for a decode step (one token each, sampled). ``per_sample`` (int32) and
    ``width`` (float64): one per site. ``reset``: every row of ``req`` is cleared behind the copy.
    ``tail``: up to two sites of a decode step, ``(rows view, slot)`` with row r request r's at
    ``pos[r]``, computed in the same launch first (their hash lanes into ``lanes``)."""
    sites = out["stats"].shape[1]
    grid = out["stats"].shape[0] if reset else num_reqs
    if grid == 0:
        return
    assert len(tail) <= 2 and (not tail or counts is None), "tail sites are a decode step's sampling sites"
    shadow = req["shadow"].shape[1] * req["shadow"].shape[2]
    sides, consts = [], []
    for x, slot in [*tail, *[(per_sample, 0)] * (2 - len(tail))]:  # an unused side: any int32 tensor
        sides += [x, x.stride(0), x.shape[-1] if x.dim() > 1 else 1, slot]
        consts += [x.element_size() == 2, min(512, max(128, triton.next_power_of_2(sides[-2])))]
    _launch_finish((grid,), (req["moments"], req["keys"], req["bad"], req["shadow"], out["moments"], out["keys"],
                             out["bad"], out["shadow"], out["stats"], row_words, shadow,
                             per_sample if counts is None else counts, per_sample, width, sites, num_reqs,
                             per_sample if pos is None else pos, per_sample if lanes is None else lanes,
                             0 if lanes is None else lanes.stride(0), *sides),
                   (counts is None, reset, min(256, triton.next_power_of_2(max(sites, shadow, 1))), len(tail),
                    *consts))
