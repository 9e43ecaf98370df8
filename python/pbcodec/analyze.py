"""Rate–distortion view of a model's weights (``pbcodec analyze``): for every weight
matrix and every candidate setting, the bits/weight the format needs and the SQNR it
reaches, so one can see which layers to keep at a higher precision (and pass them as
``overrides`` to :func:`pbcodec.torch.compress_model`)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from .pb import compress, snr_db

#: (salient fraction, residual bits) pairs analyzed by default.
DEFAULT_CANDIDATES: tuple[tuple[float, int], ...] = (
    (0.05, 4),
    (0.1, 4),
    (0.2, 4),
    (0.3, 4),
    (0.05, 8),
    (0.1, 8),
    (0.2, 8),
    (0.3, 8),
)


def rate_distortion(
    weights: Iterable[tuple[str, Any]],
    candidates: Sequence[tuple[float, int]] = DEFAULT_CANDIDATES,
    *,
    hessians: Mapping[str, Any] | None = None,
    calibrated: bool = False,
    **compress_kwargs: Any,
) -> list[dict[str, Any]]:
    """Compress every ``(name, weight)`` (2-D float arrays) at each ``(salient,
    salient_bits)`` candidate. Returns one dict per pair: ``name, shape, salient,
    salient_bits, bits_per_weight`` (everything counted) and ``sqnr_db``
    (``10·log10(ΣW² / Σ(W−Ŵ)²)``, :func:`pbcodec.snr_db`).

    hessians: optional ``{name: H}`` with ``H = 2XᵀX`` of the layer's calibration inputs
    (:func:`pbcodec.input_hessian`); then each entry also has ``output_sqnr_db``
    (``10·log10(tr(W H Wᵀ) / tr(E H Eᵀ))``, ``E = W − Ŵ``: the SQNR of the layer's
    *outputs* on that data, which is what the model feels). calibrated: compress with
    :func:`pbcodec.compress_gptq` on those Hessians (needs ``hessians``) instead of
    :func:`pbcodec.compress`. ``compress_kwargs`` (``group_size``, ``select``...) are passed on."""
    if calibrated and hessians is None:
        raise ValueError("calibrated=True needs hessians")
    out = []
    for name, w in weights:
        w32 = np.asarray(w, dtype=np.float32)
        h = None if hessians is None else hessians.get(name)
        if h is not None:
            h = np.asarray(h, dtype=np.float64)
            w64 = w32.astype(np.float64)
            signal = float(np.sum((w64 @ h) * w64))
        for sal, bits in candidates:
            if calibrated and h is not None:
                from .gptq import compress_gptq

                t = compress_gptq(w32, h, salient=sal, salient_bits=bits, **compress_kwargs)
            else:
                t = compress(w32, salient=sal, salient_bits=bits, **compress_kwargs)
            w_hat = t.decompress()
            r = {
                "name": name,
                "shape": tuple(w32.shape),
                "salient": float(sal),
                "salient_bits": int(bits),
                "bits_per_weight": t.bits_per_weight,
                "sqnr_db": snr_db(w32, w_hat),
            }
            if h is not None:
                e = w32.astype(np.float64) - w_hat
                noise = float(np.sum((e @ h) * e))
                r["output_sqnr_db"] = 10.0 * float(np.log10(signal / noise)) if noise > 0 else float("inf")
            out.append(r)
    return out


def suggest_overrides(
    results: Sequence[Mapping[str, Any]], setting: tuple[float, int], margin_db: float = 2.0, key: str = "sqnr_db"
) -> dict[str, dict[str, Any]]:
    """Layers whose SQNR at ``setting`` is more than ``margin_db`` below the median of all
    layers there, each mapped to the cheapest analyzed candidate that reaches the median:
    ``{name: {"salient": s, "salient_bits": b}}``, ready for ``compress_model(overrides=...)``
    (names as analyzed; a file's tensor ``X.weight`` is module ``X``). ``key``: the
    measure compared (``"output_sqnr_db"`` when the results have it)."""
    at = [r for r in results if (r["salient"], r["salient_bits"]) == (float(setting[0]), int(setting[1]))]
    if not at:
        raise ValueError(f"setting {setting} was not analyzed")
    median = float(np.median([r[key] for r in at]))
    out: dict[str, dict[str, Any]] = {}
    for r in at:
        if r[key] < median - margin_db:
            better = sorted(
                (c for c in results if c["name"] == r["name"] and c[key] >= median),
                key=lambda c: c["bits_per_weight"],
            )
            if better:
                out[r["name"]] = {"salient": better[0]["salient"], "salient_bits": better[0]["salient_bits"]}
    return out


def layer_kind(name: str) -> str:
    """The name with every numeric path component replaced by ``*`` (``layer.3.query`` ->
    ``layer.*.query``): layers of the same kind in different blocks."""
    return re.sub(r"(?<=\.)\d+(?=\.)|^\d+(?=\.)", "*", name)


def format_table(results: Sequence[Mapping[str, Any]], key: str = "sqnr_db") -> str:
    """Per layer the SQNR (dB; ``key``: ``"sqnr_db"`` of the weights or
    ``"output_sqnr_db"``) at each candidate; then, per candidate, the bits/weight of all
    layers together and their mean SQNR."""
    cands = list(dict.fromkeys((r["salient"], r["salient_bits"]) for r in results))
    names = list(dict.fromkeys(r["name"] for r in results))
    by = {(r["name"], r["salient"], r["salient_bits"]): r for r in results}
    labels = [f"{s:.0%}/{b}b" for s, b in cands]
    w0 = max([len(n) for n in names] + [len("all layers: bits/w")])
    cw = max(max(len(lab) for lab in labels), 6)
    title = "output SQNR dB" if key == "output_sqnr_db" else "SQNR dB"
    lines = [f"{title:<{w0}}  " + "  ".join(lab.rjust(cw) for lab in labels)]
    for n in names:
        lines.append(f"{n:<{w0}}  " + "  ".join(f"{by[(n, s, b)][key]:{cw}.2f}" for s, b in cands))
    sizes = {n: by[(n, *cands[0])]["shape"][0] * by[(n, *cands[0])]["shape"][1] for n in names}
    total = sum(sizes.values()) or 1
    bpw = [sum(by[(n, s, b)]["bits_per_weight"] * sizes[n] for n in names) / total for s, b in cands]
    mean = [float(np.mean([by[(n, s, b)][key] for n in names])) for s, b in cands]
    lines.append(f"{'all layers: bits/w':<{w0}}  " + "  ".join(f"{v:{cw}.3f}" for v in bpw))
    lines.append(f"{'all layers: mean SQNR':<{w0}}  " + "  ".join(f"{v:{cw}.2f}" for v in mean))
    return "\n".join(lines)


def plot(results: Sequence[Mapping[str, Any]], path: str, key: str = "sqnr_db") -> None:
    """SQNR (dB) against bits/weight, one curve per layer and residual width (solid
    4-bit, dashed 8-bit), coloured by layer kind (:func:`layer_kind`); written as PNG.
    Needs matplotlib (``pip install matplotlib``; ImportError otherwise)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(layer_kind(r["name"]) for r in results))
    colors = {k: plt.get_cmap("tab10")(i % 10) for i, k in enumerate(kinds)}
    fig, ax = plt.subplots(figsize=(9, 6))
    seen: set[str] = set()
    for name in dict.fromkeys(r["name"] for r in results):
        for bits, style in ((4, "-"), (8, "--")):
            pts = sorted(
                (r["bits_per_weight"], r[key]) for r in results if r["name"] == name and r["salient_bits"] == bits
            )
            if not pts:
                continue
            kind = layer_kind(name)
            label = kind if kind not in seen else None
            seen.add(kind)
            ax.plot(*zip(*pts, strict=True), style, marker="o", ms=3, lw=1, color=colors[kind], label=label, alpha=0.7)
    ax.set_xlabel("bits per weight (everything counted)")
    ax.set_ylabel("output SQNR on calibration data (dB)" if key == "output_sqnr_db" else "weight SQNR (dB)")
    ax.set_title("pbcodec rate–distortion per layer (solid: 4-bit residuals, dashed: 8-bit)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
