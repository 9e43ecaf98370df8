"""Partially-binarized tensors: compress, decompress, decode-fused matvec
(docs/format.md §6-7)."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _core
from ._parts import PBArrays, PBMeta, PBParts
from ._util import c_aligned, check_disjoint, count_bits_arg, prepare_out, unshared
from .errors import FormatError
from .rle import RLE

_SCALE_BITS = {np.dtype(np.float16): 16, np.dtype(np.float32): 32}
_F32 = np.dtype(np.float32)


def _scale_dtype(x: Any) -> np.dtype:
    try:
        dt = np.dtype(x)
    except TypeError:
        raise ValueError(f"scale_dtype must be 'float16' or 'float32', got {x!r}") from None
    if dt not in _SCALE_BITS:
        raise ValueError(f"scale_dtype must be 'float16' or 'float32', got {dt}")
    return dt


def _as_weight(weight: Any) -> np.ndarray:
    """2-D float32, C-contiguous. float16 converts exactly, float64 is rounded
    to float32; torch tensors (any float dtype, incl. bfloat16) go through ``.float()``."""
    if type(weight).__module__.startswith("torch"):
        weight = weight.detach().cpu().float().numpy()
    w = np.asarray(weight)
    if w.dtype.kind != "f":
        raise TypeError(f"weight must be a float array (float32/float16), got dtype {w.dtype}")
    if w.ndim != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {w.shape}")
    return c_aligned(np.ascontiguousarray(w, dtype=np.float32))


class PBTensor:
    """A partially-binarized matrix ``Ŵ = B + S`` (docs/format.md §6).

    Attributes
    ----------
    shape : (m, n)
    signs : uint8 ``(m, ceil(n/8))``, packed sign plane (bit 1 = -1).
    mu, alpha : float16/float32 ``(m, n_groups)``, per row/group shift and scale.
    sigma : float16/float32 ``(m,)``, per-row residual scale.
    residual : :class:`RLE` of shape ``(m, n)``, residual codes (value_bits = salient_bits).
    group_size : int, columns per group.
    """

    __slots__ = ("shape", "signs", "mu", "alpha", "sigma", "residual", "group_size", "_cache", "_layout")
    _cache: tuple[np.ndarray, np.ndarray, np.ndarray] | None

    def __init__(
        self,
        shape: tuple[int, int],
        signs: np.ndarray,
        mu: np.ndarray,
        alpha: np.ndarray,
        sigma: np.ndarray,
        residual: RLE,
        group_size: int,
    ) -> None:
        m, n = (int(d) for d in shape)
        dt = _scale_dtype(np.asarray(mu).dtype)
        if int(group_size) < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        ng = 0 if n == 0 else -(-n // int(group_size))
        object.__setattr__(self, "_cache", None)
        object.__setattr__(self, "_layout", None)

        def frozen(a: Any, dtype: Any, shape: tuple) -> np.ndarray:
            # Aligned, contiguous, and a read-only view: matvec caches float32
            # scales, so in-place edits must not go unnoticed (reassign instead).
            v = np.require(a, dtype=dtype, requirements=["C", "A"]).reshape(shape).view()
            v.flags.writeable = False
            return v

        self.shape = (m, n)
        self.signs = frozen(signs, np.uint8, (m, (n + 7) // 8))
        self.mu = frozen(mu, dt, (m, ng))
        self.alpha = frozen(alpha, dt, (m, ng))
        self.sigma = frozen(sigma, dt, (m,))
        if not isinstance(residual, RLE):
            raise TypeError("residual must be a pbcodec.RLE")
        self.residual = residual
        self.group_size = int(group_size)

    def __setattr__(self, name: str, value: Any) -> None:
        # Parts changed: drop the float32 scales and the execution layout.
        object.__setattr__(self, "_cache", None)
        object.__setattr__(self, "_layout", None)
        object.__setattr__(self, name, value)

    def _exec_layout(self) -> Any:
        """The execution layout (built on first use, kept until :meth:`release_layout`)."""
        lay = self._layout
        if lay is None:
            lay = _core.pb_layout(*self._parts())
            object.__setattr__(self, "_layout", lay)
        return lay

    def build_layout(self) -> PBTensor:
        """Build the in-memory execution layout now (docs/format.md §6.5) instead of on
        the first ``matvec``; returns ``self``. Its size is
        ``stats()["layout_bytes"]`` (about 2.9 bits/weight at 10 % salient). ValueError
        if the int8 mode cannot run this tensor (group size not a multiple of 64)."""
        if not self._exec_layout().int8_supported:
            object.__setattr__(self, "_layout", None)
            raise ValueError(
                "int8 activations need a group size that is a multiple of 64 (or one group per row); "
                f"this tensor has group_size {self.group_size}"
            )
        return self

    def release_layout(self) -> None:
        """Drop the execution layout (for tensors that are only stored, not multiplied);
        the next ``matvec`` rebuilds it."""
        object.__setattr__(self, "_layout", None)

    # -- derived ---------------------------------------------------------
    @property
    def salient_bits(self) -> int:
        return self.residual.value_bits

    @property
    def scale_dtype(self) -> np.dtype:
        return self.mu.dtype

    @property
    def nbytes(self) -> int:
        """Exact length of :meth:`to_bytes`."""
        return int(_core.pb_nbytes(*self._parts()))

    @property
    def bits_per_weight(self) -> float:
        """``8 * nbytes / (m * n)``: everything counted (header, scales, index, checksums)."""
        m, n = self.shape
        return 8.0 * self.nbytes / (m * n) if m * n else 0.0

    def _parts(self) -> PBParts:
        """The parts in the core's form (float32 scales, cached until a part changes)."""
        cache = self._cache
        if cache is None:
            mu, alpha, sigma = (
                np.ascontiguousarray(a, dtype=np.float32).ravel() for a in (self.mu, self.alpha, self.sigma)
            )
            cache = (mu, alpha, sigma)
            object.__setattr__(self, "_cache", cache)
        r = self.residual
        m, n = self.shape
        return PBParts(
            PBMeta(m, n, self.group_size, _SCALE_BITS[self.mu.dtype], r.count_bits, r.value_bits),
            PBArrays(
                np.ascontiguousarray(self.signs).ravel(),
                *cache,
                r.counts,
                r.values.view(np.uint8),
                r.code_offsets,
                r.value_offsets,
            ),
        )

    # -- operations --------------------------------------------------------
    def decompress(self, dtype: Any = np.float32, *, out: np.ndarray | None = None) -> np.ndarray:
        """Rebuild ``Ŵ`` ``(m, n)`` (float32 arithmetic, §6.2), returned as ``dtype``."""
        dt = np.dtype(dtype)
        if dt.kind != "f":
            raise TypeError(f"decompress dtype must be a float dtype, got {dt}")
        if dt == np.float32:
            res = prepare_out(out, self.shape, np.float32)
            check_disjoint(out, self._parts().arrays, "compressed data")
            _core.pb_decompress(*self._parts(), res)
            return res
        full = np.empty(self.shape, np.float32)
        _core.pb_decompress(*self._parts(), full)
        res = prepare_out(out, self.shape, dt)
        res[...] = full
        return res

    def matvec(self, x: Any, out: np.ndarray | None = None, *, activations: str = "float32") -> np.ndarray:
        """``y = x @ Ŵ.T`` from the compressed data, without building ``Ŵ``.

        x: float32 ``(n,)`` or ``(batch, n)`` (other float dtypes are converted).
        Returns float32 ``(m,)`` or ``(batch, m)``. All rows of the batch share one
        pass over the weights; multi-threaded over rows (:func:`pbcodec.set_num_threads`),
        GIL released, identical results for any thread count.

        activations: ``"float32"`` (default): float32 arithmetic on ``x`` as given, on the
        execution layout (built on the first call and kept, see :meth:`build_layout`; the
        sign plane through 16-entry tables of partial sums per 4 columns, as in T-MAC);
        tensors whose group size is not a multiple of 4 use a row-wise kernel instead.
        ``"int8"``: ``x`` is quantized per block of 64 columns (symmetric, one float32
        scale per block) and the products are exact integer dot products on the
        execution layout (built on first use, see :meth:`build_layout`), combined in
        float32 in the fixed order of docs/format.md §6.4, so the result is the same
        on every SIMD level and equals ``pbcodec.reference`` bit for bit; the error
        against the float32 mode is that of int8 activations (normalized squared
        error ~3e-5 on Gaussian inputs). Method: per-block int8 activations as in
        llama.cpp's Q8_0 and bitnet.cpp. Needs ``group_size`` a multiple of 64 or one
        group per row (ValueError otherwise). A block of ``x`` holding inf/NaN makes
        that row's outputs NaN.
        """
        m, n = self.shape
        lay = self._layout
        if (
            type(x) is np.ndarray
            and out is None
            and lay is not None
            and x.dtype is _F32
            and x.ndim == 1
            and x.shape[0] == n
            and x.flags.c_contiguous
            and x.flags.aligned
        ):
            # The common call (one float32 vector, layout built): ~1 µs of Python.
            res = np.empty(m, np.float32)
            self._matvec_into(x, 1, res, activations)
            return res
        xa = np.asarray(x)
        if xa.dtype != np.float32:
            if xa.dtype.kind != "f":
                raise TypeError(f"x must be a float array, got dtype {xa.dtype}")
            xa = xa.astype(np.float32)
        if xa.ndim not in (1, 2) or xa.shape[-1] != n:
            raise ValueError(f"x must have shape ({n},) or (batch, {n}), got {xa.shape}")
        xa = c_aligned(xa)
        batch = 1 if xa.ndim == 1 else xa.shape[0]
        res = prepare_out(out, (m,) if xa.ndim == 1 else (batch, m), np.float32)
        xa = unshared(xa, out)  # matvec(x, out=x): x is read while out is written
        self._matvec_into(xa, batch, res, activations)
        return res

    def _matvec_into(
        self,
        x: np.ndarray,
        batch: int,
        res: np.ndarray,
        activations: str,
        bias: np.ndarray | None = None,
        build_layout: bool = True,
    ) -> None:
        """The kernel choice of :meth:`matvec` (also PBLinear's): ``res = x @ Ŵ.T (+ bias)``
        for prepared float32 arrays. int8 always runs on the execution layout; float32 on
        the layout when it exists (built here unless ``build_layout`` is false) and its
        group size allows, else on the row-wise kernel."""
        if activations == "int8":
            _core.pb_matvec_int8(self._exec_layout(), x, batch, res, bias)
            return
        if activations != "float32":
            raise ValueError(f"activations must be 'float32' or 'int8', got {activations!r}")
        lay = self._exec_layout() if build_layout else self._layout
        if lay is not None and lay.f32_supported:
            _core.pb_matvec_layout_f32(lay, x, batch, res, bias)
        else:  # no layout, or group boundaries inside 4-column quads: the row-wise kernel
            _core.pb_matvec(*self._parts(), x, batch, res)
            if bias is not None:
                res += bias

    def to_bytes(self) -> bytes:
        """Serialize (docs/format.md §7): magic, version, parts, embedded RLE, CRC-32C."""
        return _core.pb_to_bytes(*self._parts())

    @classmethod
    def from_bytes(cls, buf: bytes | bytearray | memoryview) -> PBTensor:
        """Parse and validate; raises :class:`pbcodec.FormatError` on anything malformed."""
        return _assemble(PBParts.of(_core.pb_from_bytes(np.frombuffer(buf, dtype=np.uint8))))

    @classmethod
    def from_parts(
        cls,
        shape: tuple[int, int],
        *,
        signs: Any,
        mu: Any,
        alpha: Any,
        sigma: Any,
        counts: Any,
        values: Any,
        code_offsets: Any,
        group_size: int,
        count_bits: int,
        salient_bits: int,
    ) -> PBTensor:
        """Build from raw component arrays (a file's tensors, a state_dict) and
        validate them like :meth:`from_bytes` does: the one validator of compressed
        parts, used by :func:`pbcodec.load_file` and by ``PBLinear.load_state_dict``.

        Every component must have exactly its dtype and shape (docs/format.md §8):
        signs uint8 ``(m, ceil(n/8))``; mu, alpha float16/float32 ``(m, n_groups)`` and
        sigma ``(m,)`` of the same dtype; counts uint8 and values (int8, or uint8
        nibbles for 4-bit) 1-D; code_offsets int64 ``(m + 1,)``. Any mismatch, a
        parameter out of range or content failing the checks of §7 raises
        :class:`FormatError`. Unaligned or non-contiguous inputs are copied; the
        residual's value offsets are recomputed from its codes."""

        def is_int(v: Any) -> bool:
            return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))

        if not (isinstance(shape, (tuple, list)) and len(shape) == 2 and all(is_int(d) and d >= 0 for d in shape)):
            raise FormatError(f"shape must be two non-negative ints, got {shape!r}")
        m, n = (int(d) for d in shape)
        for what, v in (("group_size", group_size), ("count_bits", count_bits), ("salient_bits", salient_bits)):
            if not is_int(v):
                raise FormatError(f"{what} must be an int, got {v!r}")
        g, cb, sb = int(group_size), int(count_bits), int(salient_bits)
        if (m or 1) * (n or 1) >= 1 << 60:
            raise FormatError(f"shape ({m}, {n}) is too large (limit: 2**60 elements)")
        if sb not in (4, 8) or not 1 <= cb <= 8:
            raise FormatError(f"bad residual parameters: count_bits={cb}, salient_bits={sb}")
        if not (g == 1 if n == 0 else 1 <= g <= n):
            raise FormatError(f"group_size {g} out of range for n = {n} (1..n, or 1 when n = 0)")
        ng = 0 if n == 0 else -(-n // g)
        mu_a = np.asarray(mu)
        if mu_a.dtype not in _SCALE_BITS:
            raise FormatError(f"mu must be float16 or float32, got {mu_a.dtype}")
        dt = mu_a.dtype

        def arr(a: Any, dtype: Any, name: str, want: tuple | None) -> np.ndarray:
            a = np.asarray(a)
            if a.dtype != np.dtype(dtype):
                raise FormatError(f"{name} must have dtype {np.dtype(dtype)}, got {a.dtype}")
            if (a.shape != want) if want is not None else (a.ndim != 1):
                raise FormatError(f"{name} has shape {a.shape}, expected {want if want is not None else '1-D'}")
            return np.require(a, requirements=["C", "A"])

        # Shapes first: nothing below is sized by a number the arrays do not back.
        signs_a = arr(signs, np.uint8, "signs", (m, (n + 7) // 8))
        mu_a = arr(mu, dt, "mu", (m, ng))
        alpha_a = arr(alpha, dt, "alpha", (m, ng))
        sigma_a = arr(sigma, dt, "sigma", (m,))
        counts_a = arr(counts, np.uint8, "counts", None)
        vals = arr(values, np.int8 if sb == 8 else np.uint8, "values", None)
        co = arr(code_offsets, np.int64, "code_offsets", (m + 1,))
        parts = PBParts(
            PBMeta(m, n, g, _SCALE_BITS[dt], cb, sb),
            PBArrays(
                signs_a.ravel(),
                mu_a.astype(np.float32).ravel(),
                alpha_a.astype(np.float32).ravel(),
                sigma_a.astype(np.float32),
                counts_a,
                vals.view(np.uint8),
                co,
                np.zeros(m + 1, np.int64),  # recomputed by the validating walk
            ),
        )
        vo = _core.pb_validate(*parts)
        residual = RLE((m, n), cb, sb, counts_a, vals, co, vo)
        # The validated (aligned, contiguous) arrays, not the caller's originals.
        return cls((m, n), signs_a, mu_a, alpha_a, sigma_a, residual, g)

    def stats(self) -> dict:
        """Size breakdown in bits per weight and the codec parameters."""
        m, n = self.shape
        mn = max(m * n, 1)
        r = self.residual
        w = self.mu.dtype.itemsize
        scales = (self.mu.size + self.alpha.size + self.sigma.size) * w
        codes, values = r.counts.nbytes, r.values.nbytes
        other = self.nbytes - self.signs.nbytes - scales - codes - values
        return {
            "shape": self.shape,
            "bits_per_weight": self.bits_per_weight,
            "signs_bpw": 8 * self.signs.nbytes / mn,
            "scales_bpw": 8 * scales / mn,
            "residual_codes_bpw": 8 * codes / mn,
            "residual_values_bpw": 8 * values / mn,
            "index_and_headers_bpw": 8 * other / mn,
            "salient_fraction": r.num_values / mn,
            "salient_bits": self.salient_bits,
            "count_bits": r.count_bits,
            "group_size": self.group_size,
            "scale_dtype": str(self.mu.dtype),
            "nbytes": self.nbytes,
            # The in-memory execution layout (0 until built; see build_layout()).
            "layout_bytes": 0 if self._layout is None else int(self._layout.nbytes),
            "layout_bpw": 0.0 if self._layout is None else 8 * int(self._layout.nbytes) / mn,
        }

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PBTensor):
            return NotImplemented
        return (
            self.shape == other.shape
            and self.group_size == other.group_size
            and self.mu.dtype == other.mu.dtype
            and np.array_equal(self.signs, other.signs)
            and all(
                np.array_equal(getattr(self, a).view(np.uint8), getattr(other, a).view(np.uint8))
                for a in ("mu", "alpha", "sigma")
            )
            and self.residual == other.residual
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"PBTensor(shape={self.shape}, bits_per_weight={self.bits_per_weight:.3f}, "
            f"salient_bits={self.salient_bits}, group_size={self.group_size}, "
            f"salient={self.residual.num_values}/{self.shape[0] * self.shape[1]})"
        )


def _assemble(parts: PBParts) -> PBTensor:
    """A PBTensor over ``parts``, not validated (what the core returns, or parts that were
    validated before): zero-copy where the dtypes allow. Scales may be float32 holding
    exact values of the scale dtype (the core's form) or already of that dtype; values
    may be bytes (the core's form) or int8. ValueError if a part has the wrong size."""
    (m, n, g, scale_bits, cb, vb), a = parts
    dt = np.float16 if scale_bits == 16 else np.float32
    values = a.values.view(np.int8) if vb == 8 and a.values.dtype == np.uint8 else a.values
    residual = RLE((m, n), cb, vb, a.counts, values, a.code_offsets, a.value_offsets)
    scales = (s.astype(dt, copy=False) for s in (a.mu, a.alpha, a.sigma))
    return PBTensor((m, n), a.signs, *scales, residual, g)


def compress(
    weight: Any,
    *,
    salient: float = 0.1,
    salient_bits: int = 8,
    count_bits: int | str = "auto",
    group_size: int | None = None,
    select: str = "row",
    importance: Any = None,
    shift: bool = True,
    scale_dtype: Any = "float16",
) -> PBTensor:
    """Compress a weight matrix ``(out_features, in_features)`` by partial binarization.

    The ``salient`` fraction of largest scores (``|W|``, or ``|W| * importance[j]``)
    keeps a ``salient_bits`` (8 or 4) residual code; every weight gets a sign bit
    with per row/group ``mu``, ``alpha`` (PB-LLM's rule: mean and mean absolute
    deviation of the non-salient weights). ``select="row"`` gives every row the
    same salient count; ``"tensor"`` uses one threshold over the matrix.
    Deterministic: the same input gives the same bytes (docs/format.md §6.1).

    weight: float32/float16 2-D array-like (float64 is rounded to float32; torch
    tensors accepted).
    importance: optional per-input-channel weights ``(in_features,)``, finite, >= 0.
    """
    w = _as_weight(weight)
    m, n = w.shape
    if isinstance(salient, bool) or not isinstance(salient, (int, float, np.floating, np.integer)):
        raise TypeError(f"salient must be a number in [0, 1], got {salient!r}")
    if salient_bits not in (4, 8) or isinstance(salient_bits, bool):
        raise ValueError(f"salient_bits must be 4 or 8, got {salient_bits!r}")
    cb = count_bits_arg(count_bits)
    if select not in ("row", "tensor"):
        raise ValueError(f"select must be 'row' or 'tensor', got {select!r}")
    if group_size is None:
        gs = 0
    else:
        if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)):
            raise TypeError(f"group_size must be an int or None, got {group_size!r}")
        gs = int(group_size)
        if n > 0 and not 1 <= gs <= n:
            raise ValueError(f"group_size must be in 1..{n}, got {gs}")
        gs = gs if n > 0 else 0
    imp = None
    if importance is not None:
        if type(importance).__module__.startswith("torch"):
            importance = importance.detach().cpu().float().numpy()
        imp = c_aligned(np.ascontiguousarray(np.asarray(importance, dtype=np.float32)))
        if imp.shape != (n,):
            raise ValueError(f"importance must have shape ({n},), got {imp.shape}")
    sbits = _SCALE_BITS[_scale_dtype(scale_dtype)]
    res = _core.pb_compress(
        w, m, n, imp, float(salient), int(salient_bits), cb, gs, select == "tensor", bool(shift), sbits
    )
    return _assemble(PBParts.of(res))


def snr_db(weight: Any, weight_hat: Any) -> float:
    """Signal-to-noise ratio in dB: ``10·log10(mean(W²) / mean((W − Ŵ)²))`` (float64).
    ``inf`` when the two are equal."""
    w = np.asarray(weight, dtype=np.float64)
    wh = np.asarray(weight_hat, dtype=np.float64)
    if w.shape != wh.shape:
        raise ValueError(f"shapes differ: {w.shape} vs {wh.shape}")
    err = float(np.mean((w - wh) ** 2)) if w.size else 0.0
    sig = float(np.mean(w**2)) if w.size else 0.0
    if err == 0.0:
        return float("inf")
    return 10.0 * float(np.log10(sig / err)) if sig > 0 else float("-inf")
