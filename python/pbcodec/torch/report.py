"""The report :func:`pbcodec.torch.compress_model` returns."""

from __future__ import annotations

from typing import Any


class CompressionReport:
    """What :func:`compress_model` did: one dict per compressed layer in :attr:`layers`
    (``name, shape, dtype, params, bytes_before, bytes_float32, bytes_after,
    bits_per_weight, snr_db, salient_fraction, activations, notes``; ``notes`` lists the
    settings adapted for that layer), the linear layers left alone in :attr:`skipped` (with
    :attr:`skip_reasons` for those the filter selected but that could not be
    compressed), and totals over the compressed weights (biases and other modules are
    unchanged and not counted). ``str(report)`` renders a table. :attr:`seconds`: wall
    time of the compression, when recorded (calibrated compression records it)."""

    def __init__(
        self, layers: list[dict[str, Any]], skipped: list[str], skip_reasons: dict[str, str] | None = None
    ) -> None:
        self.layers = layers
        self.skipped = skipped
        self.skip_reasons = dict(skip_reasons or {})
        self.seconds: float | None = None

    @property
    def params(self) -> int:
        return sum(L["params"] for L in self.layers)

    @property
    def bytes_before(self) -> int:
        """Size of the original weights in their own dtype."""
        return sum(L["bytes_before"] for L in self.layers)

    @property
    def bytes_float32(self) -> int:
        return sum(L["bytes_float32"] for L in self.layers)

    @property
    def bytes_after(self) -> int:
        """Serialized size of the compressed weights (:attr:`PBTensor.nbytes`)."""
        return sum(L["bytes_after"] for L in self.layers)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.bytes_after / self.params if self.params else 0.0

    @property
    def ratio(self) -> float:
        """``bytes_before / bytes_after`` (original dtype)."""
        return self.bytes_before / self.bytes_after if self.bytes_after else float("nan")

    @property
    def ratio_float32(self) -> float:
        return self.bytes_float32 / self.bytes_after if self.bytes_after else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [dict(L) for L in self.layers],
            "skipped": list(self.skipped),
            "skip_reasons": dict(self.skip_reasons),
            "totals": {
                "layers": len(self.layers),
                "params": self.params,
                "bytes_before": self.bytes_before,
                "bytes_float32": self.bytes_float32,
                "bytes_after": self.bytes_after,
                "bits_per_weight": self.bits_per_weight,
                "ratio": self.ratio,
                "ratio_float32": self.ratio_float32,
            },
        }

    def __str__(self) -> str:
        head = ("layer", "shape", "dtype", "bits/w", "SNR dB", "salient", "before", "after")
        rows = [
            (
                L["name"],
                "x".join(str(d) for d in L["shape"]),
                L["dtype"].replace("torch.", ""),
                f"{L['bits_per_weight']:.3f}",
                f"{L['snr_db']:.2f}",
                f"{L['salient_fraction']:.3f}",
                _fmt_bytes(L["bytes_before"]),
                _fmt_bytes(L["bytes_after"]),
            )
            for L in self.layers
        ]
        total = (
            f"total ({len(self.layers)} layers)",
            f"{self.params:,} params",
            "",
            f"{self.bits_per_weight:.3f}",
            "",
            "",
            _fmt_bytes(self.bytes_before),
            _fmt_bytes(self.bytes_after),
        )
        widths = [max(len(r[i]) for r in [head, total, *rows]) for i in range(len(head))]

        def line(r):
            return "  ".join(
                c.ljust(w) if i in (0, 1, 2) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
            ).rstrip()

        sep = "-" * len(line(head))
        out = [line(head), sep, *(line(r) for r in rows), sep, line(total)]
        if self.layers:
            out.append(
                f"ratio {self.ratio:.2f}x vs original dtype, {self.ratio_float32:.2f}x vs float32 "
                f"({_fmt_bytes(self.bytes_float32)})"
            )
        if self.skipped:
            out.append(f"left dense: {len(self.skipped)} linear layer(s): {', '.join(self.skipped)}")
        for name, why in self.skip_reasons.items():
            out.append(f"  {name}: {why}")
        for L in self.layers:
            for note in L.get("notes", ()):
                out.append(f"note: {L['name']}: {note}")
        return "\n".join(out)

    def __repr__(self) -> str:
        return (
            f"CompressionReport(layers={len(self.layers)}, params={self.params}, "
            f"bits_per_weight={self.bits_per_weight:.3f}, ratio={self.ratio:.2f})"
        )


def layer_row(name: str, w: Any, w32: Any, pbl: Any, **extra: Any) -> dict[str, Any]:
    """One :attr:`CompressionReport.layers` entry: the original weight ``w`` (a tensor),
    its float32 numpy copy ``w32`` and the :class:`PBLinear` made from it, plus ``extra``
    fields."""
    from ..pb import snr_db

    t = pbl.pb
    m, n = t.shape
    return {
        "name": name,
        "shape": (m, n),
        "dtype": str(w.dtype),
        "params": m * n,
        "bytes_before": m * n * w.element_size(),
        "bytes_float32": 4 * m * n,
        "bytes_after": t.nbytes,
        "bits_per_weight": t.bits_per_weight,
        "snr_db": snr_db(w32, t.decompress()),
        "salient_fraction": t.residual.num_values / (m * n) if m * n else 0.0,
        "activations": pbl.activations,
        **extra,
    }


def _fmt_bytes(b: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if b >= size:
            return f"{b / size:.2f} {unit}"
    return f"{b} B"
