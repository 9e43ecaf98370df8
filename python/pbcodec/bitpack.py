"""Bit-packing of k-bit codes and IEEE sign bits (docs/format.md §1-2).

All functions work row-wise over the last axis; leading axes are batch axes.
C-contiguous inputs of the right dtype are passed to the Rust core without a
copy, and the GIL is released while it runs.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import numpy as np

from . import _core
from ._util import as_array, as_uint8_codes, c_aligned, check_bits, check_count, prepare_out, rows_of, unshared
from .errors import CorruptError, TruncatedError, UnsupportedVersionError

# (uint view, +1.0 bits, -1.0 bits) per float dtype. Keyed by dtype.char
# ('e' float16, 'f' float32, 'd' float64): dtype.name costs microseconds per call.
_SIGN_WORDS = {
    "e": (np.uint16, 0x3C00, 0xBC00),
    "f": (np.uint32, 0x3F800000, 0xBF800000),
    "d": (np.uint64, 0x3FF0000000000000, 0xBFF0000000000000),
}
_BF16_WORDS = (np.uint16, 0x3F80, 0xBF80)
# Kernels by word size in bytes.
_SIGN_FNS: dict[int, tuple[Callable[..., None], Callable[..., None]]] = {
    2: (_core.pack_signs16, _core.unpack_signs16),
    4: (_core.pack_signs32, _core.unpack_signs32),
    8: (_core.pack_signs64, _core.unpack_signs64),
}


def _sign_words(dt: np.dtype) -> tuple | None:
    """(uint view, +1 bits, -1 bits) for a float dtype, or None."""
    spec = _SIGN_WORDS.get(dt.char)
    if spec is None and dt.name == "bfloat16":  # ml_dtypes; .name only on this rare path
        return _BF16_WORDS
    return spec


def pack_bits(codes: Any, bits: int, *, out: np.ndarray | None = None) -> np.ndarray:
    """Pack k-bit codes, each row into one little-endian bit stream.

    codes: integer array ``(..., n)``, every value ``< 2**bits`` (ValueError
    otherwise; never truncated). bits: 1..8.
    Returns uint8 ``(..., ceil(n*bits/8))``; code ``i`` of a row occupies bits
    ``[i*bits, (i+1)*bits)`` counting from the LSB of byte 0, and each row is
    zero-padded to a whole byte. ``bits=1`` equals
    ``np.packbits(codes, axis=-1, bitorder="little")``.
    """
    bits = check_bits(bits)
    a = as_uint8_codes(codes, bits)
    n = a.shape[-1]
    out = prepare_out(out, a.shape[:-1] + ((n * bits + 7) // 8,), np.uint8)
    a = unshared(a, out)
    _core.pack_bits(a, rows_of(a.shape), n, bits, out)
    return out


def unpack_bits(packed: Any, bits: int, count: int, *, out: np.ndarray | None = None) -> np.ndarray:
    """Inverse of :func:`pack_bits`.

    packed: uint8 ``(..., ceil(count*bits/8))``. Returns uint8 ``(..., count)``.
    Padding bits are ignored.
    """
    bits = check_bits(bits)
    count = check_count(count)
    p = as_array(packed, "packed")
    if p.dtype.char != "B":
        raise TypeError(f"packed must be a uint8 array, got dtype {p.dtype}")
    need = (count * bits + 7) // 8
    if p.shape[-1] != need:
        raise ValueError(f"packed rows have {p.shape[-1]} bytes; {count} codes of {bits} bits need {need}")
    p = np.ascontiguousarray(p)
    out = prepare_out(out, p.shape[:-1] + (count,), np.uint8)
    p = unshared(p, out)
    _core.unpack_bits(p, rows_of(p.shape), count, bits, out)
    return out


def _sign_view(x: Any) -> np.ndarray:
    """The raw bits of a float array as uint16/32/64 (zero-copy when contiguous)."""
    if (
        type(x) is not np.ndarray
        and type(x).__module__.startswith("torch")
        and str(getattr(x, "dtype", "")) == "torch.bfloat16"
    ):
        import torch  # only reached when given a torch tensor

        x = x.detach().cpu().contiguous().view(torch.int16).numpy().view(np.uint16)
    a = c_aligned(as_array(x, "x"))
    if not a.dtype.isnative:  # e.g. '>f4': the kernels read native words
        a = a.astype(a.dtype.newbyteorder("="))
    if a.dtype.char == "H":  # raw bfloat16 (or float16) bits
        return a
    spec = _sign_words(a.dtype)
    if spec is None:
        raise TypeError(
            f"pack_signs takes float16, float32, float64 or bfloat16 (or its uint16 bits), got dtype {a.dtype}"
        )
    return a.view(spec[0])


def pack_signs(x: Any, *, out: np.ndarray | None = None) -> np.ndarray:
    """Pack the IEEE sign bits of a float array ``(..., n)`` into uint8 ``(..., ceil(n/8))``.

    Bit = 1 where the sign bit is set (so ``-0.0`` gives 1), layout of
    ``pack_bits(..., 1)``. Accepts float16, float32, float64, bfloat16 (torch or
    ml_dtypes) and uint16 (raw bfloat16 bits).
    """
    w = _sign_view(x)
    n = w.shape[-1]
    out = prepare_out(out, w.shape[:-1] + ((n + 7) // 8,), np.uint8)
    w = unshared(w, out)
    _SIGN_FNS[w.itemsize][0](w, w.size // n if n else rows_of(w.shape), n, out)
    return out


def _float_dtype(dtype: Any) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"unsupported dtype {dtype!r}") from None
    if _sign_words(dt) is None or not dt.isnative:
        raise TypeError(f"dtype must be a native float16, float32, float64 or bfloat16, got {dt}")
    return dt


def unpack_signs(packed: Any, count: int, dtype: Any = np.float32, *, out: np.ndarray | None = None) -> np.ndarray:
    """Expand packed sign bits ``(..., ceil(count/8))`` to ``±1.0`` of ``dtype``,
    shape ``(..., count)``: bit 1 → -1.0, bit 0 → +1.0."""
    count = check_count(count)
    dt = _float_dtype(dtype)
    p = as_array(packed, "packed")
    if p.dtype != np.uint8:
        raise TypeError(f"packed must be a uint8 array, got dtype {p.dtype}")
    if p.shape[-1] != (count + 7) // 8:
        raise ValueError(f"packed rows have {p.shape[-1]} bytes; {count} signs need {(count + 7) // 8}")
    p = np.ascontiguousarray(p)
    out = prepare_out(out, p.shape[:-1] + (count,), dt)
    p = unshared(p, out)
    spec = _sign_words(dt)
    assert spec is not None  # _float_dtype accepted it
    word, pos, neg = spec
    _SIGN_FNS[np.dtype(word).itemsize][1](p, rows_of(p.shape), count, pos, neg, out.view(word))
    return out


# -------------------------------------------------------------- k-bit frames

_FRAME = struct.Struct("<4sHBBQ")  # magic, version, bits, signed, count (docs/format.md §9)
_FRAME_MAGIC = b"PBBP"
_FRAME_VERSION = 1


def pack_frame(codes: Any, bits: int, *, signed: bool = False) -> bytes:
    """Pack a whole array of k-bit codes into a self-describing frame
    (docs/format.md §9: header with width and count, the codes of the
    C-order flattened array packed as one row, CRC-32C).

    codes: uint8 (or int8, taken as its bytes) codes ``< 2**bits`` when
    ``signed`` is false; int8 values in ``-2**(bits-1) .. 2**(bits-1) - 1``
    (stored in two's complement) when it is true. bits: 1..8.
    Returns bytes. Raises TypeError for another dtype, ValueError for an
    out-of-range code or ``bits``.
    """
    bits = check_bits(bits)
    a = np.ascontiguousarray(codes).reshape(-1)
    if signed:
        if a.dtype != np.int8:
            raise TypeError(f"signed frames take int8 values, got dtype {a.dtype}")
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        if a.size and (int(a.min()) < lo or int(a.max()) > hi):
            raise ValueError(f"values must be in {lo}..{hi} for bits={bits}, got {int(a.min())}..{int(a.max())}")
        u = a.view(np.uint8) & np.uint8((1 << bits) - 1)
    else:
        if a.dtype not in (np.uint8, np.int8):
            raise TypeError(f"unsigned frames take uint8 codes, got dtype {a.dtype}")
        u = a.view(np.uint8)
    body = _FRAME.pack(_FRAME_MAGIC, _FRAME_VERSION, bits, int(bool(signed)), u.size) + pack_bits(u, bits).tobytes()
    return body + struct.pack("<I", _core.crc32c(np.frombuffer(body, np.uint8)))


def unpack_frame(buf: Any) -> np.ndarray:
    """Inverse of :func:`pack_frame`: a 1-D uint8 array of codes (int8 for a
    signed frame). Raises a :class:`pbcodec.FormatError` for anything malformed
    (docs/format.md §9 lists the checks), as its subclass
    :class:`~pbcodec.TruncatedError`, :class:`~pbcodec.UnsupportedVersionError` or
    :class:`~pbcodec.CorruptError`; never allocates more than 8 codes per byte of ``buf``."""
    if isinstance(buf, np.ndarray):
        b = np.ascontiguousarray(buf).reshape(-1).view(np.uint8)
    else:
        b = np.frombuffer(buf, dtype=np.uint8)
    if b.size < _FRAME.size + 4:
        raise TruncatedError(f"{b.size} bytes is too short for a k-bit frame")
    magic, version, bits, signed, count = _FRAME.unpack(b[: _FRAME.size].tobytes())
    if magic != _FRAME_MAGIC:
        raise CorruptError("bad magic: not a pbcodec k-bit frame")
    if version != _FRAME_VERSION:
        raise UnsupportedVersionError(f"unsupported k-bit frame version {version} (this build reads {_FRAME_VERSION})")
    if not 1 <= bits <= 8 or signed not in (0, 1):
        raise CorruptError(f"bad frame parameters: bits={bits}, signed={signed}")
    need = _FRAME.size + (count * bits + 7) // 8 + 4
    if need != b.size:
        error = TruncatedError if need > b.size else CorruptError
        raise error(f"length mismatch: header describes {need} bytes, buffer has {b.size}")
    stored = int.from_bytes(b[-4:].tobytes(), "little")
    actual = _core.crc32c(np.ascontiguousarray(b[:-4]))
    if stored != actual:
        raise CorruptError(f"checksum mismatch (stored {stored:#010x}, computed {actual:#010x})")
    packed = np.ascontiguousarray(b[_FRAME.size : -4])
    if (count * bits) % 8 and packed[-1] >> ((count * bits) % 8):
        raise CorruptError("nonzero padding bits after the last code")
    u = unpack_bits(packed, bits, count)
    if not signed:
        return u
    sign = np.uint8(1 << (bits - 1))
    # Sign-extend: (u ^ s) - s maps the two's-complement pattern to -2**(bits-1)..2**(bits-1)-1.
    return ((u ^ sign).astype(np.int16) - int(sign)).astype(np.int8)
