"""§1 bit-packed codes and §2 sign planes (docs/format.md)."""

from __future__ import annotations

import numpy as np

from ._common import _check_bits, _check_count, _packed_len

# ---------------------------------------------------------------------------
# §1 bit-packed codes
# ---------------------------------------------------------------------------


def pack_bits(codes, bits) -> np.ndarray:
    """Pack each row of ``codes`` into a little-endian bit stream (§1).

    codes: integer (any int dtype) or bool array, ndim >= 1, shape ``(..., n)``; every
        element must satisfy ``0 <= c < 2**bits``.
    bits: int in 1..8.
    Returns a uint8 array of shape ``(..., ceil(n*bits/8))``; padding bits are zero.

    Raises TypeError for a non-integer dtype, ValueError for a 0-d input, a bad
    ``bits``, or an out-of-range code (codes are never truncated).
    """
    bits = _check_bits(bits)
    codes = np.asarray(codes)
    if codes.dtype != np.bool_ and codes.dtype.kind not in "iu":
        raise TypeError(f"pack_bits needs an integer or bool array, got dtype {codes.dtype}")
    if codes.ndim == 0:
        raise ValueError("pack_bits needs an array with at least one dimension")
    if codes.size:
        # Compare as Python ints so no dtype (int8, uint64, ...) can wrap or promote oddly.
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= 1 << bits:
            raise ValueError(f"codes must be in 0..{(1 << bits) - 1} for bits={bits}, got range {lo}..{hi}")
    codes = codes.astype(np.uint8)  # lossless after the range check
    n = codes.shape[-1]
    # Stream bit i*bits + j is bit j of code i (LSB first), so the bit planes laid out
    # as (..., n, bits) and flattened are exactly the stream; packbits(bitorder="little")
    # then puts stream bit t at bit t%8 of byte t//8 and zero-pads the last byte.
    planes = (codes[..., None] >> np.arange(bits, dtype=np.uint8)) & 1
    stream = planes.reshape(codes.shape[:-1] + (n * bits,))
    return np.packbits(stream, axis=-1, bitorder="little")


def unpack_bits(packed, bits, count) -> np.ndarray:
    """Inverse of :func:`pack_bits` (§1).

    packed: uint8 array, ndim >= 1, shape ``(..., ceil(count*bits/8))``.
    bits: int in 1..8.  count: number of codes per row (int >= 0).
    Returns a uint8 array of shape ``(..., count)``. Padding bits are ignored.

    Raises TypeError if ``packed`` is not uint8, ValueError for a 0-d input, a bad
    ``bits``/``count``, or a last axis of the wrong length.
    """
    bits = _check_bits(bits)
    count = _check_count(count)
    packed = np.asarray(packed)
    if packed.dtype != np.uint8:
        raise TypeError(f"unpack_bits needs a uint8 array, got dtype {packed.dtype}")
    if packed.ndim == 0:
        raise ValueError("unpack_bits needs an array with at least one dimension")
    want = _packed_len(count, bits)
    if packed.shape[-1] != want:
        raise ValueError(f"packed rows must have ceil({count}*{bits}/8) = {want} bytes, got {packed.shape[-1]}")
    stream = np.unpackbits(packed, axis=-1, bitorder="little")[..., : count * bits]
    planes = stream.reshape(packed.shape[:-1] + (count, bits))
    weights = (np.uint8(1) << np.arange(bits, dtype=np.uint8)).astype(np.uint8)
    # Each code is at most 8 bits, so the weighted sum fits uint8 exactly.
    return (planes * weights).sum(axis=-1, dtype=np.uint8)


# ---------------------------------------------------------------------------
# §2 sign planes
# ---------------------------------------------------------------------------

# Unsigned integer view of each accepted element type, and the position of its sign bit.
_SIGN_VIEWS = {
    np.dtype(np.float16): (np.uint16, 15),
    np.dtype(np.float32): (np.uint32, 31),
    np.dtype(np.float64): (np.uint64, 63),
    np.dtype(np.uint16): (np.uint16, 15),  # raw bfloat16 bits
}


def pack_signs(x) -> np.ndarray:
    """Pack the IEEE-754 sign bit of every element, per row (§2).

    x: float16, float32, float64, bfloat16 (an ml_dtypes array, detected by
        ``dtype.name == "bfloat16"``) or uint16 (raw bfloat16 bits, sign = bit 15);
        ndim >= 1, shape ``(..., n)``.
    Returns uint8 of shape ``(..., ceil(n/8))`` in the layout of ``pack_bits(_, 1)``;
    bit 1 where the sign bit is set (negatives, -0.0, NaNs with the sign bit).

    Raises TypeError for any other dtype, ValueError for a 0-d input.
    """
    x = np.asarray(x)
    if x.dtype.name == "bfloat16":
        # Same bit layout as the upper half of a float32: sign is bit 15 of the raw bits.
        x = x.view(np.uint16)
    if x.dtype not in _SIGN_VIEWS:
        raise TypeError(f"pack_signs accepts float16/float32/float64/bfloat16/uint16, got {x.dtype}")
    if x.ndim == 0:
        raise ValueError("pack_signs needs an array with at least one dimension")
    uint, sign_bit = _SIGN_VIEWS[x.dtype]
    # Read the bit itself rather than comparing with zero: -0.0 and -NaN must count.
    signs = (x.view(uint) >> sign_bit).astype(np.uint8)
    return pack_bits(signs, 1)


def unpack_signs(packed, count, dtype=np.float32) -> np.ndarray:
    """Inverse map of :func:`pack_signs` to ``±1.0`` (§2).

    packed: uint8 array of shape ``(..., ceil(count/8))``.  count: elements per row.
    dtype: float16, float32 or float64.
    Returns an array of ``dtype`` and shape ``(..., count)``: bit 1 -> -1.0, 0 -> +1.0.
    """
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"unpack_signs dtype must be float16/float32/float64, got {dtype}")
    bits = unpack_bits(packed, 1, count)
    return np.where(bits == 1, dtype.type(-1.0), dtype.type(1.0)).astype(dtype)
