"""Benchmark PBTensor.matvec (y = Ŵx straight from the compressed data) against
equal-work peers.

Run:  python benches/bench_matvec.py [--quick] [--full] [--threads N]
                                     [--shapes 4096x4096,11008x4096,4096x11008]
                                     [--cold-mib 256] [--lib-defaults]

What is measured
----------------
Shapes m x n (out x in features), default 4096x4096, 11008x4096, 4096x11008,
float32 Gaussian weights. Default grid: salient 10 % / 8-bit residuals at batch
1, 4 and 16, plus 5 %/8-bit and 10 %/4-bit at batch 1 only; --full runs
{5, 10 %} x {8, 4 bits} x {1, 4, 16}. --quick: 4096x4096 only, 10 %/8-bit,
fewer samples per candidate (the cold working sets stay >= 256 MiB). Default
~2.5 min, --quick ~25 s, peak RSS ~2.4 GiB (default) on the 2-core dev box.

Threads: pbcodec, OpenBLAS (via threadpoolctl) and torch all get --threads
(default: pbcodec's default, all cores). Unless --lib-defaults is given, the
script sets OPENBLAS_THREAD_TIMEOUT=4 and OMP_WAIT_POLICY=PASSIVE (when not set
already) so idle library threads sleep instead of spinning: with their default
spin-waits the candidates slowed each other 3-8x on 2 cores (see LIB_ENV).

Candidates ("peers"), all fed the very same float32 x (generated once per
shape and batch, reused for every call: it is a few KiB, cache-resident either
way) and writing into preallocated outputs where the API allows:

* pbcodec        t.matvec(x, out=y) on the compressed tensor.
* numpy f32      dense float32 GEMV/GEMM (OpenBLAS). Three layouts are tried
                 per shape and batch ("W @ x.T": W (m,n) stored row-major,
                 result (m,b), i.e. y transposed; "x @ W.T": same W, result
                 (b,m); "x @ Wt": W stored transposed (n,m), result (b,m)),
                 and the fastest in a short trial is used: the table says which.
* numpy f16      W16 @ x16 (numpy has no BLAS for half: a compute-bound loop;
                 it gets only a few samples, see the n column).
* decompress+f32 t.decompress(out=buf) then the fastest (m,n)-layout numpy
                 product on buf, timed together (buf preallocated and reused,
                 which favours the peer: no page faults). Its bits/w column is
                 what it reads from the compressed tensor; it also writes and
                 re-reads the dense float32 buf.
* torch int8     torch.ao.quantization.quantize_dynamic(Sequential(Linear(n, m,
                 bias=False)), {Linear}, qint8) with weight W (per-tensor int8
                 weights, activations quantized per call: included in its time).
                 Skipped, saying so, when torch is not installed.

Before timing, pbcodec's output is checked against t.decompress() @ x (relative
L2 error < 1e-4, else the run aborts), so pbcodec and the decompress peer do the
same work; every peer's relative L2 error against W @ x (computed in float64
from the float32 W) is printed: pbcodec's is the codec's quantization error
(~0.4 for Gaussian weights: 90 % of them keep only a sign), torch's the int8 one.

Cold: each candidate cycles round robin through enough distinct copies of its
own matrix that *its own* working set is >= 256 MiB (8x the 32 MiB L3), so
every call streams its weights from DRAM; candidates are interleaved (one call
of each per round) so machine drift hits all alike. The compressed copies are
byte-for-byte copies of one compressed tensor (PBTensor.from_bytes(to_bytes())),
shared by pbcodec and the decompress peer, which walk them half a cycle apart.
Hot: one matrix, repeated: per round each candidate gets one untimed warm-up
call then 3 timed calls back to back (numpy f16: 1 call, no warm-up, it is
compute-bound). Note that "hot" only means cache-resident when the matrix fits
the L3: the compressed tensors and torch's 4096x4096 int8 (16 MiB) do, dense
float32 (>= 64 MiB) does not, so numpy f32 hot is still DRAM-bound.

How to read the tables
----------------------
Per shape: one row per (config, batch, peer). cold / hot: median ms per call
(one pass over one matrix, all batch rows). vs pb = peer time / pbcodec time
from the same measurement (> 1: pbcodec faster). Gw/s: 1e9 weights per second
in the cold case (m*n / time, whatever the batch). bits/w: bits per weight each
candidate reads (pbcodec: t.bits_per_weight, everything counted). noise:
interquartile range / median of the cold samples. n: samples cold/hot.

Roofline: bytes a cold pbcodec call must read (t.nbytes) / the read bandwidth of
a single-threaded np.copyto of a 256 MiB buffer (bytes *read* / time; a copy
also writes as many bytes, so this is half the read+write traffic), measured at
the start and the end of this run (median of both). "% roofline" =
roofline_time / measured time. A single-threaded copy is not the fastest
reader: the table also gives the read bandwidth numpy's own cold float32 GEMV
reaches in the same measurement ("f32 GB/s") and pbcodec's time against that
stricter roofline ("% f32 roof"). hot % roof close to cold % roof means the
kernel is compute-bound, not memory-bound.
Batch scaling: time(batch b) / time(batch 1), cold and hot.
Targets: checked at the end (batch 1, 10 %/8-bit, cold), MET / MISS per line.
The last lines give the CPU time other processes used during the run (from
/proc/stat): the machine is shared and noisy, so compare ratios within one run,
not absolute times across runs.
"""

from __future__ import annotations

import argparse
import copy
import gc
import itertools
import math
import os
import platform
import resource
import statistics
import time
import warnings
from functools import partial

import _env  # noqa: F401  (first: sets the BLAS/OpenMP environment)
import numpy as np
import pbcodec

# Idle worker threads must sleep, not spin, or the candidates slow each other down:
# after a call, OpenBLAS workers busy-wait ~2^28 cycles (~0.1 s) and libgomp's (torch)
# a few ms by default; on this 2-core machine that steals the cores from the next
# candidate (and from other processes), which we measured as 3-8x slowdowns that are
# charged to whoever runs next. Sleeping idle threads cost each library only a thread
# wake-up (tens of us) per call. The settings (_env.LIB_ENV) must be in
# the environment before numpy / torch load their libraries, so the launchers
# (`pbcodec bench`, benches/bench_matvec.py) set them; main() reports whether they
# are in effect. pbcodec's rayon pool parks by itself.
from _env import LIB_ENV
from _timing import Stat, fmt_bytes, fmt_ratio, print_table

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover - threadpoolctl ships with the dev env
    threadpool_limits = None

try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch
except ImportError:
    torch = None

MIB = 1 << 20
DEFAULT_SHAPES = "4096x4096,11008x4096,4096x11008"
COLD_BYTES = 256 * MIB  # 8x the L3: a cycled working set this big is streamed from DRAM
VERIFY_TOL = 1e-4
HOT_INNER = 3  # timed hot calls after each warm-up call
SLOW = "numpy f16"  # compute-bound peer: few samples, no hot warm-up call

PB = "pbcodec"
NP32 = "numpy f32"
DEC = "decompress+f32"
TQ = "torch int8"


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------
def ms(s: float) -> str:
    return f"{s * 1e3:.3f}" if s < 0.01 else (f"{s * 1e3:.2f}" if s < 1 else f"{s * 1e3:.0f}")


def rel_err(y: np.ndarray, ref: np.ndarray) -> float:
    y = np.asarray(y, np.float64).ravel()
    ref = np.asarray(ref, np.float64).ravel()
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def cold_copies(nbytes: int, cold_bytes: int) -> int:
    return max(1, math.ceil(cold_bytes / nbytes))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def cpu_ticks() -> tuple[float, float, float]:
    """(busy, steal, total) CPU seconds of the whole machine so far, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return (0.0, 0.0, 0.0)
    hz = os.sysconf("SC_CLK_TCK")
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    steal = v[7] if len(v) > 7 else 0
    total = sum(v[:8])
    return ((total - idle - steal) / hz, steal / hz, total / hz)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def copy_bandwidth(nbytes: int, repeats: int) -> list[float]:
    """Read bandwidth samples (bytes read / s) of np.copyto on nbytes buffers."""
    src = np.empty(nbytes // 4, np.float32)
    src.fill(1.0)  # touch every page before timing
    dst = np.empty_like(src)
    np.copyto(dst, src)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        out.append(nbytes / (time.perf_counter() - t0))
    del src, dst
    return out


class Cycler:
    """Calls fns[0], fns[1], ... round robin, starting at `start`."""

    def __init__(self, fns: list, start: int = 0):
        self.fns = fns
        self.it = itertools.cycle(fns[start % len(fns) :] + fns[: start % len(fns)])

    def __call__(self):
        return next(self.it)()


def run_rounds(peers: dict, *, hot: bool, rounds: int, budget_s: float, min_n: int) -> dict[str, Stat]:
    """Interleaved sampling, one sample per peer per round, after an untimed call
    (hot: that warm-up call plus HOT_INNER samples). A peer stops once it has >= min_n samples (1 for the
    slow peer) and has spent budget_s, so slow peers do not blow the run time.
    peers: name -> (cold cycler, hot fn)."""
    samples: dict[str, list[float]] = {k: [] for k in peers}
    spent = dict.fromkeys(peers, 0.0)
    gc_was_on = gc.isenabled()
    gc.disable()  # a collection inside a sample would be charged to whoever ran
    try:
        for _ in range(rounds):
            for name, (cold_fn, hot_fn) in peers.items():
                need = 1 if name == SLOW else min_n
                if len(samples[name]) >= need and spent[name] >= budget_s:
                    continue
                if not hot:
                    # An untimed call first (on another cold copy): a model's layers run
                    # back to back, so each peer is timed with its own threads awake, and
                    # not while the previous peer's idle threads still spin (pbcodec's
                    # team polls 200 µs, OpenBLAS per OPENBLAS_THREAD_TIMEOUT).
                    t0 = time.perf_counter()
                    cold_fn()
                    spent[name] += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    cold_fn()
                    dt = time.perf_counter() - t0
                    samples[name].append(dt)
                    spent[name] += dt
                    continue
                inner = 1 if name == SLOW else HOT_INNER
                if name != SLOW:
                    t0 = time.perf_counter()
                    hot_fn()  # warm-up: the previous peer evicted our matrix
                    spent[name] += time.perf_counter() - t0
                for _ in range(inner):
                    t0 = time.perf_counter()
                    hot_fn()
                    dt = time.perf_counter() - t0
                    samples[name].append(dt)
                    spent[name] += dt
    finally:
        if gc_was_on:
            gc.enable()
    return {k: Stat(v) for k, v in samples.items()}


# numpy float32 layouts: stored matrix kind ("W" = (m,n), "Wt" = (n,m)) and the product.
LAYOUTS = ("W @ x.T", "x @ W.T", "x @ Wt")


def np_product(layout: str, mat: np.ndarray, x: np.ndarray):
    """(fn, out) computing y (or y.T for "W @ x.T") into a preallocated out."""
    if layout == "W @ x.T":
        xv = x if x.ndim == 1 else x.T
        out = np.empty((mat.shape[0],) + x.shape[:-1][::-1], mat.dtype)
        return (lambda: np.matmul(mat, xv, out=out)), out
    if layout == "x @ W.T":
        out = np.empty(x.shape[:-1] + (mat.shape[0],), mat.dtype)
        wt = mat.T
        return (lambda: np.matmul(x, wt, out=out)), out
    if layout == "x @ Wt":
        out = np.empty(x.shape[:-1] + (mat.shape[1],), mat.dtype)
        return (lambda: np.matmul(x, mat, out=out)), out
    raise ValueError(layout)


def layout_label(layout: str, batch: int) -> str:
    return {"W @ x.T": "W @ x", "x @ W.T": "x @ W.T", "x @ Wt": "x @ Wt"}[layout] if batch == 1 else layout


def pick_layouts(W: np.ndarray, xs: dict[int, np.ndarray], trial_n: int) -> tuple[dict, dict]:
    """Fastest numpy float32 layout per batch (any storage) and fastest with W
    stored (m,n) (for the decompress peer, whose buffer is (m,n)), by the median
    of trial_n interleaved calls on one matrix (>= 64 MiB: DRAM-bound anyway)."""
    Wt = np.ascontiguousarray(W.T)
    best, best_mn = {}, {}
    for b, x in xs.items():
        fns = {lay: np_product(lay, Wt if lay == "x @ Wt" else W, x)[0] for lay in LAYOUTS}
        st = run_rounds({k: (f, f) for k, f in fns.items()}, hot=False, rounds=trial_n, budget_s=0.0, min_n=trial_n)
        med = {k: s.median for k, s in st.items()}
        best[b] = min(LAYOUTS, key=med.__getitem__)
        best_mn[b] = min(LAYOUTS[:2], key=med.__getitem__)
    del Wt
    return best, best_mn


def _decompress_then(t, buf: np.ndarray, prod) -> None:
    """The decompress+f32 peer: ``t.decompress(out=buf)``, then the product on ``buf``."""
    t.decompress(out=buf)
    prod()


def make_torch_int8(W: np.ndarray):
    m, n = W.shape
    lin = torch.nn.Sequential(torch.nn.Linear(n, m, bias=False))
    with torch.no_grad():
        lin[0].weight.copy_(torch.from_numpy(W))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantize_dynamic's deprecation notice
        return torch.ao.quantization.quantize_dynamic(lin, {torch.nn.Linear}, dtype=torch.qint8)


# ----------------------------------------------------------------------------
# benchmark
# ----------------------------------------------------------------------------
def bench_shape(m: int, n: int, configs: list, args, results: dict) -> None:
    rng = np.random.default_rng(1000 * m + n)
    t_setup = time.perf_counter()
    W = rng.standard_normal((m, n), dtype=np.float32)
    batches = sorted({b for _, _, bs in configs for b in bs})
    # One x per batch size, shared by every peer and every call.
    xs = {
        b: rng.standard_normal(n, dtype=np.float32) if b == 1 else rng.standard_normal((b, n), dtype=np.float32)
        for b in batches
    }
    x16 = {b: x.astype(np.float16) for b, x in xs.items()}
    # float64 reference W @ x, (batch, m), in row blocks (no float64 copy of W)
    ref = {
        b: np.concatenate(
            [W[i : i + 1024].astype(np.float64) @ x.reshape(-1, n).T.astype(np.float64) for i in range(0, m, 1024)]
        ).T
        for b, x in xs.items()
    }

    layout, layout_mn = pick_layouts(W, xs, args.trial_n)
    need_wt = any(v == "x @ Wt" for v in layout.values())
    need_w = any(v != "x @ Wt" for v in layout.values())
    n32 = cold_copies(W.nbytes, args.cold_bytes)
    dense = {"W": [W] + [W.copy() for _ in range(n32 - 1)] if need_w else []}
    if need_wt:
        dense["Wt"] = [np.ascontiguousarray(W.T) for _ in range(n32)]
    W16 = W.astype(np.float16)
    n16 = cold_copies(W16.nbytes, args.cold_bytes)
    dense16 = [W16] + [W16.copy() for _ in range(n16 - 1)]
    tq = []
    if torch is not None:
        q = make_torch_int8(W)
        nq = cold_copies(m * n, args.cold_bytes)  # int8 weights: 1 byte each
        tq = [q] + [copy.deepcopy(q) for _ in range(nq - 1)]
        xt = {b: torch.from_numpy(x.reshape(-1, n)) for b, x in xs.items()}  # shares x's memory
    buf = np.empty((m, n), np.float32)
    buf.fill(0.0)  # decompress peer's reused output, pages touched now
    print(
        f"\n[{m}x{n}] setup {time.perf_counter() - t_setup:.1f} s: numpy f32 {n32} copies "
        f"({fmt_bytes(n32 * W.nbytes)}), f16 {n16} copies, torch int8 {len(tq)} copies; "
        f"numpy layouts: " + ", ".join(f"b{b}: {layout_label(layout[b], b)}" for b in batches),
        flush=True,
    )

    rows = []
    for salient, bits, bs in configs:
        tc = time.perf_counter()
        t = pbcodec.compress(W, salient=salient, salient_bits=bits)
        t_comp = time.perf_counter() - tc
        npb = cold_copies(t.nbytes, args.cold_bytes)
        blob = t.to_bytes()
        pbs = [t] + [pbcodec.PBTensor.from_bytes(blob) for _ in range(npb - 1)]
        del blob
        assert pbs[-1] == t
        cfg = f"{salient:.0%}/{bits}b"
        print(
            f"  {cfg}: compress {t_comp:.2f} s, {t.bits_per_weight:.3f} bits/w, {npb} copies "
            f"({fmt_bytes(npb * t.nbytes)})",
            flush=True,
        )
        for b in bs:
            x = xs[b]
            # --- correctness, before any timing ---
            y_pb = pbs[0].matvec(x).reshape(-1, m)
            y_dec = (t.decompress(out=buf) @ x.reshape(-1, n).T).T
            err_dec = rel_err(y_pb, y_dec)
            if not err_dec < VERIFY_TOL:
                raise SystemExit(f"pbcodec matvec != decompress()@x: rel err {err_dec:.2e} ({m}x{n} {cfg} b{b})")
            errs = {PB: rel_err(y_pb, ref[b]), DEC: rel_err(y_dec, ref[b])}
            # numpy f16 on the first 256 rows only (a full f16 product costs up to seconds)
            errs[SLOW] = rel_err(np.matmul(W16[:256], x16[b].reshape(-1, n).T).T, ref[b].reshape(-1, m)[:, :256])
            # --- candidates: (cold cycler, hot fn) ---
            peers = {}
            y = np.empty((b, m) if b > 1 else (m,), np.float32)
            pb_fns = [partial(tt.matvec, x, out=y) for tt in pbs]
            for f in pb_fns:  # warm every copy once (also builds its cached float32 scales)
                f()
            peers[PB] = (Cycler(pb_fns), pb_fns[0])
            lay = layout[b]
            mats = dense["Wt" if lay == "x @ Wt" else "W"]
            f32, outs = zip(*(np_product(lay, M, x) for M in mats), strict=False)
            f32 = list(f32)
            f32[-1]()
            errs[NP32] = rel_err(outs[-1].T if lay == "W @ x.T" else outs[-1], ref[b])  # a copy: checks it too
            del outs
            peers[NP32] = (Cycler(f32), f32[0])
            f16 = [np_product("W @ x.T", M, x16[b])[0] for M in dense16]
            peers[SLOW] = (Cycler(f16), f16[0])

            prod_buf = np_product(layout_mn[b], buf, x)[0]
            dec = [partial(_decompress_then, tt, buf, prod_buf) for tt in pbs]
            peers[DEC] = (Cycler(dec, start=len(dec) // 2), dec[0])  # half a cycle away from pbcodec's copy
            if tq:
                xb = xt[b]
                tqf = [partial(qq, xb) for qq in tq]
                errs[TQ] = rel_err(tq[0](xb).numpy(), ref[b])
                peers[TQ] = (Cycler(tqf), tqf[0])
            cold = run_rounds(peers, hot=False, rounds=args.rounds, budget_s=args.budget, min_n=args.min_n)
            hot = run_rounds(peers, hot=True, rounds=args.hot_rounds, budget_s=args.budget, min_n=args.min_n)
            key = (m, n, salient, bits, b)
            results[key] = {
                "cold": cold,
                "hot": hot,
                "nbytes": t.nbytes,
                "bpw": t.bits_per_weight,
                "errs": errs,
                "err_dec": err_dec,
            }
            bpw = {
                PB: t.bits_per_weight,
                NP32: 32.0,
                SLOW: 16.0,
                DEC: t.bits_per_weight,
                TQ: 8.0,
            }  # int8 weights + one per-tensor scale/zero point
            pc, ph = cold[PB].median, hot[PB].median
            for name in peers:
                c, h = cold[name].median, hot[name].median
                label = name if name != NP32 else f"{name} ({layout_label(lay, b)})"
                if name == DEC:
                    label = f"{name} ({layout_label(layout_mn[b], b).replace('W', 'Ŵ')})"
                rows.append(
                    [
                        cfg,
                        str(b),
                        label,
                        f"{bpw[name]:.2f}",
                        ms(c),
                        "-" if name == PB else fmt_ratio(c / pc),
                        ms(h),
                        "-" if name == PB else fmt_ratio(h / ph),
                        f"{m * n / c / 1e9:.1f}",
                        f"{cold[name].spread:.0%}",
                        f"{len(cold[name].samples)}/{len(hot[name].samples)}",
                        f"{errs[name]:.1e}" if name in errs else "-",
                    ]
                )
            print(
                f"    b{b}: pbcodec cold {ms(pc)} ms, hot {ms(ph)} ms; numpy f32 cold {ms(cold[NP32].median)} ms "
                f"(x{cold[NP32].median / pc:.2f})",
                flush=True,
            )
            del peers, pb_fns, f32, f16, dec
        del pbs, t
        gc.collect()
    notes = [
        "cold/hot: median ms per call; vs pb = peer time / pbcodec time, same measurement (>1: pbcodec faster).",
        "Gw/s = m*n / cold time / 1e9. noise = IQR/median (cold). n = samples cold/hot.",
        "rel err = ||y - W@x|| / ||W@x|| vs float32 W (numpy f16: first 256 output rows).",
        f"pbcodec vs decompress()@x (required < {VERIFY_TOL:g}): max rel err "
        + f"{max(r['err_dec'] for k, r in results.items() if k[:2] == (m, n)):.1e}.",
        "numpy f32 hot: the matrix (>= 64 MiB) exceeds the 32 MiB L3, so it is DRAM-bound too.",
    ]
    if torch is None:
        notes.append("torch not installed: torch int8 peer skipped.")
    print_table(
        f"y = Ŵx, {m}x{n} (out x in), {args.threads} threads",
        ["config", "batch", "peer", "bits/w", "cold ms", "vs pb", "hot ms", "vs pb", "Gw/s", "noise", "n", "rel err"],
        rows,
        notes,
        left=3,
    )
    del W, dense, dense16, tq, buf, W16
    gc.collect()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="4096x4096 only, 10%%/8-bit, fewer samples (< ~60 s)")
    ap.add_argument("--full", action="store_true", help="whole grid: salient {5,10}%% x bits {8,4} x batch {1,4,16}")
    ap.add_argument("--shapes", default=None, help=f"comma-separated MxN list (default {DEFAULT_SHAPES})")
    ap.add_argument(
        "--threads",
        type=int,
        default=pbcodec.get_num_threads(),
        help="threads for pbcodec, OpenBLAS and torch (default: pbcodec's default, all cores)",
    )
    ap.add_argument(
        "--lib-defaults",
        action="store_true",
        help="keep OpenBLAS' and OpenMP's spin-waiting idle threads (see LIB_ENV)",
    )
    ap.add_argument("--cold-mib", type=int, default=COLD_BYTES // MIB, help="cold working set per candidate (MiB)")
    args = ap.parse_args(argv)
    args.cold_bytes = args.cold_mib * MIB
    shapes_s = args.shapes or ("4096x4096" if args.quick else DEFAULT_SHAPES)
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in shapes_s.split(",") if s]
    if args.quick:
        configs = [(0.10, 8, (1, 4, 16))]
        args.rounds, args.hot_rounds, args.budget, args.min_n, args.trial_n = 12, 4, 0.25, 5, 3
    else:
        if args.full:
            configs = [(s, b, (1, 4, 16)) for s in (0.10, 0.05) for b in (8, 4)]
        else:
            configs = [(0.10, 8, (1, 4, 16)), (0.05, 8, (1,)), (0.10, 4, (1,))]
        args.rounds, args.hot_rounds, args.budget, args.min_n, args.trial_n = 40, 10, 1.0, 5, 5

    pbcodec.set_num_threads(args.threads)
    if threadpool_limits is not None:
        threadpool_limits(limits=args.threads, user_api="blas")
    if torch is not None:
        torch.set_num_threads(args.threads)
        torch.set_grad_enabled(False)

    t_start = time.perf_counter()
    print(
        f"bench_matvec: {cpu_name()}, {os.cpu_count()} logical CPUs, threads={args.threads}, "
        f"pbcodec {pbcodec.__version__} simd={pbcodec.simd_level()}, numpy {np.__version__}, "
        + (
            f"torch {torch.__version__} (quantized engine {torch.backends.quantized.engine})"
            if torch is not None
            else "torch NOT installed (torch int8 peer skipped)"
        )
    )
    if threadpool_limits is None:
        print("threadpoolctl missing: OpenBLAS uses its default thread count")
    in_effect = all(os.environ.get(k) == v for k, v in LIB_ENV.items())
    print(
        "library settings: "
        + ", ".join(f"{k}={os.environ.get(k, '(unset)')}" for k in LIB_ENV)
        + (
            " (idle threads sleep; see LIB_ENV)"
            if in_effect
            else " (library defaults: idle BLAS/OpenMP threads spin; run via `pbcodec bench` or"
            " benches/bench_matvec.py for side-by-side timings)"
        )
    )
    print(f"load average at start: {tuple(round(v, 2) for v in os.getloadavg())}")
    ticks0, cpu0 = cpu_ticks(), os.times()
    cold_note = "" if args.cold_bytes >= COLD_BYTES else " (reduced from 256 MiB: cold numbers are less cold)"
    print(
        f"same x for every call and candidate; cold working set per candidate >= "
        f"{fmt_bytes(args.cold_bytes)}{cold_note}; "
        f"cold: up to {args.rounds} samples, hot: up to {args.hot_rounds}x{HOT_INNER}, "
        f"<= {args.budget:g} s per candidate and measurement (min {args.min_n} samples; numpy f16 min 1)"
    )

    bw0 = copy_bandwidth(max(args.cold_bytes, COLD_BYTES), 5)
    print(
        f"np.copyto read bandwidth (start): {statistics.median(bw0) / 1e9:.1f} GB/s read "
        f"(= {2 * statistics.median(bw0) / 1e9:.1f} GB/s read+write)",
        flush=True,
    )

    results: dict = {}
    for m, n in shapes:
        bench_shape(m, n, configs, args, results)

    bw1 = copy_bandwidth(max(args.cold_bytes, COLD_BYTES), 5)
    bw = statistics.median(bw0 + bw1)

    # --- compress time and size of a Gaussian 4096x4096 ---
    Wg = np.random.default_rng(7).standard_normal((4096, 4096), dtype=np.float32)
    tcs = []
    for _ in range(3):
        t0 = time.perf_counter()
        tg = pbcodec.compress(Wg, salient=0.1, salient_bits=8)
        tcs.append(time.perf_counter() - t0)
    t_comp, bpw_g = statistics.median(tcs), tg.bits_per_weight
    del Wg, tg

    # --- roofline ---
    rows = []
    for (m, n, s, bits, b), r in results.items():
        roof = r["nbytes"] / bw
        c, h = r["cold"][PB].median, r["hot"][PB].median
        gemv_bw = 4 * m * n / r["cold"][NP32].median  # what numpy's own cold GEMV streams, same measurement
        rows.append(
            [
                f"{m}x{n}",
                f"{s:.0%}/{bits}b",
                str(b),
                fmt_bytes(r["nbytes"]),
                ms(roof),
                ms(c),
                f"{roof / c:.0%}",
                ms(h),
                f"{roof / h:.0%}",
                f"{r['nbytes'] / c / 1e9:.1f}",
                f"{gemv_bw / 1e9:.1f}",
                f"{r['nbytes'] / gemv_bw / c:.0%}",
            ]
        )
    print_table(
        "Roofline: compressed bytes / copy read bandwidth",
        [
            "shape",
            "config",
            "batch",
            "t.nbytes",
            "roof ms",
            "cold ms",
            "% roof",
            "hot ms",
            "hot % roof",
            "cold GB/s",
            "f32 GB/s",
            "% f32 roof",
        ],
        rows,
        [
            f"read bandwidth = bytes read / time of a single-threaded np.copyto of "
            f"{fmt_bytes(max(args.cold_bytes, COLD_BYTES))}: start {statistics.median(bw0) / 1e9:.1f}, "
            f"end {statistics.median(bw1) / 1e9:.1f}, used (median of all) {bw / 1e9:.1f} GB/s "
            f"(copy traffic read+write = 2x).",
            "% roof = roofline time / measured time; cold GB/s = t.nbytes / cold time.",
            "f32 GB/s = dense float32 bytes / numpy f32 cold time (same measurement): the read bandwidth numpy's",
            "GEMV reaches; % f32 roof = pbcodec's cold time against that (stricter) roofline.",
        ],
        left=3,
    )

    # --- batch scaling ---
    rows = []
    for (m, n, s, bits, b), r in results.items():
        if b != 1 or (m, n, s, bits, 16) not in results:
            continue
        for name in (PB, NP32, DEC, TQ):
            if name not in r["cold"]:
                continue
            row = [f"{m}x{n}", f"{s:.0%}/{bits}b", name]
            for mode in ("cold", "hot"):
                t1 = r[mode][name].median
                for bb in (4, 16):
                    k = (m, n, s, bits, bb)
                    row.append(fmt_ratio(results[k][mode][name].median / t1) if k in results else "-")
            rows.append(row)
    if rows:
        print_table(
            "Batch scaling: time(batch b) / time(batch 1)",
            ["shape", "config", "peer", "cold b4", "cold b16", "hot b4", "hot b16"],
            rows,
            left=3,
        )

    # --- targets ---
    print("Targets (batch 1, 10% salient, 8-bit, cold):")
    ok_all = True

    def check(label: str, ok: bool, value: str) -> None:
        nonlocal ok_all
        ok_all &= ok
        print(f"  [{'MET ' if ok else 'MISS'}] {label}: {value}")

    for m, n in shapes:
        k1, k16 = (m, n, 0.10, 8, 1), (m, n, 0.10, 8, 16)
        if k1 not in results:
            continue
        r = results[k1]
        pc = r["cold"][PB].median
        sp = r["cold"][NP32].median / pc
        check(f"{m}x{n} >= 4x numpy f32", sp >= 4, f"{sp:.2f}x (stretch 8x: {'met' if sp >= 8 else 'missed'})")
        if TQ in r["cold"]:
            st = r["cold"][TQ].median / pc
            check(f"{m}x{n} >= 1.5x torch int8", st >= 1.5, f"{st:.2f}x")
        else:
            print(f"  [skip] {m}x{n} torch int8: torch not installed")
        roof = r["nbytes"] / bw / pc
        check(f"{m}x{n} >= 50% of roofline", roof >= 0.5, f"{roof:.0%}")
        if k16 in results:
            sc = results[k16]["cold"][PB].median / pc
            check(f"{m}x{n} batch 16 <= 4x batch 1", sc <= 4, f"{sc:.2f}x")
    check("compress 4096x4096 Gaussian <= 0.5 s (median of 3)", t_comp <= 0.5, f"{t_comp:.3f} s")
    check("bits/weight 4096x4096 Gaussian 10%/8-bit <= 2.35", bpw_g <= 2.35, f"{bpw_g:.3f}")
    wall = time.perf_counter() - t_start
    ticks1, cpu1 = cpu_ticks(), os.times()
    ours = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    others = max(0.0, (ticks1[0] - ticks0[0]) - ours)
    steal = ticks1[1] - ticks0[1]
    print(
        f"\nall targets met: {ok_all}. total {wall:.0f} s, peak RSS {fmt_bytes(peak_rss())}, "
        f"load average at end: {tuple(round(v, 2) for v in os.getloadavg())}"
    )
    print(
        f"CPU time during the run: this process {ours:.0f} s, other processes {others:.1f} s "
        f"({others / wall:.2f} cores on average), steal {steal:.1f} s"
    )


if __name__ == "__main__":
    main()
