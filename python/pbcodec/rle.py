"""The escaped zero-run code for sparse int8/int4 arrays (docs/format.md §3-4)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import _core
from ._util import as_int8, c_aligned, check_disjoint, count_bits_arg, prepare_out, rows_of
from .errors import FormatError


class RLE:
    """An array encoded with the escaped zero-run code.

    Attributes
    ----------
    shape : tuple of int
        Shape of the dense array; rows are the last axis.
    count_bits, value_bits : int
        Width of a run code (1..8; ``ESC = 2**count_bits - 1``) and of a value (8 or 4).
    counts : uint8 ndarray, 1-D
        All rows' codes concatenated and packed as one stream with
        ``pack_bits(codes, count_bits)`` (a row may start mid-byte).
    values : ndarray, 1-D
        8-bit: the nonzero values (int8). 4-bit: their two's-complement nibbles
        packed with ``pack_bits(nibbles, 4)`` (uint8).
    code_offsets, value_offsets : int64 ndarray, ``(rows + 1,)``
        Row ``i`` owns codes ``[code_offsets[i], code_offsets[i+1])`` and values
        ``[value_offsets[i], value_offsets[i+1])``, so any row decodes alone.
    num_codes, num_values : int
        Totals over the whole array (the offsets' last entries).
    nbytes : int
        Exact length of :meth:`to_bytes`.
    """

    __slots__ = ("shape", "count_bits", "value_bits", "counts", "values", "code_offsets", "value_offsets")

    def __init__(
        self,
        shape: tuple[int, ...],
        count_bits: int,
        value_bits: int,
        counts: np.ndarray,
        values: np.ndarray,
        code_offsets: np.ndarray,
        value_offsets: np.ndarray,
    ) -> None:
        self.shape = tuple(int(d) for d in shape)
        self.count_bits = int(count_bits)
        self.value_bits = int(value_bits)
        self.counts = np.ascontiguousarray(counts, dtype=np.uint8)
        self.values = np.ascontiguousarray(values, dtype=np.int8 if self.value_bits == 8 else np.uint8)
        self.code_offsets = c_aligned(np.ascontiguousarray(code_offsets, dtype=np.int64))
        self.value_offsets = c_aligned(np.ascontiguousarray(value_offsets, dtype=np.int64))

    @property
    def num_codes(self) -> int:
        return int(self.code_offsets[-1]) if self.code_offsets.size else 0

    @property
    def num_values(self) -> int:
        return int(self.value_offsets[-1]) if self.value_offsets.size else 0

    @property
    def nbytes(self) -> int:
        return int(
            _core.rle_nbytes(
                len(self.shape), rows_of(self.shape), self.num_codes, self.num_values, self.count_bits, self.value_bits
            )
        )

    def to_bytes(self) -> bytes:
        """Serialize (docs/format.md §4): magic, version, shape, streams, CRC-32C."""
        return _core.rle_to_bytes(
            self.counts,
            self.values.view(np.uint8),
            self.code_offsets,
            list(self.shape),
            self.count_bits,
            self.value_bits,
        )

    @classmethod
    def from_bytes(cls, buf: bytes | bytearray | memoryview) -> RLE:
        """Parse and validate a blob from :meth:`to_bytes`; raises
        :class:`pbcodec.FormatError` on anything malformed."""
        b = np.frombuffer(buf, dtype=np.uint8)
        shape, value_bits, (counts, values, co, vo, count_bits) = _core.rle_from_bytes(b)
        return cls(
            tuple(shape), count_bits, value_bits, counts, values.view(np.int8) if value_bits == 8 else values, co, vo
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RLE):
            return NotImplemented
        return (
            self.shape == other.shape
            and self.count_bits == other.count_bits
            and self.value_bits == other.value_bits
            and np.array_equal(self.counts, other.counts)
            and np.array_equal(self.values.view(np.uint8), other.values.view(np.uint8))
            and np.array_equal(self.code_offsets, other.code_offsets)
            and np.array_equal(self.value_offsets, other.value_offsets)
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"RLE(shape={self.shape}, count_bits={self.count_bits}, value_bits={self.value_bits}, "
            f"num_codes={self.num_codes}, num_values={self.num_values}, nbytes={self.nbytes})"
        )


def _check_value_bits(value_bits: Any) -> int:
    if value_bits not in (4, 8) or isinstance(value_bits, bool):
        raise ValueError(f"value_bits must be 4 or 8, got {value_bits!r}")
    return int(value_bits)


def rle_encode(values: Any, count_bits: int | str = 4, value_bits: int = 8) -> RLE:
    """Encode a sparse int8 array ``(..., n)`` row by row with the escaped zero-run code.

    count_bits: 1..8, or ``"auto"`` for the width giving the smallest
    ``nbytes`` (ties go to the smaller width). value_bits: 8, or 4 (every value
    must then be in -8..7).
    """
    vb = _check_value_bits(value_bits)
    cb = count_bits_arg(count_bits)
    a = as_int8(values)
    counts, vals, co, vo, cb = _core.rle_encode(a, list(a.shape), cb, vb)
    return RLE(a.shape, cb, vb, counts, vals.view(np.int8) if vb == 8 else vals, co, vo)


#: Default cap on the dense size :func:`rle_decode` allocates (2**31 elements,
#: 2 GiB of int8). Zeros after a row's last value cost nothing in the code, so a
#: tiny blob can declare an enormous shape (a "decompression bomb"); raise the
#: cap explicitly (``max_elements=None``) for arrays you trust to be that large.
MAX_DECODE_ELEMENTS = 2**31


def rle_decode(
    rle: RLE, out: np.ndarray | None = None, *, max_elements: int | None = MAX_DECODE_ELEMENTS
) -> np.ndarray:
    """Decode an :class:`RLE` to its dense int8 array of shape ``rle.shape``.

    Raises :class:`pbcodec.FormatError` if the streams are inconsistent (for
    example a row whose codes run past its end), and ``ValueError`` if the
    dense array would exceed ``max_elements`` (see :data:`MAX_DECODE_ELEMENTS`;
    ``None``: no limit; not checked when ``out`` is given).
    """
    if not isinstance(rle, RLE):
        raise TypeError(f"rle must be a pbcodec.RLE, got {type(rle).__name__}")
    size = math.prod(rle.shape)
    if out is None and max_elements is not None and size > max_elements:
        raise ValueError(
            f"decoding shape {rle.shape} needs {size} elements, over max_elements={max_elements}; "
            "pass a larger max_elements (or None) if this array is expected"
        )
    if out is None:
        try:
            out = np.empty(rle.shape, np.int8)
        except (ValueError, TypeError, OverflowError) as e:  # a shape numpy cannot represent
            raise FormatError(f"RLE shape {rle.shape} is invalid: {e}") from None
    else:
        out = prepare_out(out, rle.shape, np.int8)
        check_disjoint(out, (rle.counts, rle.values, rle.code_offsets, rle.value_offsets), "encoded data")
    _core.rle_decode(
        rle.counts,
        rle.values.view(np.uint8),
        rle.code_offsets,
        rle.value_offsets,
        list(rle.shape),
        rle.count_bits,
        rle.value_bits,
        out,
    )
    return out
