"""`pbcodec demo`: compress a seeded, LLM-like synthetic model and report size, accuracy
and matrix-vector speed against numpy float32 (and torch's int8 Linear when torch is
installed), the realistic way: a whole model's worth of layers streamed from memory
(cold), plus an in-cache column that says it is in cache. About 30 s."""

from __future__ import annotations

import os
import statistics
import sys
import time

import numpy as np

from . import compress, get_num_threads, snr_db

# (name, out_features, in_features): the projections of one transformer block
# (hidden 1024, MLP 2816); BLOCKS copies make a model of ~280 MiB float32 weights,
# 8x the 32 MiB L3 of the machines this runs on, so a pass streams from DRAM.
LAYERS = [
    ("attn.qkv", 3072, 1024),
    ("attn.out", 1024, 1024),
    ("mlp.up", 2816, 1024),
    ("mlp.down", 1024, 2816),
]
BLOCKS = 7

#: Idle OpenBLAS / OpenMP threads must sleep, not spin, or on a 2-core machine they
#: slow whatever runs next 3-8x (see benches/_env.py); read when numpy loads.
LIB_ENV = {"OPENBLAS_THREAD_TIMEOUT": "4", "OMP_WAIT_POLICY": "PASSIVE"}


def ensure_lib_env(argv: list[str]) -> None:
    """Re-execute this command with :data:`LIB_ENV` set if it is not (numpy is already
    loaded by then, so setting it in-process would be too late)."""
    if all(os.environ.get(k) is not None for k in LIB_ENV) or os.environ.get("PBCODEC_DEMO_REEXEC"):
        return
    env = {**os.environ, **{k: os.environ.get(k, v) for k, v in LIB_ENV.items()}, "PBCODEC_DEMO_REEXEC": "1"}
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "pbcodec", *argv], env)


def synthetic_layer(rng: np.random.Generator, m: int, n: int) -> np.ndarray:
    """Heavy-tailed weights (Student-t, 4 dof) with a few high-magnitude input
    channels, as LLM weight matrices have."""
    w = rng.standard_t(4, size=(m, n)) * (0.5 / np.sqrt(n))
    hot = rng.choice(n, size=max(1, n // 200), replace=False)
    w[:, hot] *= 8.0
    return w.astype(np.float32)


def _median_time(f, repeats: int) -> float:
    f()  # warm up
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def _blas_threads(n: int):
    """A context limiting OpenBLAS to n threads (threadpoolctl, if installed)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=n, user_api="blas")


def run(seed: int = 0, salient: float = 0.1, salient_bits: int = 8) -> None:
    rng = np.random.default_rng(seed)
    threads = get_num_threads()
    print(
        f"pbcodec demo: a synthetic {BLOCKS}-block model ({len(LAYERS)} Linear layers per block), "
        f"salient={salient}, salient_bits={salient_bits}, {threads} threads\n"
    )
    t0 = time.perf_counter()
    dense, packed, rows = [], [], []
    for blk in range(BLOCKS):
        for name, m, n in LAYERS:
            w = synthetic_layer(rng, m, n)
            t = compress(w, salient=salient, salient_bits=salient_bits).build_layout()
            dense.append(w)
            packed.append(t)
            if blk == 0:
                rows.append((name, m, n, t.bits_per_weight, snr_db(w, t.decompress()), t.stats()["layout_bpw"]))
    t_compress = time.perf_counter() - t0
    head = f"{'layer':<10} {'shape':>10} {'bits/w':>7} {'SNR dB':>7} {'in memory':>10}"
    print(head)
    print("-" * len(head))
    for name, m, n, bpw, snr, lbpw in rows:
        print(f"{name:<10} {f'{m}x{n}':>10} {bpw:7.3f} {snr:7.2f} {lbpw:7.2f} b/w")
    f32_bytes = sum(w.nbytes for w in dense)
    pb_bytes = sum(t.nbytes for t in packed)
    print(
        f"\nmodel: {f32_bytes / 2**20:.0f} MiB float32 -> {pb_bytes / 2**20:.1f} MiB pbcodec "
        f"({f32_bytes / pb_bytes:.1f}x smaller, {8 * pb_bytes / (f32_bytes / 4):.3f} bits/weight); "
        f"compress + layout {t_compress:.1f} s"
    )

    # One x per input width; y written in place.
    xs = {n: rng.standard_normal(n).astype(np.float32) for _, _, n in LAYERS}
    ys = [np.empty(w.shape[0], np.float32) for w in dense]
    for t in packed[: len(LAYERS)]:  # both modes agree with decompress() @ x
        for mode, tol in (("float32", 1e-4), ("int8", 3e-2)):
            y = t.matvec(xs[t.shape[1]], activations=mode)
            want = t.decompress().astype(np.float64) @ xs[t.shape[1]]
            err = np.linalg.norm(y - want) / np.linalg.norm(want)
            assert err < tol, f"{mode} matvec disagrees with decompress() @ x: {err:.2e}"

    def model_pass(fn):
        def f():
            for i in range(len(dense)):
                fn(i)

        return f

    cands = {
        "pbcodec int8": model_pass(lambda i: packed[i].matvec(xs[packed[i].shape[1]], out=ys[i], activations="int8")),
        "pbcodec float32": model_pass(lambda i: packed[i].matvec(xs[packed[i].shape[1]], out=ys[i])),
    }
    with _blas_threads(1):
        t1 = _median_time(model_pass(lambda i: np.matmul(dense[i], xs[dense[i].shape[1]], out=ys[i])), 3)
    tn = _median_time(model_pass(lambda i: np.matmul(dense[i], xs[dense[i].shape[1]], out=ys[i])), 3)
    numpy_threads = 1 if t1 < tn else "default"
    cands["numpy float32"] = model_pass(lambda i: np.matmul(dense[i], xs[dense[i].shape[1]], out=ys[i]))
    qlin = _torch_int8(dense, threads)
    if qlin is not None:
        import torch

        xt = {n: torch.from_numpy(x.reshape(1, -1)) for n, x in xs.items()}
        cands["torch int8 Linear"] = model_pass(lambda i: qlin[i](xt[dense[i].shape[1]]))
    cold = {}
    with _blas_threads(1 if numpy_threads == 1 else None):
        for _ in range(3):  # interleaved rounds, medians
            for k, f in cands.items():
                cold.setdefault(k, []).append(_median_time(f, 2))
        cold = {k: statistics.median(v) for k, v in cold.items()}
        # In cache: the first layer only, repeated (its weights stay in L2/L3).
        hot = {}
        t_, w_, x_, y_ = packed[0], dense[0], xs[dense[0].shape[1]], ys[0]
        hot_fns = {
            "pbcodec int8": lambda: t_.matvec(x_, out=y_, activations="int8"),
            "pbcodec float32": lambda: t_.matvec(x_, out=y_),
            "numpy float32": lambda: np.matmul(w_, x_, out=y_),
        }
        if qlin is not None:
            hot_fns["torch int8 Linear"] = lambda: qlin[0](xt[dense[0].shape[1]])
        for k, f in hot_fns.items():
            hot[k] = _median_time(f, 50)
    base = cold["numpy float32"]
    hbase = hot["numpy float32"]
    print(
        f"\nbatch-1 matrix-vector products, median of interleaved runs "
        f"(numpy at its best BLAS thread count: {numpy_threads})"
    )
    head = f"{'':<18} {'cold: model pass':>17} {'vs numpy f32':>13} {'in cache: 1 layer':>18} {'vs numpy f32':>13}"
    print(head)
    print("-" * len(head))
    for k in cold:
        print(
            f"{k:<18} {cold[k] * 1e3:14.2f} ms {base / cold[k]:12.2f}x {hot[k] * 1e6:15.1f} us {hbase / hot[k]:12.2f}x"
        )
    print(
        f"\ncold = one pass over all {len(dense)} layers ({f32_bytes / 2**20:.0f} MiB of float32 weights, more than "
        "the L3 cache: every layer streams from memory, as in a model's forward pass);\n"
        f"in cache = the {LAYERS[0][0]} layer alone, called repeatedly (its weights stay in cache: not a model pass).\n"
        "int8 = activations quantized per block of 64 (docs/format.md §6.4); `pbcodec bench` (from a source\n"
        "checkout) runs the full side-by-side benchmark."
    )


def _torch_int8(dense: list[np.ndarray], threads: int):
    """torch's dynamic-quantized int8 Linear for every layer, or None without torch."""
    try:
        import torch
    except ImportError:
        print("\n(torch not installed: no torch int8 column; pip install 'pbcodec[torch]')")
        return None
    import warnings

    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)  # inference, as for every other peer
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for w in dense:
            # quantize_dynamic swaps a model's children, never the model itself: a bare
            # Linear would stay float32 (the demo once timed exactly that), so wrap it.
            lin = torch.nn.Sequential(torch.nn.Linear(w.shape[1], w.shape[0], bias=False))
            with torch.no_grad():
                lin[0].weight.copy_(torch.from_numpy(w))
            q = torch.ao.quantization.quantize_dynamic(lin, {torch.nn.Linear}, dtype=torch.qint8)
            if "quantized" not in type(q[0]).__module__:
                raise RuntimeError(f"torch did not quantize the Linear layer: got {type(q[0])}")
            out.append(q)
    return out
