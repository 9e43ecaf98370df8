"""§6 the partially-binarized tensor (compression, decompression, both matvec modes
including the normative int8 one of §6.4) and §7 its serialized form (docs/format.md)."""

from __future__ import annotations

import math
import struct

import numpy as np

from ..errors import CorruptError, FormatError, ScaleRangeError, TruncatedError, UnsupportedVersionError
from ._common import _U64_MAX, _is_int, _nonzero_product, _packed_len
from .bitpack import pack_bits, unpack_bits, unpack_signs
from .checksum import _CRC_SIZE, crc32c
from .rle import RLE, _as_index, _validate_rle, _values_as_int8, rle_decode, rle_encode

# ---------------------------------------------------------------------------
# §6 the partially-binarized tensor
# ---------------------------------------------------------------------------

# §7 fixed layout: magic, version u16, dense_bits u8, scale width (bits) u8,
# m u64, n u64, group_size u64, L (residual blob length) u64.
_PBT_MAGIC = b"PBTN"
_PBT_VERSION = 1
_PBT_DENSE_BITS = 1
_PBT_HEADER = struct.Struct("<4sHBBQQQQ")
assert _PBT_HEADER.size == 40

_SCALE_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))
_DECOMPRESS_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def _q_max(salient_bits: int) -> int:
    """§6: largest residual code magnitude, ``Q = 2**(salient_bits-1) - 1``."""
    return (1 << (salient_bits - 1)) - 1


def _n_groups(n: int, group_size: int) -> int:
    """§6/§7: ``ceil(n / group_size)``, 0 when ``n = 0``."""
    return (n + group_size - 1) // group_size if n else 0


def _check_scale_dtype(scale_dtype) -> np.dtype:
    try:
        dt = np.dtype(scale_dtype)
    except TypeError:
        dt = None
    if dt not in _SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be 'float16' or 'float32', got {scale_dtype!r}")
    return dt


def _to_scale(x: np.ndarray, dtype: np.dtype, name: str) -> np.ndarray:
    """§6.1 ``to_scale``: float64 -> float16/float32, round half to even (numpy's casts
    round correctly and directly, with no float32 step for float16). A non-finite
    result (overflow) is a ScaleRangeError."""
    with np.errstate(over="ignore", under="ignore"):
        out = x.astype(dtype)
    if not np.all(np.isfinite(out)):
        raise ScaleRangeError(
            f"{name} overflows {dtype} scales (largest {float(np.max(np.abs(x)))!r}); use scale_dtype='float32'"
        )
    return out


def _sum_left_to_right(x: np.ndarray) -> np.ndarray:
    """§6.1: float64 sum along the last axis, strictly left to right, starting from +0.0.

    ``np.add.accumulate`` is sequential by definition (np.sum/np.mean are pairwise).
    The explicit +0.0 start makes a sum of only ``-0.0`` terms equal ``+0.0`` (as with
    ``acc = 0.0; for v in U: acc += v``); it also makes masked-out ``+0.0`` terms exact
    no-ops, since the accumulator can then never be ``-0.0``.
    """
    start = np.zeros(x.shape[:-1] + (1,), dtype=np.float64)
    return np.add.accumulate(np.concatenate([start, x], axis=-1), axis=-1)[..., -1]


def _grouped(a: np.ndarray, n_groups: int, group_size: int, fill) -> np.ndarray:
    """View ``(m, n)`` as ``(m, n_groups, group_size)``, padding the (shorter) last
    group with ``fill`` on the right."""
    m, n = a.shape
    pad = n_groups * group_size - n
    if pad:
        a = np.concatenate([a, np.full((m, pad), fill, dtype=a.dtype)], axis=1)
    return a.reshape(m, n_groups, group_size)


def _per_column(per_group: np.ndarray, n: int, group_size: int) -> np.ndarray:
    """Broadcast ``(m, n_groups)`` to ``(m, n)``: column ``j`` gets group ``j // group_size``."""
    return np.repeat(per_group, group_size, axis=1)[:, :n]


def _check_weight(weight) -> np.ndarray:
    w = np.asarray(weight)
    if w.dtype.kind != "f":
        raise TypeError(f"compress needs a float32 or float16 weight, got dtype {w.dtype}")
    if w.ndim != 2:
        raise ValueError(f"compress needs a 2-D weight, got shape {w.shape}")
    # float16 -> float32 is exact; other float types (e.g. float64 from a list) are
    # rounded to float32 (half to even) and must still be finite afterwards.
    with np.errstate(over="ignore", invalid="ignore"):
        w = w.astype(np.float32)
    if not np.all(np.isfinite(w)):
        raise ValueError("weight must be finite (no inf/NaN, also after conversion to float32)")
    return w


def _check_importance(importance, n: int) -> np.ndarray:
    imp = np.asarray(importance)
    if imp.dtype.kind not in "iuf":
        raise TypeError(f"importance must be a real array, got dtype {imp.dtype}")
    if imp.shape != (n,):
        raise ValueError(f"importance must have shape ({n},), got {imp.shape}")
    with np.errstate(over="ignore", invalid="ignore"):
        imp = imp.astype(np.float32)
    if not np.all(np.isfinite(imp)) or np.any(imp < 0):
        raise ValueError("importance must be finite and >= 0 (after conversion to float32)")
    return imp


def compress(
    weight,
    *,
    salient=0.1,
    salient_bits=8,
    count_bits="auto",
    group_size=None,
    select="row",
    importance=None,
    shift=True,
    scale_dtype="float16",
) -> PBTensor:
    """Compress a 2-D float matrix to a :class:`PBTensor` (§6.1, step by step).

    weight: 2-D float32 or float16 array-like, shape ``(m, n)``, finite (float16 is
        converted to float32 exactly; another float type is rounded to float32).
    salient: fraction in [0, 1] of positions kept as residual codes.
    salient_bits: 8 (codes -127..127) or 4 (-7..7); the residual RLE's ``value_bits``.
    count_bits: RLE ``count_bits`` (int 1..8) or ``"auto"`` (§3.5).
    group_size: columns per (mu, alpha) group, int in 1..n, or None for ``n``
        (any int when ``n = 0``; stored as 1).
    select: ``"row"`` (k = rne(salient*n) per row) or ``"tensor"``
        (K = rne(salient*m*n) over the whole matrix).
    importance: optional 1-D per-column weights of length n, finite and >= 0 (cast to
        float32); the score becomes ``|W| * importance`` in float32.
    shift: when False every ``mu`` is 0.
    scale_dtype: ``"float16"``/``"float32"`` (or the numpy type / dtype).

    Raises TypeError for a non-float weight (or non-real importance), ValueError for
    bad shapes (more than 2**60 elements, zeros aside) or parameters, non-finite input,
    and ScaleRangeError (a ValueError) for a scale that overflows the scale type, or a
    row with a nonzero weight whose float16 scales all round to zero (use
    ``scale_dtype="float32"``).
    """
    w = _check_weight(weight)
    m, n = w.shape
    if _nonzero_product((m, n)) >= 1 << 60:
        raise ValueError(f"shape ({m}, {n}) is too large (limit: 2**60 elements)")
    if isinstance(salient, (bool, np.bool_)) or not isinstance(salient, (int, float, np.integer, np.floating)):
        raise TypeError(f"salient must be a number in [0, 1], got {salient!r}")
    salient = float(salient)
    if not 0.0 <= salient <= 1.0:  # also rejects NaN
        raise ValueError(f"salient must be in [0, 1], got {salient!r}")
    if not _is_int(salient_bits) or int(salient_bits) not in (4, 8):
        raise ValueError(f"salient_bits must be 4 or 8, got {salient_bits!r}")
    salient_bits = int(salient_bits)
    if not (isinstance(count_bits, str) and count_bits == "auto") and not (
        _is_int(count_bits) and 1 <= int(count_bits) <= 8
    ):
        raise ValueError(f"count_bits must be an int in 1..8 or 'auto', got {count_bits!r}")
    if group_size is None:
        group_size = n
    elif not _is_int(group_size):
        raise ValueError(f"group_size must be None or an int in 1..{n}, got {group_size!r}")
    group_size = int(group_size)
    if n == 0:
        group_size = 1  # §7: stored as 1 when n = 0, whatever was asked
    elif not 1 <= group_size <= n:
        raise ValueError(f"group_size must be in 1..{n}, got {group_size}")
    if select not in ("row", "tensor"):
        raise ValueError(f"select must be 'row' or 'tensor', got {select!r}")
    scale_dtype = _check_scale_dtype(scale_dtype)
    shift = bool(shift)

    # Step 2: score, float32.
    score = np.abs(w)
    if importance is not None:
        score = score * _check_importance(importance, n)  # float32 * float32

    # Step 3: salient mask. A stable sort of -score puts larger scores first and keeps
    # equal scores in index order, so the first k entries are exactly the k largest
    # with ties going to the smaller index. (Negation is exact; -0.0 == +0.0 here.)
    salient_mask = np.zeros((m, n), dtype=bool)
    if select == "row":
        k = round(salient * n)  # float64 product; Python's round() is half to even
        if k:
            cols = np.argsort(-score, axis=1, kind="stable")[:, :k]
            salient_mask[np.arange(m)[:, None], cols] = True
    else:
        big_k = round(salient * (m * n))
        if big_k:
            flat = np.argsort(-score.ravel(), kind="stable")[:big_k]
            salient_mask.ravel()[flat] = True

    # Step 4: per (row, group) mu, alpha over the non-salient columns U; signs for
    # every column. Salient columns enter the left-to-right sums as +0.0 (a no-op).
    w64 = w.astype(np.float64)
    ng = _n_groups(n, group_size)
    keep = ~salient_mask
    if ng:
        c = _grouped(keep, ng, group_size, False).sum(axis=-1).astype(np.float64)
        total = _sum_left_to_right(_grouped(np.where(keep, w64, 0.0), ng, group_size, 0.0))
        mu = np.zeros((m, ng), dtype=np.float64)
        if shift:
            np.divide(total, c, out=mu, where=c > 0)
    else:
        c = np.zeros((m, 0), dtype=np.float64)
        mu = np.zeros((m, 0), dtype=np.float64)
    mu_q = _to_scale(mu, scale_dtype, "mu")
    mu_col = _per_column(mu_q.astype(np.float64), n, group_size)
    if ng:
        dev = np.where(keep, np.abs(w64 - mu_col), 0.0)
        alpha = np.zeros((m, ng), dtype=np.float64)
        np.divide(_sum_left_to_right(_grouped(dev, ng, group_size, 0.0)), c, out=alpha, where=c > 0)
    else:
        alpha = np.zeros((m, 0), dtype=np.float64)
    alpha_q = _to_scale(alpha, scale_dtype, "alpha")
    alpha_col = _per_column(alpha_q.astype(np.float64), n, group_size)
    negative = w64 < mu_col  # s = -1 here; W == mu_q gives s = +1
    s = np.where(negative, -1.0, 1.0)

    # Step 5: residual codes at salient positions, float64.
    big_q = _q_max(salient_bits)
    r = w64 - (mu_col + s * alpha_col)
    max_abs = np.max(np.where(salient_mask, np.abs(r), 0.0), axis=1, initial=0.0)
    sigma_q = _to_scale(max_abs / big_q, scale_dtype, "sigma")
    if scale_dtype == np.float16:
        # §6.1 underflow: a row with a nonzero weight whose scales all round to 0 would
        # decompress to zeros.
        vanished = np.all(mu_q == 0, axis=1) & np.all(alpha_q == 0, axis=1) & (sigma_q == 0) & np.any(w != 0, axis=1)
        if np.any(vanished):
            i = int(np.flatnonzero(vanished)[0])
            raise ScaleRangeError(
                f"row {i}: every float16 scale underflows to 0 (largest |weight| {float(np.max(np.abs(w[i])))!r}); "
                "use scale_dtype='float32'"
            )
    sigma64 = sigma_q.astype(np.float64)[:, None]
    ratio = np.zeros((m, n), dtype=np.float64)
    np.divide(r, sigma64, out=ratio, where=salient_mask & (sigma64 > 0))
    q = np.clip(np.rint(ratio), -big_q, big_q).astype(np.int8)  # rint: half to even

    # Step 6.
    residual = rle_encode(q, count_bits, value_bits=salient_bits)
    return PBTensor(
        shape=(m, n),
        signs=pack_bits(negative.astype(np.uint8), 1),
        mu=mu_q,
        alpha=alpha_q,
        sigma=sigma_q,
        residual=residual,
        group_size=group_size,
    )


def _as_scale_array(x, name) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype.kind != "f" or arr.dtype.itemsize not in (2, 4):
        raise TypeError(f"{name} must be a float16 or float32 array, got dtype {arr.dtype}")
    return arr.astype(arr.dtype.newbyteorder("="))  # copy, native byte order


def _as_uint8_2d(x, name) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(arr.shape, dtype=np.uint8)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got dtype {arr.dtype}")
    out = arr.astype(np.uint8)
    if not np.array_equal(out, arr):
        raise ValueError(f"{name} has values that do not fit uint8")
    return out


def _same_array(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal dtype, shape and bytes (so +0.0 and -0.0 scales differ, as in to_bytes)."""
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# §6.4: width of an activation block (one int8 scale per block of x).
_INT8_BLOCK = 64


def _quantize_int8_blocks(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """§6.4 steps 1-2: quantize each row of float32 ``x`` ``(batch, n)`` per block of 64.

    Returns ``d`` float32 ``(batch, n_blocks)`` (the block scales; NaN for a block
    holding inf/NaN) and ``xq`` int64 ``(batch, n_blocks, 64)`` in -127..127, with
    ``n_blocks = ceil(n/64)``; columns >= n are absent (``x = 0``, ``xq = 0``).
    """
    f32 = np.float32
    batch, n = x.shape
    n_blocks = -(-n // _INT8_BLOCK)
    blocks = np.zeros((batch, n_blocks * _INT8_BLOCK), f32)
    blocks[:, :n] = x
    blocks = blocks.reshape(batch, n_blocks, _INT8_BLOCK)

    finite = np.all(np.isfinite(blocks), axis=2)
    blocks = np.where(finite[..., None], blocks, f32(0))  # non-finite blocks: all xq = 0
    a = np.max(np.abs(blocks), axis=2, initial=f32(0))  # max |x[j]|
    d = a / f32(127)  # float32 division, rounded to nearest even
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = blocks / d[..., None]  # float32 division (inf/NaN only where d == 0)
    # np.rint rounds half to even; clamp to -127..127; d == 0 gives xq = 0.
    xq = np.where(d[..., None] == 0, f32(0), np.clip(np.rint(ratio), -127, 127)).astype(np.int64)
    d = np.where(finite, d, f32(np.nan))
    return d, xq


class PBTensor:
    """A partially-binarized matrix ``Ŵ = B + S`` (§6), in memory.

    Attributes:
        shape: ``(m, n)``.
        signs: uint8 ``(m, ceil(n/8))``, the §2 sign plane (bit 1 means ``s = -1``).
        mu, alpha: scale dtype, ``(m, n_groups)`` with ``n_groups = ceil(n/group_size)``.
        sigma: scale dtype, ``(m,)``.
        residual: :class:`RLE` of shape ``(m, n)`` holding the codes ``q``.
        group_size: int (1 when ``n = 0``).
        salient_bits: ``residual.value_bits``.  scale_dtype: ``mu.dtype``.

    The constructor only normalizes types (shape to a tuple of ints, signs to uint8,
    scales to native-order float16/float32 copies); it does not check consistency, so
    malformed tensors can be built on purpose. :meth:`to_bytes`, :meth:`decompress` and
    :meth:`matvec` validate and raise FormatError.
    """

    __hash__ = None  # mutable arrays inside; equality is by value

    def __init__(self, shape, signs, mu, alpha, sigma, residual, group_size):
        self.shape = tuple(int(_as_index(d, "shape entries")) for d in shape)
        if len(self.shape) != 2:
            raise ValueError(f"PBTensor shape must be (m, n), got {self.shape}")
        self.signs = _as_uint8_2d(signs, "signs")
        self.mu = _as_scale_array(mu, "mu")
        self.alpha = _as_scale_array(alpha, "alpha")
        self.sigma = _as_scale_array(sigma, "sigma")
        if not isinstance(residual, RLE):
            raise TypeError(f"residual must be an RLE, got {type(residual).__name__}")
        self.residual = residual
        self.group_size = int(_as_index(group_size, "group_size"))

    @property
    def salient_bits(self) -> int:
        return self.residual.value_bits

    @property
    def scale_dtype(self) -> np.dtype:
        return self.mu.dtype

    @property
    def nbytes(self) -> int:
        """Exact length of :meth:`to_bytes` (§7)."""
        m, n = self.shape
        w = self.scale_dtype.itemsize
        ng = _n_groups(n, self.group_size)
        return (
            _PBT_HEADER.size
            + m * _packed_len(n, 1)  # sign plane
            + 2 * m * ng * w  # mu, alpha
            + m * w  # sigma
            + self.residual.nbytes
            + _CRC_SIZE
        )

    @property
    def bits_per_weight(self) -> float:
        """``8 * nbytes / (m * n)``; 0.0 for an empty matrix."""
        m, n = self.shape
        return 8 * self.nbytes / (m * n) if m * n else 0.0

    def __eq__(self, other):
        if not isinstance(other, PBTensor):
            return NotImplemented
        return (
            self.shape == other.shape
            and self.group_size == other.group_size
            and all(_same_array(getattr(self, a), getattr(other, a)) for a in ("signs", "mu", "alpha", "sigma"))
            and self.residual == other.residual
        )

    def __repr__(self):
        return (
            f"PBTensor(shape={self.shape}, group_size={self.group_size}, "
            f"salient_bits={self.salient_bits}, scale_dtype={self.scale_dtype}, "
            f"num_salient={self.residual.num_values}, nbytes={self.nbytes})"
        )

    # -- §6.2 / §6.3 --------------------------------------------------------

    def decompress(self, dtype=np.float32) -> np.ndarray:
        """``Ŵ`` of shape ``(m, n)`` (§6.2): in float32, ``B = f32(mu) + s*f32(alpha)``,
        ``S = f32(sigma) * f32(q)``, ``Ŵ = B + S`` (each operation rounded to float32),
        then cast to ``dtype`` (float16, float32 or float64)."""
        dtype = np.dtype(dtype)
        if dtype not in _DECOMPRESS_DTYPES:
            raise TypeError(f"decompress dtype must be float16/float32/float64, got {dtype}")
        _validate_pbtensor(self)
        m, n = self.shape
        s = unpack_signs(self.signs, n, np.float32)
        mu = _per_column(self.mu.astype(np.float32), n, self.group_size)
        alpha = _per_column(self.alpha.astype(np.float32), n, self.group_size)
        b = mu + s * alpha
        q = rle_decode(self.residual).astype(np.float32)
        big_s = self.sigma.astype(np.float32)[:, None] * q
        return (b + big_s).astype(dtype)

    def matvec(self, x, *, activations="float32") -> np.ndarray:
        """``y = Ŵ x`` for x of shape ``(n,)`` -> ``(m,)`` or ``(batch, n)`` ->
        ``(batch, m)``, returned as float32.

        x: a float array (converted to float32 first).

        activations="float32" (default, §6.3): reference semantics only: this computes
        ``x @ decompress().T`` in float64 (numpy/BLAS order) and rounds to float32, so it
        is *not* the kernel's float32 accumulation order; compare with the core to
        ~1e-5 relative, not bitwise.

        activations="int8" (§6.4, normative): per-block (64 columns) int8 quantization
        of ``x``, exact integer dot products, then a float32 combination in the fixed
        order of §6.4, so the result equals the core bit for bit. See
        :meth:`_matvec_int8`. Raises ValueError when ``group_size`` is not a multiple
        of 64 and the tensor has more than one group per row.

        Raises TypeError for a non-float ``x``, ValueError for a wrong shape or an
        unknown ``activations``, FormatError for an invalid tensor.
        """
        x = np.asarray(x)
        if x.dtype.kind != "f":
            raise TypeError(f"matvec needs a float array, got dtype {x.dtype}")
        n = self.shape[1]
        if x.ndim not in (1, 2) or x.shape[-1] != n:
            raise ValueError(f"matvec needs x of shape ({n},) or (batch, {n}), got {x.shape}")
        if activations == "float32":
            x64 = x.astype(np.float32).astype(np.float64)
            w64 = self.decompress(np.float64)
            return (x64 @ w64.T).astype(np.float32)
        if activations != "int8":
            raise ValueError(f"activations must be 'float32' or 'int8', got {activations!r}")
        _validate_pbtensor(self)
        if _n_groups(n, self.group_size) > 1 and self.group_size % _INT8_BLOCK:
            raise ValueError(
                "int8 activations need a group size that is a multiple of 64 (or one group per row); "
                f"this tensor has group_size {self.group_size}: use activations='float32'"
            )
        y = self._matvec_int8(np.atleast_2d(x.astype(np.float32)))
        return y[0] if x.ndim == 1 else y

    def _matvec_int8(self, x: np.ndarray) -> np.ndarray:
        """§6.4 for a validated tensor and float32 ``x`` of shape ``(batch, n)``;
        returns float32 ``(batch, m)``.

        Every float operation is a separate numpy float32 operation (numpy rounds each
        one to float32 and never fuses a multiply-add); integer sums are int64 (exact).
        """
        m, n = self.shape
        f32 = np.float32
        n_blocks = -(-n // _INT8_BLOCK)

        # §6.4 steps 1-2: per-block scales d (batch, n_blocks) and codes xq.
        d, xq = _quantize_int8_blocks(x)
        big_x = xq.sum(axis=2)  # X_b, (batch, n_blocks)

        # §6.4 step 3: exact integer sums. Columns >= n are padded with s = 0 and q = 0
        # (they carry xq = 0 anyway, so the padding value does not matter).
        pad = n_blocks * _INT8_BLOCK - n
        s = 1 - 2 * unpack_bits(self.signs, 1, n).astype(np.int64)  # bit 1 means s = -1
        q = rle_decode(self.residual).astype(np.int64)
        s = np.pad(s, ((0, 0), (0, pad))).reshape(m, n_blocks, _INT8_BLOCK)
        q = np.pad(q, ((0, 0), (0, pad))).reshape(m, n_blocks, _INT8_BLOCK)
        big_s = np.einsum("kbj,ibj->kib", xq, s)  # S[i,b] per batch row k: (batch, m, n_blocks)
        big_r = np.einsum("kbj,ibj->kib", xq, q)  # R[i,b]

        # §6.4 step 4: float32 combination in the fixed order. The scales are exact
        # float32 copies of the stored float16/float32 values.
        mu = self.mu.astype(f32)
        alpha = self.alpha.astype(f32)
        sigma = self.sigma.astype(f32)
        n_groups = _n_groups(n, self.group_size)
        # Blocks per group; with one group per row (or none) it holds all blocks.
        blocks_per_group = self.group_size // _INT8_BLOCK if n_groups > 1 else n_blocks
        batch = x.shape[0]
        with np.errstate(all="ignore"):  # NaN blocks and overflow to inf are defined results
            y = np.zeros((batch, m), f32)
            for g in range(n_groups):
                s_sum = np.zeros((batch, m), f32)  # sS
                t_sum = np.zeros((batch, 1), f32)  # T (the same for every row i)
                for b in range(g * blocks_per_group, min((g + 1) * blocks_per_group, n_blocks)):
                    d_b = d[:, b, None]
                    s_sum = s_sum + d_b * big_s[:, :, b].astype(f32)
                    t_sum = t_sum + d_b * big_x[:, b, None].astype(f32)
                y = y + (mu[None, :, g] * t_sum + alpha[None, :, g] * s_sum)
            r_sum = np.zeros((batch, m), f32)  # sR, over all blocks regardless of groups
            for b in range(n_blocks):
                r_sum = r_sum + d[:, b, None] * big_r[:, :, b].astype(f32)
            y = y + sigma[None, :] * r_sum
        return y

    # -- §7 serialization ---------------------------------------------------

    def to_bytes(self) -> bytes:
        """Serialize to the §7 format (CRC-32C last).

        Validates first (FormatError) everything :meth:`from_bytes` checks, so every
        blob produced here is accepted and round-trips to an equal PBTensor.
        """
        _validate_pbtensor(self)
        m, n = self.shape
        le = self.scale_dtype.newbyteorder("<")
        residual_blob = self.residual.to_bytes()
        parts = [
            _PBT_HEADER.pack(
                _PBT_MAGIC,
                _PBT_VERSION,
                _PBT_DENSE_BITS,
                8 * self.scale_dtype.itemsize,
                m,
                n,
                self.group_size,
                len(residual_blob),
            ),
            self.signs.tobytes(),
            self.mu.astype(le).tobytes(),
            self.alpha.astype(le).tobytes(),
            self.sigma.astype(le).tobytes(),
            residual_blob,
        ]
        body = b"".join(parts)
        out = body + struct.pack("<I", crc32c(body))
        assert len(out) == self.nbytes
        return out

    @classmethod
    def from_bytes(cls, buf) -> PBTensor:
        """Parse and validate a §7 blob; raises FormatError on anything malformed.

        buf: bytes, bytearray or memoryview. Order (mirroring §4): fixed header fields;
        sizes and the exact total length (nothing allocated from a header field before
        that); CRC-32C; the embedded RLE (its own §4 validation) and its shape
        ``(m, n)``; sign-plane padding; scales finite, ``alpha``/``sigma`` >= 0; every
        residual code in ``-Q..Q``.
        """
        if not isinstance(buf, (bytes, bytearray, memoryview)):
            raise TypeError(f"from_bytes needs bytes, bytearray or memoryview, got {type(buf).__name__}")
        buf = bytes(buf)  # sized by the buffer itself, not by a header field

        # Fixed header.
        if len(buf) < _PBT_HEADER.size + _CRC_SIZE:
            raise TruncatedError(f"buffer too short: {len(buf)} bytes, need at least 44")
        magic, version, dense_bits, scale_bits, m, n, group_size, res_len = _PBT_HEADER.unpack_from(buf, 0)
        if magic != _PBT_MAGIC:
            raise CorruptError(f"bad magic {magic!r}, expected {_PBT_MAGIC!r}")
        if version != _PBT_VERSION:
            raise UnsupportedVersionError(f"unknown format version {version}")
        if dense_bits != _PBT_DENSE_BITS:
            raise UnsupportedVersionError(f"dense_bits {dense_bits} not supported (only 1)")
        if scale_bits not in (16, 32):
            raise CorruptError(f"scale width {scale_bits} bits, expected 16 or 32")
        if _nonzero_product((m, n)) >= 1 << 60:
            raise CorruptError(f"shape ({m}, {n}) is too large (limit: 2**60 elements)")
        if n == 0:
            if group_size != 1:
                raise CorruptError(f"group_size must be stored as 1 when n = 0, got {group_size}")
        elif not 1 <= group_size <= n:
            raise CorruptError(f"group_size {group_size} not in 1..{n}")

        # Sizes and exact total length (Python ints are exact; beyond u64 is an error).
        w = scale_bits // 8
        ng = _n_groups(n, group_size)
        signs_len = m * _packed_len(n, 1)
        scales_len = m * ng * w
        sigma_len = m * w
        total = _PBT_HEADER.size + signs_len + 2 * scales_len + sigma_len + res_len + _CRC_SIZE
        if max(signs_len, scales_len, sigma_len, total) > _U64_MAX:
            raise CorruptError("size overflow in header fields")
        if total != len(buf):
            error = TruncatedError if total > len(buf) else CorruptError
            raise error(f"length mismatch: header implies {total} bytes, buffer has {len(buf)}")

        # Checksum.
        (stored_crc,) = struct.unpack_from("<I", buf, len(buf) - _CRC_SIZE)
        actual_crc = crc32c(buf[: len(buf) - _CRC_SIZE])
        if stored_crc != actual_crc:
            raise CorruptError(f"CRC-32C mismatch: stored {stored_crc:#010x}, computed {actual_crc:#010x}")

        # Sections (all sizes now bounded by len(buf)).
        pos = _PBT_HEADER.size
        signs = np.frombuffer(buf, dtype=np.uint8, count=signs_len, offset=pos).copy()
        signs = signs.reshape(m, _packed_len(n, 1))
        pos += signs_len
        le = np.dtype("<f2" if w == 2 else "<f4")
        native = np.dtype(np.float16 if w == 2 else np.float32)
        mu = np.frombuffer(buf, dtype=le, count=m * ng, offset=pos).astype(native).reshape(m, ng)
        pos += scales_len
        alpha = np.frombuffer(buf, dtype=le, count=m * ng, offset=pos).astype(native).reshape(m, ng)
        pos += scales_len
        sigma = np.frombuffer(buf, dtype=le, count=m, offset=pos).astype(native)
        pos += sigma_len
        try:
            residual = RLE.from_bytes(buf[pos : pos + res_len])
        except FormatError as e:
            raise type(e)(f"embedded residual RLE: {e}") from e
        pos += res_len
        assert pos == len(buf) - _CRC_SIZE

        if residual.shape != (m, n):
            raise CorruptError(f"residual has shape {residual.shape}, expected {(m, n)}")
        if n % 8 and m and np.any(signs[:, -1] >> (n % 8)):
            raise CorruptError("nonzero padding bits in the sign plane")
        _check_scales(mu, alpha, sigma)
        _check_residual_codes(residual)
        return cls((m, n), signs, mu, alpha, sigma, residual, group_size)


def _check_scales(mu, alpha, sigma) -> None:
    """§7: every scale finite; alpha and sigma non-negative (numerically: -0.0 passes)."""
    for name, a in (("mu", mu), ("alpha", alpha), ("sigma", sigma)):
        if not np.all(np.isfinite(a)):
            raise CorruptError(f"{name} has a non-finite scale")
    for name, a in (("alpha", alpha), ("sigma", sigma)):
        if np.any(a < 0):
            raise CorruptError(f"{name} has a negative scale")


def _check_residual_codes(residual: RLE) -> None:
    """§7: every stored residual code lies in -Q..Q (rejects -128 / -8)."""
    big_q = _q_max(residual.value_bits)
    vals = _values_as_int8(residual.values, residual.value_bits, residual.num_values)
    if vals.size and int(vals.min()) < -big_q:
        raise CorruptError(f"a residual code is {int(vals.min())}, outside -{big_q}..{big_q}")


def _validate_pbtensor(t: PBTensor) -> None:
    """Everything §7 requires of a tensor, for an in-memory PBTensor (FormatError)."""
    m, n = t.shape
    if any(d < 0 for d in t.shape) or _nonzero_product(t.shape) >= 1 << 60:
        raise CorruptError(f"shape {t.shape} is invalid or too large (limit: 2**60 elements)")
    gs = t.group_size
    if n == 0:
        if gs != 1:
            raise CorruptError(f"group_size must be 1 when n = 0, got {gs}")
    elif not 1 <= gs <= n:
        raise CorruptError(f"group_size {gs} not in 1..{n}")
    ng = _n_groups(n, gs)
    if t.signs.dtype != np.uint8 or t.signs.shape != (m, _packed_len(n, 1)):
        want = (m, _packed_len(n, 1))
        raise CorruptError(f"signs must be uint8 of shape {want}, got {t.signs.dtype} {t.signs.shape}")
    dt = t.mu.dtype
    if dt not in _SCALE_DTYPES or t.alpha.dtype != dt or t.sigma.dtype != dt:
        raise CorruptError(
            f"mu, alpha, sigma must share a float16/float32 dtype, got {t.mu.dtype}, {t.alpha.dtype}, {t.sigma.dtype}"
        )
    for name, a, want in (("mu", t.mu, (m, ng)), ("alpha", t.alpha, (m, ng)), ("sigma", t.sigma, (m,))):
        if a.shape != want:
            raise CorruptError(f"{name} must have shape {want}, got {a.shape}")
    if t.residual.shape != (m, n):
        raise CorruptError(f"residual has shape {t.residual.shape}, expected {(m, n)}")
    _validate_rle(t.residual, canonical=True)
    if n % 8 and m and np.any(t.signs[:, -1] >> (n % 8)):
        raise CorruptError("nonzero padding bits in the sign plane")
    _check_scales(t.mu, t.alpha, t.sigma)
    _check_residual_codes(t.residual)


def snr_db(W, W_hat) -> float:
    """Signal-to-noise ratio ``10*log10(mean(W**2) / mean((W - W_hat)**2))`` in dB,
    computed in float64. +inf when the error is exactly zero (also for empty arrays);
    -inf when W is all zeros but the error is not. Shapes must match (ValueError)."""
    w = np.asarray(W)
    w_hat = np.asarray(W_hat)
    if w.shape != w_hat.shape:
        raise ValueError(f"shapes differ: {w.shape} vs {w_hat.shape}")
    for a in (w, w_hat):
        if a.dtype.kind not in "iuf":
            raise TypeError(f"snr_db needs real arrays, got dtype {a.dtype}")
    w = w.astype(np.float64)
    err = np.sum((w - w_hat.astype(np.float64)) ** 2)
    if err == 0:
        return math.inf
    sig = np.sum(w**2)  # the 1/size of both means cancels
    if sig == 0:
        return -math.inf
    return float(10.0 * math.log10(sig / err))
