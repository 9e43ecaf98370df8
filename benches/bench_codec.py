"""Benchmark pbcodec's codec primitives against equal-work numpy code.

Run:  python benches/bench_codec.py [--quick] [--sizes IN,OUT] [--levels all|current]

What is measured
----------------
Groups (one table each): pack_signs (float32), pack_bits and unpack_bits
(bits 1, 2, 3, 4, 8), rle_encode (count_bits=4 and "auto") and rle_decode at
densities 1/5/10/20 %. Every op runs at two size classes, on 2-D inputs of
shape (rows, 4096):

* ``in``:  about IN bytes of *input* (default 64 KiB), so the data stay in
  cache (L2 is 512 KiB per core here; 1-bit unpack writes 512 KiB, so its
  traffic spills to L3: the values-per-cycle table adds rows sized to half of
  L2). Many samples (~0.2 s per candidate), each timing enough back-to-back
  calls to last ~2 ms; the public API's fixed per-call cost (a few us, shown
  in its own table) is included.
* ``out``: at least OUT bytes of input (default 256 MiB; for unpack the input is
  the packed stream, so bits=1 writes 2 GiB), far beyond the 32 MiB L3.
  5 samples of one call each (--quick: 64 MiB, 3 samples, RLE at 10% only).

Our output goes to a preallocated, already-touched ``out=`` array (no page
faults). The numpy peers do the same where numpy can: the shift-and-mask
peers, np.copyto and (out of cache) np.signbit write into preallocated
buffers; np.packbits / np.unpackbits (no ``out=``) and both RLE peers allocate
their results, as any numpy user's code would. Before timing, every peer's
output is asserted equal to pbcodec's on that very data, so both sides do the
same work.

Peers: bits=1 -> np.packbits / np.unpackbits(bitorder="little"); bits 2..7 ->
a vectorised shift-and-mask ("SWAR") numpy codec: 8 codes are one uint64 word,
merged (or split) in three shift/mask steps (8->16->32->64-bit lanes), then the
word's first `bits` bytes are the packed group; processed in L2-sized chunks
(the fastest numpy variant tried: the literal "widen each code to uint64 and
shift by j*bits" form was 1.5-10x slower). bits=8 is the identity, so its
peer is np.copyto. pack_signs -> np.packbits(np.signbit(x), bitorder="little")
(out of cache in 128-row chunks, so the bool temporary stays in cache).
RLE -> vectorised numpy encode (flatnonzero, gaps, divmod by ESC, escape fill
+ scatter, SWAR packing) and decode (SWAR unpacking, cumulative sums,
fancy-index scatter).

How to read a table
-------------------
ours / peer: median seconds per call. ratio = peer / ours (>1: pbcodec faster).
G val/s: values per second for ours (pack: input codes; unpack: output codes;
signs: input floats; rle: dense positions, i.e. input of encode / output of
decode). %copy (out rows only): (bytes read + bytes written by the op) / time,
over 2 x bytes / time of a plain np.copyto(dst, src) of OUT bytes measured
interleaved with the same row. noise: interquartile range / median of ours.
All numbers in one table come from the same run; compare ratios, not absolute
times across runs (the machine is shared). "values per cycle" uses the nominal
clock from /proc/cpuinfo, not the real (boost) clock.

The %copy reference depends on the size: glibc's memcpy uses streaming
(non-temporal) stores only above its x86_non_temporal_threshold (192 MiB on
the dev machine; printed under "memory baselines" when ld.so reports it), and
those skip reading each destination line before writing it. So with the
default 256 MiB the reference is a streaming-store copy, while --quick's
64 MiB reference is an ordinary-store copy: %copy of a --quick run is not
comparable with a full run. The "memory baselines" table shows both kinds.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import sys
import time
from functools import partial

import _env  # noqa: F401  (first: sets the BLAS/OpenMP environment)
import numpy as np
import pbcodec
from _timing import fmt_bytes, fmt_ratio, fmt_time, measure, print_table

N_COLS = 4096  # row length (a typical hidden size); a multiple of 8, so rows are whole 8-code groups
BITS = (1, 2, 3, 4, 8)
DENSITIES = (0.01, 0.05, 0.10, 0.20)
# Chunk of the numpy shift-and-mask peers: 16 Ki groups of 8 codes, i.e. two
# 128 KiB uint64 temporaries; the fastest of 4 Ki..64 Ki groups on this machine
# (smaller chunks pay more Python overhead, larger ones spill the 512 KiB L2).
CHUNK_GROUPS = 1 << 14
# Row chunk of the pack_signs peer's bool temporary (512 KiB): fastest of 8..all rows tried.
SIGN_CHUNK_ROWS = 128

# ----------------------------------------------------------------------------
# numpy peers
# ----------------------------------------------------------------------------
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_scratch: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _tmp(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Two reusable uint64 temporaries (fresh ones of this size would be mmap'd,
    and page-faulted, on every call)."""
    if n not in _scratch:
        _scratch[n] = (np.ones(n, np.uint64), np.ones(n, np.uint64))
    return _scratch[n]


def _lane_mask(lane: int, width: int, shift: int = 0) -> np.uint64:
    """`width` low bits of every other `lane`-bit lane, moved up by `shift`."""
    m = 0
    for i in range(0, 64, 2 * lane):
        m |= ((1 << width) - 1) << (i + shift)
    return np.uint64(m)


def np_pack_swar(codes: np.ndarray, k: int, out: np.ndarray) -> np.ndarray:
    """Pack a flat uint8 stream (length a multiple of 8) of k-bit codes into
    `out` (length len/8*k): docs/format.md section 1, little-endian host."""
    g_all = codes.size // 8
    src_all = codes.reshape(-1).view(np.uint64)
    out2 = out.reshape(g_all, k)
    # (lane, width): pairs of `lane`-bit lanes each holding `width` bits merge into one.
    steps = [
        (np.uint64(lane - width), _lane_mask(lane, width, lane), _lane_mask(lane, width))
        for lane, width in ((8, k), (16, 2 * k), (32, 4 * k))
    ]
    w_buf, t_buf = _tmp(min(g_all, CHUNK_GROUPS))
    for s in range(0, g_all, CHUNK_GROUPS):
        e = min(g_all, s + CHUNK_GROUPS)
        w, t = w_buf[: e - s], t_buf[: e - s]
        src = src_all[s:e]
        for shift, hi, lo in steps:
            np.bitwise_and(src, hi, out=t)
            np.right_shift(t, shift, out=t)
            np.bitwise_and(src, lo, out=w)
            np.bitwise_or(w, t, out=w)
            src = w
        if k in _UINT:  # whole-word stores beat k strided byte copies
            out2[s:e].view(_UINT[k])[:, 0] = w.view(_UINT[k]).reshape(e - s, 8 // k)[:, 0]
        else:
            wb = w.view(np.uint8).reshape(e - s, 8)
            for b in range(k):
                out2[s:e, b] = wb[:, b]
    return out


def np_unpack_swar(packed: np.ndarray, k: int, out: np.ndarray) -> np.ndarray:
    """Inverse of np_pack_swar: `out` (uint8, length a multiple of 8) gets the codes."""
    g_all = out.size // 8
    dst_all = out.reshape(-1).view(np.uint64)
    p2 = packed.reshape(g_all, k)
    steps = [
        (np.uint64(lane - width), _lane_mask(lane, width, lane), _lane_mask(lane, width))
        for lane, width in ((32, 4 * k), (16, 2 * k), (8, k))
    ]
    _, t_buf = _tmp(min(g_all, CHUNK_GROUPS))
    for s in range(0, g_all, CHUNK_GROUPS):
        e = min(g_all, s + CHUNK_GROUPS)
        w, t = dst_all[s:e], t_buf[: e - s]  # work in place in the output
        if k in _UINT:
            w[...] = p2[s:e].view(_UINT[k])[:, 0]
        else:
            w[...] = 0
            wb = w.view(np.uint8).reshape(e - s, 8)
            for b in range(k):
                wb[:, b] = p2[s:e, b]
        for shift, hi, lo in steps:
            np.left_shift(w, shift, out=t)
            np.bitwise_and(t, hi, out=t)
            np.bitwise_and(w, lo, out=w)
            np.bitwise_or(w, t, out=w)
    return out


def np_pack_bits(codes: np.ndarray, k: int, out: np.ndarray) -> np.ndarray:
    if k == 1:
        return np.packbits(codes, axis=-1, bitorder="little")  # no out= in numpy
    if k == 8:
        np.copyto(out, codes)
        return out
    return np_pack_swar(codes, k, out)


def np_unpack_bits(packed: np.ndarray, k: int, count: int, out: np.ndarray) -> np.ndarray:
    if k == 1:
        return np.unpackbits(packed, axis=-1, count=count, bitorder="little")  # no out= in numpy
    if k == 8:
        np.copyto(out, packed)
        return out
    return np_unpack_swar(packed, k, out)


def np_pack_signs(x: np.ndarray, signs: np.ndarray, out: np.ndarray) -> np.ndarray:
    """np.packbits(np.signbit(x), axis=-1, bitorder="little"); large inputs go in
    row chunks so the bool temporary `signs` (preallocated) stays in cache."""
    step = signs.shape[0]
    if x.shape[0] <= step:
        # In cache the plain expression is the fastest form (a small temporary
        # costs no page faults, and out= plus a copy into `out` only add calls).
        return np.packbits(np.signbit(x), axis=-1, bitorder="little")
    for r in range(0, x.shape[0], step):
        e = min(x.shape[0], r + step)
        sb = signs[: e - r]
        np.signbit(x[r:e], out=sb)
        out[r:e] = np.packbits(sb, axis=-1, bitorder="little")
    return out


def _rle_nbytes(ndim: int, rows: int, ncodes: int, nvals: int, b: int) -> int:
    """Serialized size, docs/format.md section 4 (value_bits=8)."""
    w = 4 if ncodes < 1 << 32 else 8
    return 16 + 8 * ndim + 16 + w * rows + (ncodes * b + 7) // 8 + nvals + 4


def np_rle_encode(x: np.ndarray, count_bits):
    """Vectorised numpy twin of rle_encode(x, count_bits, 8): returns
    (counts, values, code_offsets, value_offsets, count_bits)."""
    n = x.shape[-1]
    rows = x.size // n
    flat = x.reshape(-1)
    nz = np.flatnonzero(flat)
    nnz = nz.size
    vals = flat[nz]
    col = nz & (n - 1) if n & (n - 1) == 0 else nz % n
    # Zeros before each nonzero in its row: the gap to the previous nonzero, or
    # the column when the previous nonzero is in an earlier row (gap >= column then).
    run = np.empty_like(nz)
    if nnz:
        run[0] = nz[0]
        np.subtract(nz[1:], nz[:-1], out=run[1:])
        run[1:] -= 1
        np.minimum(run, col, out=run)
    if count_bits == "auto":
        best = None
        for b in range(1, 9):
            ncodes = int((run // ((1 << b) - 1)).sum()) + nnz
            size = _rle_nbytes(x.ndim, rows, ncodes, nnz, b)
            if best is None or size < best[0]:
                best = (size, b)
        count_bits = best[1]
    b = count_bits
    esc = (1 << b) - 1
    q, rem = np.divmod(run, esc)
    # Value i's own (non-escape) code sits after all earlier codes: i earlier
    # value codes plus the escapes up to and including its own.
    ends = np.cumsum(q)
    ends += np.arange(nnz)
    ncodes = int(ends[-1]) + 1 if nnz else 0
    groups = (ncodes + 7) // 8
    codes = np.full(groups * 8, esc, np.uint8)
    codes[ncodes:] = 0  # padding bits must be zero
    codes[ends] = rem
    counts = np_pack_swar(codes, b, np.empty(groups * b, np.uint8))[: (ncodes * b + 7) // 8]
    value_offsets = np.searchsorted(nz, np.arange(rows + 1, dtype=np.int64) * n)
    code_end = np.empty(nnz + 1, np.int64)
    code_end[0] = 0
    code_end[1:] = ends + 1
    code_offsets = code_end[value_offsets]
    return counts, vals, code_offsets, value_offsets, b


def np_rle_decode(counts, values, code_offsets, shape, b, out):
    """Vectorised numpy twin of rle_decode: codes unpacked, write positions from a
    cumulative sum rebased per row, values scattered into a zeroed `out`."""
    n = shape[-1]
    esc = (1 << b) - 1
    ncodes = int(code_offsets[-1])
    groups = (ncodes + 7) // 8
    packed = np.zeros(groups * b, np.uint8)
    packed[: counts.size] = counts
    codes = np_unpack_swar(packed, b, np.empty(groups * 8, np.uint8))[:ncodes]
    is_val = codes != esc
    inc = codes.astype(np.int64)
    inc += is_val  # an escape advances ESC, a value code c advances c + 1
    cum = np.cumsum(inc)  # one past each code's position, rows laid end to end
    per_row = np.diff(code_offsets)
    rows_with = np.flatnonzero(per_row)
    starts = code_offsets[rows_with]
    delta = rows_with * n - (cum[starts] - inc[starts]) - 1  # rebase each row to row*n
    cum += np.repeat(delta, per_row[rows_with])
    out.fill(0)
    out.reshape(-1)[cum[is_val]] = values
    return out


# ----------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------
def random_bytes(nbytes: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, nbytes, dtype=np.uint8)


def sparse_int8(shape: tuple[int, int], p: float, rng: np.random.Generator) -> np.ndarray:
    """iid: nonzero with probability p, then uniform over the 255 nonzero int8 values."""
    x = np.empty(shape, np.int8)
    flat = x.reshape(-1)
    thr = round(p * 65536)
    step = 1 << 24  # generate in pieces: full-size random temporaries would be 3x the array
    for s in range(0, flat.size, step):
        e = min(flat.size, s + step)
        keep = rng.integers(0, 65536, e - s, dtype=np.uint16) < thr
        vals = rng.integers(1, 256, e - s, dtype=np.uint8).view(np.int8)
        flat[s:e] = np.where(keep, vals, np.int8(0))
    return x


# Every benchmarked input starts on a page boundary and every output (ours and
# the peer's alike) 1 KiB past one. On this CPU memcpy-like stores run up to
# 10x slower when the destination sits a few bytes after the source modulo
# 4 KiB (np.copyto of 64 KiB: 2 us vs 22 us), and plain np.empty addresses
# hit that by chance, differently for ours and the peer. Fixed offsets give
# both sides the same, benign, relative alignment.
IN_OFFSET, OUT_OFFSET = 0, 1024


def placed(shape, dtype, offset: int) -> np.ndarray:
    """An uninitialised array starting `offset` bytes after a page boundary."""
    dt = np.dtype(dtype)
    nbytes = math.prod(shape) * dt.itemsize
    raw = np.empty(nbytes + 4096 + offset, np.uint8)
    start = (-raw.ctypes.data) % 4096 + offset
    return raw[start : start + nbytes].view(dt).reshape(shape)


def as_input(a: np.ndarray) -> np.ndarray:
    """A page-aligned copy of `a`."""
    b = placed(a.shape, a.dtype, IN_OFFSET)
    np.copyto(b, a)
    return b


def touched(shape, dtype, offset: int = OUT_OFFSET) -> np.ndarray:
    """An output buffer whose pages are already faulted in (np.zeros would be lazy)."""
    a = placed(shape if isinstance(shape, tuple) else (shape,), dtype, offset)
    a.fill(1)
    return a


# ----------------------------------------------------------------------------
# running and reporting
# ----------------------------------------------------------------------------
class Cfg:
    def __init__(self, quick: bool, in_bytes: int, out_bytes: int):
        self.quick = quick
        self.sizes = (("in", in_bytes), ("out", out_bytes))
        self.out_repeats = 3 if quick else 5
        self.budget_s = 0.04 if quick else 0.2
        self.sample_s = 1e-3 if quick else 2e-3
        self.bits_rows = 1024 if quick else 4096
        # numpy's RLE peers take seconds per call out of cache; --quick keeps
        # only the density the decode target names there (all densities in cache).
        self.rle_out_densities = (0.10,) if quick else DENSITIES
        self.copy_src = touched(out_bytes, np.uint8, IN_OFFSET)
        self.copy_dst = touched(out_bytes, np.uint8, OUT_OFFSET)

    def run(self, cls: str, fns: dict) -> dict:
        if cls == "in":
            return measure(fns, budget_s=self.budget_s, sample_s=self.sample_s)
        # Every caller has just run ours and the peer once to check their outputs
        # (that is the warm-up), and the copy buffers are hot from the baselines.
        fns = dict(fns, copy=lambda: np.copyto(self.copy_dst, self.copy_src))
        return measure(fns, repeats=self.out_repeats, calibrate=False, warmup=False)


RECORDS: list[dict] = []


def record(group, level, op, cls, values, moved, st, peer_name, **extra) -> dict:
    r = dict(
        group=group,
        level=level,
        op=op,
        cls=cls,
        values=values,
        moved=moved,
        ours=st["ours"],
        peer=st.get("peer"),
        copy=st.get("copy"),
        peer_name=peer_name,
        **extra,
    )
    RECORDS.append(r)
    return r


def gvals(r) -> float:
    return r["values"] / r["ours"].median / 1e9


def pct_copy(r, copy_bytes: int) -> float | None:
    if r["copy"] is None:
        return None
    bw_ours = r["moved"] / r["ours"].median
    bw_copy = 2 * copy_bytes / r["copy"].median
    return 100 * bw_ours / bw_copy


def table_rows(recs, copy_bytes):
    rows = []
    for r in recs:
        pc = pct_copy(r, copy_bytes)
        peer = r["peer"]
        rows.append(
            [
                r["op"],
                r["peer_name"],
                r["cls"],
                r["shape"],
                fmt_time(r["ours"].median),
                fmt_time(peer.median) if peer else "-",
                fmt_ratio(peer.median / r["ours"].median) if peer else "-",
                f"{gvals(r):.2f}",
                f"{pc:.0f}%" if pc is not None else "-",
                f"{100 * r['ours'].spread:.0f}%",
            ]
        )
    return rows


HEADER = ["op", "peer", "size", "shape", "ours", "peer", "ratio", "G val/s", "%copy", "noise"]


def copy_note(recs, copy_bytes):
    cs = [2 * copy_bytes / r["copy"].median / 1e9 for r in recs if r["copy"] is not None]
    if not cs:
        return []
    return [
        f"copy baseline: np.copyto of {fmt_bytes(copy_bytes)}, read+write {np.median(cs):.1f} GB/s "
        f"median over rows (range {min(cs):.1f}..{max(cs):.1f})"
    ]


def shape_str(shape) -> str:
    return "x".join(map(str, shape))


def bench_signs(cfg: Cfg, level: str, rng) -> list[dict]:
    out = []
    for cls, size in cfg.sizes:
        rows = max(1, -(-size // (4 * N_COLS)))
        x = as_input(rng.standard_normal((rows, N_COLS), dtype=np.float32))
        ours_out = touched((rows, N_COLS // 8), np.uint8)
        peer_out = touched((rows, N_COLS // 8), np.uint8)
        signs = touched((min(rows, SIGN_CHUNK_ROWS), N_COLS), np.bool_)
        assert np.array_equal(pbcodec.pack_signs(x, out=ours_out), np_pack_signs(x, signs, peer_out))
        st = cfg.run(
            cls,
            {"ours": partial(pbcodec.pack_signs, x, out=ours_out), "peer": partial(np_pack_signs, x, signs, peer_out)},
        )
        out.append(
            record(
                "signs",
                level,
                "pack_signs f32",
                cls,
                x.size,
                x.nbytes + ours_out.nbytes,
                st,
                "np.signbit+packbits",
                shape=shape_str(x.shape),
            )
        )
        del x, ours_out, peer_out, signs
        gc.collect()
    return out


def _peer_name(k: int, pack: bool) -> str:
    if k == 1:
        return "np.packbits" if pack else "np.unpackbits"
    return "np.copyto" if k == 8 else "numpy SWAR"


def bench_pack(cfg: Cfg, level: str, rng) -> list[dict]:
    out = []
    for cls, size in cfg.sizes:
        rows = max(1, -(-size // N_COLS))
        raw = random_bytes(rows * N_COLS, rng).reshape(rows, N_COLS)
        for k in BITS:
            codes = placed(raw.shape, np.uint8, IN_OFFSET)
            np.bitwise_and(raw, np.uint8((1 << k) - 1), out=codes)
            ours_out = touched((rows, N_COLS * k // 8), np.uint8)
            peer_out = touched((rows, N_COLS * k // 8), np.uint8)
            ours = pbcodec.pack_bits(codes, k, out=ours_out)
            assert np.array_equal(ours, np_pack_bits(codes, k, peer_out))
            if k == 8:  # the general shift-and-mask code agrees too
                assert np.array_equal(ours, np_pack_swar(codes, k, peer_out))
            st = cfg.run(
                cls,
                {
                    "ours": partial(pbcodec.pack_bits, codes, k, out=ours_out),
                    "peer": partial(np_pack_bits, codes, k, peer_out),
                },
            )
            out.append(
                record(
                    "pack",
                    level,
                    f"pack_bits {k}",
                    cls,
                    codes.size,
                    codes.nbytes + ours_out.nbytes,
                    st,
                    _peer_name(k, True),
                    bits=k,
                    shape=shape_str(codes.shape),
                )
            )
            del codes, ours_out, peer_out, ours
            gc.collect()
        del raw
        gc.collect()
    return out


def bench_unpack(cfg: Cfg, level: str, rng) -> list[dict]:
    out = []
    for cls, size in cfg.sizes:
        raw = None
        for k in BITS:
            row_bytes = N_COLS * k // 8
            rows = max(1, -(-size // row_bytes))
            if raw is None or raw.size < rows * row_bytes:
                raw = as_input(random_bytes(rows * row_bytes, rng))  # any bytes are a valid packed stream
            packed = raw[: rows * row_bytes].reshape(rows, row_bytes)
            ours_out = touched((rows, N_COLS), np.uint8)
            peer_out = touched((rows, N_COLS), np.uint8) if k != 1 else None
            ours = pbcodec.unpack_bits(packed, k, N_COLS, out=ours_out)
            assert np.array_equal(ours, np_unpack_bits(packed, k, N_COLS, peer_out))
            st = cfg.run(
                cls,
                {
                    "ours": partial(pbcodec.unpack_bits, packed, k, N_COLS, out=ours_out),
                    "peer": partial(np_unpack_bits, packed, k, N_COLS, peer_out),
                },
            )
            out.append(
                record(
                    "unpack",
                    level,
                    f"unpack_bits {k}",
                    cls,
                    ours_out.size,
                    packed.nbytes + ours_out.nbytes,
                    st,
                    _peer_name(k, False),
                    bits=k,
                    shape=shape_str(packed.shape),
                )
            )
            del packed, ours_out, peer_out, ours
            gc.collect()
        del raw
        gc.collect()
    return out


def call_overheads(cfg: Cfg, rng) -> dict[str, float]:
    """Median time of tiny public calls (one row of 64 elements): the fixed
    per-call cost (argument checks, dispatch) that every in-cache row includes."""
    codes = np.zeros((1, 64), np.uint8)
    packed = np.zeros((1, 8), np.uint8)
    x = rng.standard_normal((1, 64), dtype=np.float32)
    sparse = sparse_int8((1, 64), 0.1, rng)
    rle = pbcodec.rle_encode(sparse, 4)
    o_codes, o_packed, o_int8 = np.empty((1, 64), np.uint8), np.empty((1, 8), np.uint8), np.empty((1, 64), np.int8)
    st = measure(
        {
            "pack_signs f32": lambda: pbcodec.pack_signs(x, out=o_packed),
            "pack_bits 1": lambda: pbcodec.pack_bits(codes, 1, out=o_packed),
            "unpack_bits 1": lambda: pbcodec.unpack_bits(packed, 1, 64, out=o_codes),
            "rle_encode cb=4": lambda: pbcodec.rle_encode(sparse, 4),
            "rle_decode cb=4": lambda: pbcodec.rle_decode(rle, out=o_int8),
            "numpy: np.copyto": lambda: np.copyto(o_codes, codes),
        },
        budget_s=cfg.budget_s,
        sample_s=cfg.sample_s,
    )
    return {k: v.median for k, v in st.items()}


def bench_unpack_l2(cfg: Cfg, level: str, rng) -> list[dict]:
    """unpack_bits 1/2/4 with input + output about half of L2, so the
    values-per-cycle figure is not limited by L3 (64 KiB of 1-bit input is
    already 576 KiB of traffic) nor dominated by call overhead."""
    out = []
    l2 = cache_bytes(2) or (512 << 10)
    for k in (1, 2, 4):
        rows = max(1, (l2 // 2) // (N_COLS + N_COLS * k // 8))
        packed = as_input(random_bytes(rows * N_COLS * k // 8, rng).reshape(rows, N_COLS * k // 8))
        o = touched((rows, N_COLS), np.uint8)
        st = measure(
            {"ours": partial(pbcodec.unpack_bits, packed, k, N_COLS, out=o)},
            budget_s=cfg.budget_s,
            sample_s=cfg.sample_s,
        )
        out.append(
            dict(
                group="unpack_l2",
                level=level,
                op=f"unpack_bits {k}",
                cls="in (L2/2)",
                bits=k,
                values=o.size,
                moved=packed.nbytes + o.nbytes,
                ours=st["ours"],
                peer=None,
                copy=None,
                shape=shape_str(packed.shape),
            )
        )
    return out


def cache_bytes(level: int) -> int | None:
    """Size of the data/unified cache of that level for cpu0, from sysfs."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for idx in os.listdir(base):
            d = os.path.join(base, idx)
            if (
                idx.startswith("index")
                and open(os.path.join(d, "level")).read().strip() == str(level)
                and open(os.path.join(d, "type")).read().strip() in ("Unified", "Data")
            ):
                return parse_size(open(os.path.join(d, "size")).read().strip())
    except (OSError, ValueError):
        pass
    return None


def nominal_mhz() -> float | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return float(line.split(":")[1])
    except OSError:
        pass
    return None


def memory_baselines(cfg: Cfg) -> None:
    """Single-core memory bandwidth references for reading the %copy column.
    glibc's memcpy switches to non-temporal (streaming) stores above
    x86_non_temporal_threshold, so a plain np.copyto larger than that writes
    without first reading the destination lines; the same copy in 1 MiB pieces
    stays below it and uses ordinary stores, like a kernel without streaming
    stores (each written line is read first: 3 memory transfers per 2 counted)."""
    src, dst = cfg.copy_src, cfg.copy_dst
    nbytes = src.nbytes
    piece = 1 << 20

    def pieces():
        for s in range(0, nbytes, piece):
            np.copyto(dst[s : s + piece], src[s : s + piece])

    st = measure(
        {
            "np.copyto(dst, src)  [the %copy reference]": lambda: np.copyto(dst, src),
            "np.copyto in 1 MiB pieces": pieces,
            "read only: np.bitwise_or.reduce(src as uint64)": lambda: np.bitwise_or.reduce(src.view(np.uint64)),
            "write only: dst.fill(1)": lambda: dst.fill(1),
        },
        repeats=cfg.out_repeats,
        calibrate=False,
    )
    moved = [2 * nbytes, 2 * nbytes, nbytes, nbytes]
    ref = moved[0] / st["np.copyto(dst, src)  [the %copy reference]"].median
    rows = [
        [name, fmt_time(v.median), f"{m / v.median / 1e9:.1f}", f"{100 * m / v.median / ref:.0f}%"]
        for (name, v), m in zip(st.items(), moved, strict=False)
    ]
    notes = ["GB/s counts bytes read + bytes written by the operation"]
    nt = glibc_nt_threshold()
    if nt is not None:
        kind = "streaming" if nbytes > nt else "ordinary"
        notes.append(
            f"glibc x86_non_temporal_threshold = {fmt_bytes(nt)}: the plain copy of {fmt_bytes(nbytes)} "
            f"uses {kind} stores"
        )
    print_table(
        f"memory baselines, one core, {fmt_bytes(nbytes)} buffers",
        ["operation", "median", "GB/s", "%copy"],
        rows,
        notes,
    )


def glibc_nt_threshold() -> int | None:
    """glibc's memcpy streaming-store threshold, from `ld.so --list-tunables` (None if unavailable)."""
    import subprocess

    for ld in ("/lib64/ld-linux-x86-64.so.2", "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"):
        try:
            txt = subprocess.run([ld, "--list-tunables"], capture_output=True, text=True, timeout=5).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        for line in txt.splitlines():
            if "x86_non_temporal_threshold" in line:
                try:
                    return int(line.split(":")[1].split()[0], 0)
                except (IndexError, ValueError):
                    return None
    return None


def print_level_tables(cfg: Cfg, level: str, recs: list[dict], l2recs: list[dict], overheads: dict, mhz: float | None):
    copy_bytes = cfg.sizes[1][1]
    for group, title in (("signs", "pack_signs (float32)"), ("pack", "pack_bits"), ("unpack", "unpack_bits")):
        g = [r for r in recs if r["group"] == group]
        print_table(f"{title}  [simd={level}]", HEADER, table_rows(g, copy_bytes), copy_note(g, copy_bytes), left=4)
    overhead = overheads["unpack_bits 1"]
    rows = []
    main = [r for r in recs if r["group"] == "unpack" and r["cls"] == "in" and r["bits"] in (1, 2, 4)]
    for r in sorted(main + l2recs, key=lambda r: r["bits"]):
        t = r["ours"].median
        gv = r["values"] / t / 1e9
        gv_x = r["values"] / max(t - overhead, 1e-12) / 1e9
        rows.append(
            [
                r["op"],
                r["cls"],
                r["shape"],
                fmt_bytes(r["moved"]),
                fmt_time(t),
                f"{gv:.2f}",
                f"{gv * 1e3 / mhz:.1f}" if mhz else "-",
                f"{gv_x * 1e3 / mhz:.1f}" if mhz else "-",
            ]
        )
    clock = f"{mhz:.0f} MHz nominal (/proc/cpuinfo 'cpu MHz'; the real boost clock may differ)" if mhz else "unknown"
    print_table(
        f"in-cache unpack throughput  [simd={level}]",
        ["op", "size", "packed shape", "in+out", "ours", "G val/s", "val/cycle", "val/cycle excl. call"],
        rows,
        [
            f"clock: {clock}; target >= 20 values/cycle",
            f"'excl. call' subtracts {fmt_time(overhead)}, the median time of a 64-code public unpack_bits call",
        ],
        left=3,
    )
    print_table(
        f"fixed per-call cost of the public API  [simd={level}]",
        ["call (1 row of 64 elements)", "median"],
        [[k, fmt_time(v)] for k, v in overheads.items()],
        ["included in every 'ours' time above; it matters for in-cache rows of a few microseconds"],
    )


def bench_rle(cfg: Cfg, rng) -> list[dict]:
    out = []
    level = pbcodec.simd_level()
    for cls, size in cfg.sizes:
        rows = max(1, -(-size // N_COLS))
        for p in DENSITIES if cls == "in" else cfg.rle_out_densities:
            x = as_input(sparse_int8((rows, N_COLS), p, rng))
            for cb in (4, "auto"):
                ref = pbcodec.rle_encode(x, cb)
                counts, vals, co, vo, b = np_rle_encode(x, cb)
                assert b == ref.count_bits and np.array_equal(counts, ref.counts)
                assert np.array_equal(vals, ref.values) and np.array_equal(co, ref.code_offsets)
                assert np.array_equal(vo, ref.value_offsets)
                assert _rle_nbytes(x.ndim, rows, ref.num_codes, ref.num_values, b) == ref.nbytes
                del counts, vals, co, vo
                st = cfg.run(cls, {"ours": partial(pbcodec.rle_encode, x, cb), "peer": partial(np_rle_encode, x, cb)})
                out.append(
                    record(
                        "rle_encode",
                        level,
                        f"rle_encode cb={cb if cb == 'auto' else b}",
                        cls,
                        x.size,
                        x.nbytes + ref.counts.nbytes + ref.values.nbytes,
                        st,
                        "numpy vectorised",
                        density=p,
                        shape=shape_str(x.shape),
                        chosen=b,
                    )
                )
                gc.collect()
            # decode the default (count_bits=4) encoding
            ref = pbcodec.rle_encode(x, 4)
            ours_out = touched(x.shape, np.int8)
            peer_out = touched(x.shape, np.int8)
            assert np.array_equal(pbcodec.rle_decode(ref, out=ours_out), x)
            assert np.array_equal(np_rle_decode(ref.counts, ref.values, ref.code_offsets, x.shape, 4, peer_out), x)
            st = cfg.run(
                cls,
                {
                    "ours": partial(pbcodec.rle_decode, ref, out=ours_out),
                    "peer": partial(np_rle_decode, ref.counts, ref.values, ref.code_offsets, x.shape, 4, peer_out),
                },
            )
            out.append(
                record(
                    "rle_decode",
                    level,
                    "rle_decode cb=4",
                    cls,
                    x.size,
                    x.nbytes + ref.counts.nbytes + ref.values.nbytes,
                    st,
                    "numpy vectorised",
                    density=p,
                    shape=shape_str(x.shape),
                )
            )
            del x, ref, ours_out, peer_out
            gc.collect()
    return out


def print_rle_tables(cfg: Cfg, recs: list[dict]):
    copy_bytes = cfg.sizes[1][1]
    level = recs[0]["level"] if recs else pbcodec.simd_level()
    hdr = ["op", "density", "size", "shape", "ours", "peer", "ratio", "G val/s", "%copy", "noise"]
    for group in ("rle_encode", "rle_decode"):
        g = [r for r in recs if r["group"] == group]
        rows = []
        for r, tr in zip(g, table_rows(g, copy_bytes), strict=False):
            rows.append([tr[0], f"{100 * r['density']:.0f}%"] + tr[2:])
        notes = ["peer: vectorised numpy (same counts/values/offsets, asserted); G val/s counts dense positions"]
        if group == "rle_encode":
            notes.append("ours and peer both allocate their output streams (rle_encode has no out=)")
        print_table(f"{group}  [simd={level}]", hdr, rows, notes + copy_note(g, copy_bytes), left=4)


def entropy_bound(p: float) -> float:
    """H(p) + 8p bits per position: where each position is zero or not (H(p)),
    plus 8 bits for each nonzero value."""
    if p <= 0 or p >= 1:
        return 8 * p
    return -p * math.log2(p) - (1 - p) * math.log2(1 - p) + 8 * p


def bench_bits_per_position(cfg: Cfg, rng) -> list[list]:
    rows_out, results = [], []
    for p in DENSITIES:
        x = sparse_int8((cfg.bits_rows, N_COLS), p, rng)
        phat = np.count_nonzero(x) / x.size
        bound = entropy_bound(phat)
        for cb in (3, 4, 5, "auto"):
            r = pbcodec.rle_encode(x, cb)
            streams = 8 * (r.counts.nbytes + r.values.nbytes) / x.size
            total = 8 * r.nbytes / x.size
            label = f"auto->{r.count_bits}" if cb == "auto" else str(cb)
            rows_out.append(
                [
                    f"{100 * p:.0f}%",
                    f"{phat:.5f}",
                    label,
                    f"{bound:.4f}",
                    f"{streams:.4f}",
                    f"{100 * (streams / bound - 1):+.2f}%",
                    f"{total:.4f}",
                    f"{100 * (total / bound - 1):+.2f}%",
                ]
            )
            results.append(dict(p=p, cb=cb, chosen=r.count_bits, bound=bound, streams=streams, total=total))
        del x
    print_table(
        f"RLE bits per position vs entropy bound  (shape {cfg.bits_rows}x{N_COLS}, iid data)",
        ["p", "measured p", "count_bits", "H(p)+8p", "streams b/pos", "over bound", ".nbytes b/pos", "over bound"],
        rows_out,
        [
            "streams = 8*(counts.nbytes + values.nbytes)/positions; .nbytes = serialized size "
            "(header, row index, CRC included)",
            "bound H(p)+8p uses the measured density; target: auto within 4% of it for p in [0.01, 0.2]",
        ],
        left=3,
    )
    return results


def print_targets(cfg: Cfg, recs: list[dict], bits_res: list[dict], mhz: float | None, overheads: dict):
    copy_bytes = cfg.sizes[1][1]
    order = [
        "in-cache unpack >= 20 val/cycle",
        "pack_signs f32 >= 5x numpy (in cache)",
        ">= 80% of copy bandwidth (out of cache)",
        "rle_decode >= 1 G out val/s @10%",
        "rle_encode >= 0.5 G in val/s",
        "auto within 4% of H(p)+8p",
    ]
    rows: dict[str, list] = {t: [] for t in order}

    def add(target, what, value, ok):
        rows[target].append([target, what, value, "met" if ok else "MISSED"])

    for r in recs:
        lvl = r["level"]
        if r["group"] in ("unpack", "unpack_l2") and r["cls"] != "out" and r["bits"] in (1, 2, 4) and mhz:
            vpc = r["values"] / r["ours"].median / (mhz * 1e6)
            vpc_x = r["values"] / max(r["ours"].median - overheads[lvl]["unpack_bits 1"], 1e-12) / (mhz * 1e6)
            add(
                order[0],
                f"[{lvl}] {r['op']} ({r['cls']}, {r['shape']})",
                f"{vpc:.1f} ({vpc_x:.1f} excl. call)",
                vpc >= 20,
            )
        if r["group"] == "signs" and r["cls"] == "in":
            ratio = r["peer"].median / r["ours"].median
            ratio_x = r["peer"].median / max(r["ours"].median - overheads[lvl]["pack_signs f32"], 1e-12)
            add(order[1], f"[{lvl}] {r['op']}", f"{fmt_ratio(ratio)} ({fmt_ratio(ratio_x)} excl. call)", ratio >= 5)
        if r["group"] in ("signs", "pack", "unpack") and r["cls"] == "out":
            pc = pct_copy(r, copy_bytes)
            add(order[2], f"[{lvl}] {r['op']}", f"{pc:.0f}%", pc >= 80)
        if r["group"] == "rle_decode" and abs(r["density"] - 0.10) < 1e-9:
            g = gvals(r)
            add(order[3], f"{r['cls']} {r['op']}", f"{g:.2f}", g >= 1)
        if r["group"] == "rle_encode":
            g = gvals(r)
            add(order[4], f"{r['cls']} {r['op']} p={100 * r['density']:.0f}%", f"{g:.2f}", g >= 0.5)
    for b in bits_res:
        if b["cb"] == "auto":
            for key, name in (("streams", "streams"), ("total", ".nbytes")):
                over = 100 * (b[key] / b["bound"] - 1)
                add(order[5], f"p={100 * b['p']:.0f}% ({name})", f"{over:+.2f}%", over <= 4)
    print_table(
        "Targets (status judged on the raw public-API number)",
        ["target", "measurement", "value", "status"],
        [row for t in order for row in rows[t]],
        left=2,
    )


def parse_size(s: str) -> int:
    s = s.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if s and s[-1] in mult:
        return int(float(s[:-1]) * mult[s[-1]])
    return int(s)


def machine_info(mhz) -> list[str]:
    model = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    caches = []
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for idx in sorted(os.listdir(base)):
            d = os.path.join(base, idx)
            if not idx.startswith("index"):
                continue
            lvl = open(os.path.join(d, "level")).read().strip()
            typ = open(os.path.join(d, "type")).read().strip()
            if typ in ("Unified", "Data"):
                caches.append(f"L{lvl} {open(os.path.join(d, 'size')).read().strip()}")
    except OSError:
        pass
    return [
        f"cpu: {model}, {os.cpu_count()} logical cores visible, {', '.join(caches) or 'caches ?'}, "
        f"nominal clock {mhz or '?'} MHz",
        f"python {platform.python_version()}, numpy {np.__version__}, pbcodec {pbcodec.__version__}, "
        f"simd levels {pbcodec.available_simd_levels()} (current {pbcodec.simd_level()})",
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke-test mode: 64 MiB out-of-cache size, 3 repeats, out-of-cache RLE at 10%% only",
    )
    ap.add_argument(
        "--sizes",
        default=None,
        help="IN,OUT input sizes in bytes, K/M/G suffixes allowed (default 64K,256M; --quick 64K,64M)",
    )
    ap.add_argument(
        "--levels",
        choices=("all", "current"),
        default="current",
        help="SIMD levels for the pack/unpack/signs groups (rle always runs at the current level)",
    )
    args = ap.parse_args(argv)
    sizes = args.sizes or ("64K,64M" if args.quick else "64K,256M")
    in_bytes, out_bytes = (parse_size(s) for s in sizes.split(","))
    if out_bytes < 4 * in_bytes:
        ap.error("OUT must be much larger than IN")

    t_start = time.perf_counter()
    mhz = nominal_mhz()
    cfg = Cfg(args.quick, in_bytes, out_bytes)
    rng = np.random.default_rng(20240611)
    start_level = pbcodec.simd_level()
    levels = pbcodec.available_simd_levels() if args.levels == "all" else [start_level]

    print("pbcodec codec benchmark" + ("  (--quick)" if args.quick else ""))
    for line in machine_info(mhz):
        print("  " + line)
    print(
        f"  sizes: in = {fmt_bytes(in_bytes)} of input, out = {fmt_bytes(out_bytes)} of input; rows of {N_COLS}; "
        f"out-of-cache repeats {cfg.out_repeats}; medians; ratio = peer/ours (>1: pbcodec faster)",
        flush=True,
    )

    memory_baselines(cfg)
    overheads = {}
    try:
        for level in levels:
            pbcodec.set_simd_level(level)
            recs = bench_signs(cfg, level, rng) + bench_pack(cfg, level, rng) + bench_unpack(cfg, level, rng)
            l2recs = bench_unpack_l2(cfg, level, rng)
            RECORDS.extend(l2recs)
            overheads[level] = call_overheads(cfg, rng)
            print_level_tables(cfg, level, recs, l2recs, overheads[level], mhz)
    finally:
        pbcodec.set_simd_level(start_level)
    rle_recs = bench_rle(cfg, rng)
    print_rle_tables(cfg, rle_recs)
    bits_res = bench_bits_per_position(cfg, rng)
    print_targets(cfg, RECORDS, bits_res, mhz, overheads)
    print(f"total wall time {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
