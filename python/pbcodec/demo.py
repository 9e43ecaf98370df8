"""`pbcodec demo`: compress seeded, LLM-like synthetic layers and report size,
accuracy and fused-matvec speed against numpy float32 (well under a minute)."""

from __future__ import annotations

import time

import numpy as np

from . import compress, get_num_threads, snr_db

# (name, out_features, in_features): a small transformer block's projections.
LAYERS = [
    ("attn.qkv", 3072, 1024),
    ("attn.out", 1024, 1024),
    ("mlp.up", 2816, 1024),
    ("mlp.down", 1024, 2816),
]


def synthetic_layer(rng: np.random.Generator, m: int, n: int) -> np.ndarray:
    """Heavy-tailed weights (Student-t, 4 dof) with a few high-magnitude input
    channels, as LLM weight matrices have."""
    w = rng.standard_t(4, size=(m, n)) * (0.5 / np.sqrt(n))
    hot = rng.choice(n, size=max(1, n // 200), replace=False)
    w[:, hot] *= 8.0
    return w.astype(np.float32)


def numpy_best_time(f, repeats: int = 15) -> float:
    """numpy's time at its best BLAS thread count (1 or the default): OpenBLAS's
    threading can be far slower than one thread on small or shared machines.
    Needs threadpoolctl (``pip install "pbcodec[bench]"``); else the default."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return _median_time(f, repeats)
    with threadpool_limits(limits=1, user_api="blas"):
        one = _median_time(f, repeats)
    return min(one, _median_time(f, repeats))


def _median_time(f, repeats: int = 15) -> float:
    f()  # warm up
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def run(seed: int = 0, salient: float = 0.1, salient_bits: int = 8) -> None:
    rng = np.random.default_rng(seed)
    print(
        f"pbcodec demo: {len(LAYERS)} synthetic layers, salient={salient}, "
        f"salient_bits={salient_bits}, threads={get_num_threads()}\n"
    )
    head = f"{'layer':<10} {'shape':>12} {'bits/w':>7} {'size':>9} {'SNR dB':>7} {'compress':>9} {'matvec':>9} {'numpy f32':>9} {'speedup':>8}"
    print(head)
    print("-" * len(head))
    total_in = total_out = 0
    for name, m, n in LAYERS:
        w = synthetic_layer(rng, m, n)
        t0 = time.perf_counter()
        t = compress(w, salient=salient, salient_bits=salient_bits)
        tc = time.perf_counter() - t0
        x = rng.standard_normal(n).astype(np.float32)
        y = t.matvec(x)
        ref = t.decompress().astype(np.float64) @ x
        assert np.max(np.abs(y - ref)) <= 1e-4 * np.max(np.abs(ref)), "fused matvec disagrees with decompress"
        t_pb = _median_time(lambda: t.matvec(x))
        t_np = numpy_best_time(lambda: w @ x)
        total_in += w.nbytes
        total_out += t.nbytes
        print(
            f"{name:<10} {f'{m}x{n}':>12} {t.bits_per_weight:7.3f} {t.nbytes / 2**20:7.2f}MB "
            f"{snr_db(w, t.decompress()):7.2f} {tc * 1e3:7.0f}ms {t_pb * 1e6:7.0f}us {t_np * 1e6:7.0f}us {t_np / t_pb:7.2f}x"
        )
    print(
        f"\ntotal: {total_in / 2**20:.1f} MB float32 -> {total_out / 2**20:.2f} MB "
        f"({total_in / total_out:.1f}x smaller, {8 * total_out / (total_in / 4):.3f} bits/weight)"
    )
    print(
        "matvec and numpy times: medians of repeated calls on one matrix (in cache; numpy at its"
        " best BLAS thread count). `pbcodec bench` runs the cold, side-by-side benchmark."
    )
