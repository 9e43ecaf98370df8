"""Pure-Python reference implementation of the pbcodec formats.

Written strictly from the byte-level specification in ``docs/format.md`` (which is
normative); section numbers in comments (``§3.2``) refer to that document. It uses only
the standard library and numpy and imports nothing from the compiled ``pbcodec._core``,
so property tests can check the Rust core against it byte for byte.

Clarity comes first; numpy vectorization is used only where it stays an obvious
transcription of the spec (bit planes for packing, cumulative sums for run positions).

Conventions: "row" is the last axis; an array of shape ``(d0, ..., dk, n)`` has
``rows = d0*...*dk`` independent rows of length ``n`` (a 1-D array is one row).
"""

from __future__ import annotations

import json
import math
import struct

import numpy as np

from .errors import CorruptError, FormatError, ScaleRangeError, TruncatedError, UnsupportedVersionError

__all__ = [
    "FormatError",
    "PBTensor",
    "RLE",
    "compress",
    "crc32c",
    "load_file",
    "pack_bits",
    "pack_frame",
    "pack_signs",
    "rle_decode",
    "rle_encode",
    "save_file",
    "snr_db",
    "unpack_bits",
    "unpack_frame",
    "unpack_signs",
]

_U64_MAX = 2**64 - 1

# §4 fixed layout: magic, version u16, count_bits u8, value_bits u8, ndim u8,
# index_width u8, reserved u16, reserved u32.
_MAGIC = b"PBRL"
_VERSION = 1
_HEADER = struct.Struct("<4sHBBBBHI")
assert _HEADER.size == 16
_MAX_NDIM = 32
_CRC_SIZE = 4


# ---------------------------------------------------------------------------
# small argument helpers
# ---------------------------------------------------------------------------


def _is_int(x) -> bool:
    # bool is an int subclass in Python; a flag is never a valid bit width or count.
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _check_bits(bits) -> int:
    if not _is_int(bits) or not 1 <= int(bits) <= 8:
        raise ValueError(f"bits must be an int in 1..8, got {bits!r}")
    return int(bits)


def _check_count(count) -> int:
    if not _is_int(count) or int(count) < 0:
        raise ValueError(f"count must be a non-negative int, got {count!r}")
    return int(count)


def _packed_len(count: int, bits: int) -> int:
    """Bytes in a packed row of ``count`` codes of ``bits`` bits (§1)."""
    return (count * bits + 7) // 8


def _rows_of(shape) -> int:
    """Number of rows of an array of ``shape``: product of ``shape[:-1]``, 1 for 1-D."""
    return math.prod(shape[:-1])


def _nonzero_product(shape) -> int:
    """Product of the nonzero dimensions (§4, §7, §8 bound shapes by it, so that a
    shape is representable even when a zero dimension makes it empty)."""
    return math.prod(d for d in shape if d)


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


# ---------------------------------------------------------------------------
# §5 CRC-32C
# ---------------------------------------------------------------------------


def _make_crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C_TABLE = _make_crc32c_table()


def crc32c(data) -> int:
    """CRC-32C (Castagnoli): reflected polynomial 0x82F63B78, init and final XOR
    0xFFFFFFFF. ``data`` is any bytes-like object; returns an int in 0..2**32-1."""
    table = _CRC32C_TABLE
    crc = 0xFFFFFFFF
    for byte in bytes(data):
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# ---------------------------------------------------------------------------
# §3 the escaped zero-run code
# ---------------------------------------------------------------------------


def _index_width(num_codes: int) -> int:
    """§4: the one allowed width of the serialized row ends."""
    return 4 if num_codes < 2**32 else 8


def _serialized_size(ndim, rows, count_bits, value_bits, num_codes, num_values) -> int:
    """Exact length of the §4 serialization with these header fields."""
    values_len = num_values if value_bits == 8 else (num_values + 1) // 2
    return (
        _HEADER.size
        + 8 * ndim  # shape
        + 8
        + 8  # num_codes, num_values
        + _index_width(num_codes) * rows  # row_ends
        + _packed_len(num_codes, count_bits)  # counts stream
        + values_len
        + _CRC_SIZE
    )


class RLE:
    """An array encoded with the escaped zero-run code (§3.4), in memory.

    Attributes:
        shape: tuple of ints, the dense array's shape (ndim >= 1).
        count_bits: int ``b`` in 1..8 (``ESC = 2**b - 1``).
        value_bits: 8 or 4.
        counts: uint8 1-D, ``pack_bits(all_codes, count_bits)`` of every row's codes
            concatenated in row order (one bit stream; rows may start mid-byte).
        values: value_bits 8: int8 1-D of all values; value_bits 4: uint8 1-D,
            ``pack_bits(values & 0xF, 4)``.
        code_offsets, value_offsets: int64 1-D of length ``rows + 1``, starting at 0;
            row ``i`` owns codes ``code_offsets[i]:code_offsets[i+1]`` and values
            ``value_offsets[i]:value_offsets[i+1]``.
        num_codes, num_values: ints, the totals (last elements of the offsets).

    The constructor only normalizes types (lossless casts to the dtypes above); it
    does not check consistency, so malformed encodings can be built on purpose.
    :func:`rle_decode` and :meth:`to_bytes` validate and raise FormatError.
    """

    __hash__ = None  # mutable arrays inside; equality is by value

    def __init__(self, shape, count_bits, value_bits, counts, values, code_offsets, value_offsets):
        self.shape = tuple(int(_as_index(d, "shape entries")) for d in shape)
        self.count_bits = int(_as_index(count_bits, "count_bits"))
        self.value_bits = int(_as_index(value_bits, "value_bits"))
        self.counts = _as_1d(counts, np.uint8, "counts")
        self.values = _as_1d(values, np.int8 if self.value_bits == 8 else np.uint8, "values")
        self.code_offsets = _as_1d(code_offsets, np.int64, "code_offsets")
        self.value_offsets = _as_1d(value_offsets, np.int64, "value_offsets")
        if self.code_offsets.size == 0 or self.value_offsets.size == 0:
            raise ValueError("code_offsets and value_offsets need at least one element (rows + 1)")

    @property
    def num_codes(self) -> int:
        return int(self.code_offsets[-1])

    @property
    def num_values(self) -> int:
        return int(self.value_offsets[-1])

    @property
    def nbytes(self) -> int:
        """Exact length of :meth:`to_bytes` (§4)."""
        return _serialized_size(
            len(self.shape),
            _rows_of(self.shape),
            self.count_bits,
            self.value_bits,
            self.num_codes,
            self.num_values,
        )

    def __eq__(self, other):
        if not isinstance(other, RLE):
            return NotImplemented
        arrays = ("counts", "values", "code_offsets", "value_offsets")
        return (
            self.shape == other.shape
            and self.count_bits == other.count_bits
            and self.value_bits == other.value_bits
            and all(
                getattr(self, a).dtype == getattr(other, a).dtype
                and np.array_equal(getattr(self, a), getattr(other, a))
                for a in arrays
            )
        )

    def __repr__(self):
        return (
            f"RLE(shape={self.shape}, count_bits={self.count_bits}, "
            f"value_bits={self.value_bits}, num_codes={self.num_codes}, "
            f"num_values={self.num_values})"
        )

    # -- §4 serialization ---------------------------------------------------

    def to_bytes(self) -> bytes:
        """Serialize to the §4 format (CRC-32C last).

        Validates first (FormatError) that the encoding is consistent and canonical
        (§3.3), so every blob produced here is accepted by :meth:`from_bytes` and
        round-trips to an equal RLE.
        """
        _validate_rle(self, canonical=True)
        ndim = len(self.shape)
        w = _index_width(self.num_codes)
        parts = [
            _HEADER.pack(_MAGIC, _VERSION, self.count_bits, self.value_bits, ndim, w, 0, 0),
            struct.pack(f"<{ndim}Q", *self.shape),
            struct.pack("<QQ", self.num_codes, self.num_values),
            self.code_offsets[1:].astype("<u4" if w == 4 else "<u8").tobytes(),
            self.counts.tobytes(),
            self.values.tobytes(),
        ]
        body = b"".join(parts)
        out = body + struct.pack("<I", crc32c(body))
        assert len(out) == self.nbytes
        return out

    @classmethod
    def from_bytes(cls, buf) -> RLE:
        """Parse and validate a §4 blob; raises FormatError on anything malformed.

        buf: bytes, bytearray or memoryview. Checks run in the order of §4
        "Validation"; nothing is allocated from a header field before the total
        length implied by the header has been matched against ``len(buf)``.
        """
        if not isinstance(buf, (bytes, bytearray, memoryview)):
            raise TypeError(f"from_bytes needs bytes, bytearray or memoryview, got {type(buf).__name__}")
        buf = bytes(buf)  # sized by the buffer itself, not by a header field

        # Step 1: fixed header.
        if len(buf) < _HEADER.size + _CRC_SIZE:
            raise TruncatedError(f"buffer too short: {len(buf)} bytes, need at least 20")
        magic, version, count_bits, value_bits, ndim, w, res16, res32 = _HEADER.unpack_from(buf, 0)
        if magic != _MAGIC:
            raise CorruptError(f"bad magic {magic!r}, expected {_MAGIC!r}")
        if version != _VERSION:
            raise UnsupportedVersionError(f"unknown format version {version}")
        if res16 != 0 or res32 != 0:
            raise CorruptError("reserved header bytes are not zero")
        if not 1 <= count_bits <= 8:
            raise CorruptError(f"count_bits {count_bits} not in 1..8")
        if value_bits not in (4, 8):
            raise CorruptError(f"value_bits {value_bits} not 4 or 8")
        if not 1 <= ndim <= _MAX_NDIM:
            raise CorruptError(f"ndim {ndim} not in 1..{_MAX_NDIM}")
        if w not in (4, 8):
            raise CorruptError(f"index_width {w} not 4 or 8")

        # Step 2: variable header, sizes, exact total length (before any allocation).
        pos = _HEADER.size
        fields_end = pos + 8 * ndim + 16
        if len(buf) < fields_end + _CRC_SIZE:
            raise TruncatedError(f"buffer truncated: {len(buf)} bytes, header alone needs {fields_end + _CRC_SIZE}")
        shape = struct.unpack_from(f"<{ndim}Q", buf, pos)
        pos += 8 * ndim
        num_codes, num_values = struct.unpack_from("<QQ", buf, pos)
        pos += 16
        # Python ints are exact, so "overflow checks" become: a size beyond u64 is an
        # error, and any other wrong size fails the exact length comparison.
        rows = _rows_of(shape)
        # §4: the product of the nonzero dimensions must be below 2**63.
        if _nonzero_product(shape) >= 1 << 63:
            raise CorruptError(f"shape {shape} is too large (limit: 2**63 elements)")
        row_ends_len = w * rows
        counts_len = _packed_len(num_codes, count_bits)
        values_len = num_values if value_bits == 8 else (num_values + 1) // 2
        total = fields_end + row_ends_len + counts_len + values_len + _CRC_SIZE
        if max(rows, row_ends_len, num_codes * count_bits, counts_len, total) > _U64_MAX:
            raise CorruptError("size overflow in header fields")
        if total != len(buf):
            error = TruncatedError if total > len(buf) else CorruptError
            raise error(f"length mismatch: header implies {total} bytes, buffer has {len(buf)}")

        # Step 3: checksum.
        (stored_crc,) = struct.unpack_from("<I", buf, len(buf) - _CRC_SIZE)
        actual_crc = crc32c(buf[: len(buf) - _CRC_SIZE])
        if stored_crc != actual_crc:
            raise CorruptError(f"CRC-32C mismatch: stored {stored_crc:#010x}, computed {actual_crc:#010x}")

        # Step 4: row ends and index width.
        row_ends = np.frombuffer(buf, dtype="<u4" if w == 4 else "<u8", count=rows, offset=pos)
        pos += row_ends_len
        if rows == 0:
            if num_codes != 0:
                raise CorruptError(f"array has zero rows but num_codes = {num_codes}")
        else:
            # Compared in their own unsigned dtype: no wrap before the checks.
            if np.any(row_ends[1:] < row_ends[:-1]):
                raise CorruptError("row_ends are not non-decreasing")
            if int(row_ends[-1]) != num_codes:
                raise CorruptError(f"last row end {int(row_ends[-1])} != num_codes {num_codes}")
        if w != _index_width(num_codes):
            raise CorruptError(f"index_width {w} is not the prescribed {_index_width(num_codes)}")
        code_offsets = np.concatenate([[0], row_ends.astype(np.int64)]).astype(np.int64)

        # Step 5: padding bits of both streams are zero.
        counts = np.frombuffer(buf, dtype=np.uint8, count=counts_len, offset=pos).copy()
        pos += counts_len
        if value_bits == 8:
            values = np.frombuffer(buf, dtype=np.int8, count=values_len, offset=pos).copy()
        else:
            values = np.frombuffer(buf, dtype=np.uint8, count=values_len, offset=pos).copy()
        pos += values_len
        assert pos == len(buf) - _CRC_SIZE
        if not _padding_is_zero(counts, num_codes * count_bits):
            raise CorruptError("nonzero padding bits in the counts stream")
        if value_bits == 4 and not _padding_is_zero(values, num_values * 4):
            raise CorruptError("nonzero padding bits in the values stream")

        # Step 6: every row decodes within its length and is canonical.
        codes = unpack_bits(counts, count_bits, num_codes)
        n = shape[-1]
        esc = (1 << count_bits) - 1
        _check_rows_fit(codes, code_offsets, n, esc)
        _check_no_trailing_escape(codes, code_offsets, esc)
        value_offsets = _value_offsets_from_codes(codes, code_offsets, esc)
        if int(value_offsets[-1]) != num_values:
            raise CorruptError(f"codes hold {int(value_offsets[-1])} values but num_values = {num_values}")
        if np.any(_values_as_int8(values, value_bits, num_values) == 0):
            raise CorruptError("a stored value is zero (non-canonical)")

        return cls(
            shape=shape,
            count_bits=count_bits,
            value_bits=value_bits,
            counts=counts,
            values=values,
            code_offsets=code_offsets,
            value_offsets=value_offsets,
        )


def _as_index(x, what) -> int:
    if not _is_int(x):
        raise TypeError(f"{what} must be ints, got {x!r}")
    return int(x)


def _as_1d(arr, dtype, name) -> np.ndarray:
    """Lossless cast of a 1-D integer array-like to ``dtype`` (never wraps)."""
    arr = np.asarray(arr)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype=dtype)  # e.g. np.asarray([]) is float64
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got dtype {arr.dtype}")
    out = arr.astype(dtype)
    if not np.array_equal(out, arr):
        raise ValueError(f"{name} has values that do not fit {np.dtype(dtype)}")
    return out


def _padding_is_zero(stream: np.ndarray, used_bits: int) -> bool:
    """True when the bits of ``stream`` past the first ``used_bits`` are zero."""
    tail = used_bits % 8
    if tail == 0:
        return True
    return int(stream[-1]) >> tail == 0


def _code_advances(codes: np.ndarray, esc: int) -> np.ndarray:
    """§3.2: how far each code moves ``pos`` (an escape ESC, code c writes at pos+c
    then moves past it: c + 1). Always >= 1."""
    codes = codes.astype(np.int64)
    return np.where(codes == esc, esc, codes + 1)


def _check_rows_fit(codes, code_offsets, n, esc) -> None:
    """§3.2: no row writes at ``pos >= n`` nor lets escapes move ``pos`` past ``n``.

    Every code advances ``pos`` by >= 1, so the final position of a row is its
    maximum; a write at ``pos + c < n`` is the same as ending at ``<= n``. So a row
    fits exactly when the sum of its advances is ``<= n``.
    """
    cum = np.concatenate([[0], np.cumsum(_code_advances(codes, esc))])
    row_len = cum[code_offsets[1:]] - cum[code_offsets[:-1]]
    # Sums are bounded by 255*num_codes < 2**62; clamp n so a u64 shape entry compares
    # safely against the int64 sums.
    bad = np.flatnonzero(row_len > min(n, 2**62))
    if bad.size:
        i = int(bad[0])
        raise CorruptError(f"row {i} decodes to position {int(row_len[i])}, past its length {n}")


def _check_no_trailing_escape(codes, code_offsets, esc) -> None:
    """§3.3 (b): a non-empty row does not end with an escape code."""
    nonempty = code_offsets[1:] > code_offsets[:-1]
    last = codes[code_offsets[1:][nonempty] - 1]
    bad = np.flatnonzero(last == esc)
    if bad.size:
        i = int(np.flatnonzero(nonempty)[bad[0]])
        raise CorruptError(f"row {i} ends with an escape code (non-canonical)")


def _value_offsets_from_codes(codes, code_offsets, esc) -> np.ndarray:
    """Row offsets into the value stream: one value per non-escape code."""
    cum = np.concatenate([[0], np.cumsum(codes != esc, dtype=np.int64)])
    return cum[code_offsets].astype(np.int64)


def _values_as_int8(values, value_bits, num_values) -> np.ndarray:
    """The value stream as int8 (4-bit nibbles sign-extended from two's complement)."""
    if value_bits == 8:
        return values.astype(np.int8)
    nib = unpack_bits(values, 4, num_values).astype(np.int16)
    return np.where(nib >= 8, nib - 16, nib).astype(np.int8)


def _validate_rle(rle: RLE, canonical: bool) -> np.ndarray:
    """Check an in-memory RLE for consistency; return its codes (uint8, all rows).

    Always checked (FormatError): parameters in range, offsets of length rows + 1
    starting at 0 and non-decreasing, stream lengths matching the totals, every row
    decoding within its length (§3.2), and each row's number of non-escape codes
    equal to its number of values.
    With ``canonical`` also §3.3 and §4 step 5: zero padding bits, no trailing
    escape, no zero value.
    """
    b, vb, shape = rle.count_bits, rle.value_bits, rle.shape
    if not 1 <= b <= 8:
        raise CorruptError(f"count_bits {b} not in 1..8")
    if vb not in (4, 8):
        raise CorruptError(f"value_bits {vb} not 4 or 8")
    if not 1 <= len(shape) <= _MAX_NDIM:
        raise CorruptError(f"ndim {len(shape)} not in 1..{_MAX_NDIM}")
    if any(d < 0 for d in shape) or _nonzero_product(shape) >= 1 << 63:
        raise CorruptError(f"shape {shape} is invalid or too large (limit: 2**63 elements)")
    rows = _rows_of(shape)
    co, vo = rle.code_offsets, rle.value_offsets
    for name, off in (("code_offsets", co), ("value_offsets", vo)):
        if off.dtype != np.int64 or off.ndim != 1:
            raise CorruptError(f"{name} must be a 1-D int64 array")
        if off.size != rows + 1:
            raise CorruptError(f"{name} has {off.size} entries, expected rows + 1 = {rows + 1}")
        if off[0] != 0:
            raise CorruptError(f"{name} does not start at 0")
        if np.any(off[1:] < off[:-1]):
            raise CorruptError(f"{name} is not non-decreasing")
    num_codes, num_values = rle.num_codes, rle.num_values
    if rle.counts.dtype != np.uint8 or rle.counts.ndim != 1:
        raise CorruptError("counts must be a 1-D uint8 array")
    if rle.counts.size != _packed_len(num_codes, b):
        raise CorruptError(
            f"counts has {rle.counts.size} bytes, expected {_packed_len(num_codes, b)} "
            f"for {num_codes} codes of {b} bits"
        )
    want_vdtype, want_vlen = (np.int8, num_values) if vb == 8 else (np.uint8, (num_values + 1) // 2)
    if rle.values.dtype != want_vdtype or rle.values.ndim != 1:
        raise CorruptError(f"values must be a 1-D {np.dtype(want_vdtype)} array for value_bits={vb}")
    if rle.values.size != want_vlen:
        raise CorruptError(f"values has {rle.values.size} elements, expected {want_vlen}")

    esc = (1 << b) - 1
    codes = unpack_bits(rle.counts, b, num_codes)
    _check_rows_fit(codes, co, shape[-1], esc)
    per_row = _value_offsets_from_codes(codes, co, esc)
    bad = np.flatnonzero(per_row != vo)
    if bad.size:
        raise CorruptError(
            f"value_offsets[{int(bad[0])}] = {int(vo[bad[0]])} but the codes before it "
            f"hold {int(per_row[bad[0]])} values"
        )
    if canonical:
        if not _padding_is_zero(rle.counts, num_codes * b):
            raise CorruptError("nonzero padding bits in the counts stream")
        if vb == 4 and not _padding_is_zero(rle.values, num_values * 4):
            raise CorruptError("nonzero padding bits in the values stream")
        _check_no_trailing_escape(codes, co, esc)
        if np.any(_values_as_int8(rle.values, vb, num_values) == 0):
            raise CorruptError("a stored value is zero (non-canonical)")
    return codes


def _encode(values: np.ndarray, count_bits: int, value_bits: int) -> RLE:
    """§3.1 + §3.4 for one fixed ``count_bits``; ``values`` already checked."""
    shape = values.shape
    rows, n = _rows_of(shape), shape[-1]
    esc = (1 << count_bits) - 1
    grid = values.reshape(rows, n)

    # Nonzeros in row-major order: exactly the order the §3.1 walk meets them.
    row_idx, col_idx = np.nonzero(grid)
    row_idx = row_idx.astype(np.int64)
    col_idx = col_idx.astype(np.int64)
    # r = zeros since the previous nonzero of the same row (or since the row start).
    prev_col = np.full(col_idx.shape, -1, dtype=np.int64)
    same_row = np.zeros(col_idx.shape, dtype=bool)
    same_row[1:] = row_idx[1:] == row_idx[:-1]
    prev_col[same_row] = col_idx[:-1][same_row[1:]]
    r = col_idx - prev_col - 1
    # Each nonzero emits r div ESC escapes, then the code r mod ESC (with its value).
    n_codes_each = r // esc + 1
    ends = np.cumsum(n_codes_each)  # index one past each nonzero's last code
    codes = np.full(int(ends[-1]) if ends.size else 0, esc, dtype=np.uint8)
    codes[ends - 1] = (r % esc).astype(np.uint8)

    # Row boundaries: rows own contiguous runs of nonzeros, and each nonzero's codes.
    value_offsets = np.concatenate([[0], np.cumsum(np.bincount(row_idx, minlength=rows))]).astype(np.int64)
    code_offsets = np.concatenate([[0], ends]).astype(np.int64)[value_offsets]

    nz = grid[row_idx, col_idx]
    if value_bits == 8:
        stream = nz.astype(np.int8)
    else:
        # 4-bit two's-complement nibble of each value, packed two per byte (low first).
        stream = pack_bits(nz.view(np.uint8) & 0xF, 4)
    return RLE(
        shape=shape,
        count_bits=count_bits,
        value_bits=value_bits,
        counts=pack_bits(codes, count_bits),
        values=stream,
        code_offsets=code_offsets,
        value_offsets=value_offsets,
    )


def rle_encode(values, count_bits=4, value_bits=8) -> RLE:
    """Encode an int8 array with the escaped zero-run code (§3.1, §3.4).

    values: int8 array, ndim 1..32, shape ``(..., n)``; each row is encoded alone.
    count_bits: int in 1..8, or ``"auto"`` to pick the ``b`` with the smallest
        serialized size (§3.5, ties to the smaller ``b``).
    value_bits: 8, or 4 (then every element must be in -8..7).
    Returns an :class:`RLE`.

    Raises TypeError for a non-int8 array, ValueError for bad parameters, ndim 0 or
    > 32, or out-of-range 4-bit values.
    """
    values = np.asarray(values)
    if values.dtype != np.int8:
        raise TypeError(f"rle_encode needs an int8 array, got dtype {values.dtype}")
    if not 1 <= values.ndim <= _MAX_NDIM:
        raise ValueError(f"rle_encode needs ndim in 1..{_MAX_NDIM}, got {values.ndim}")
    if not _is_int(value_bits) or int(value_bits) not in (4, 8):
        raise ValueError(f"value_bits must be 4 or 8, got {value_bits!r}")
    value_bits = int(value_bits)
    if value_bits == 4 and values.size:
        lo, hi = int(values.min()), int(values.max())
        if lo < -8 or hi > 7:
            raise ValueError(f"value_bits=4 needs values in -8..7, got range {lo}..{hi}")
    if isinstance(count_bits, str) and count_bits == "auto":
        # §3.5: exact nbytes for every b, smallest wins; min() keeps the first (smaller b) on ties.
        candidates = [_encode(values, b, value_bits) for b in range(1, 9)]
        return min(candidates, key=lambda e: e.nbytes)
    if not _is_int(count_bits) or not 1 <= int(count_bits) <= 8:
        raise ValueError(f"count_bits must be an int in 1..8 or 'auto', got {count_bits!r}")
    return _encode(values, int(count_bits), value_bits)


def rle_decode(rle: RLE) -> np.ndarray:
    """Decode an :class:`RLE` to its dense int8 array of shape ``rle.shape`` (§3.2).

    Validates first (FormatError): parameters in range, offsets and stream lengths
    consistent, every row decoding within its length, and each row's value count
    matching its non-escape codes. Canonical form (§3.3) is not required here: a
    trailing escape or a zero value decodes harmlessly; ``from_bytes`` and
    ``to_bytes`` enforce canonical form.
    """
    if not isinstance(rle, RLE):
        raise TypeError(f"rle_decode needs an RLE, got {type(rle).__name__}")
    codes = _validate_rle(rle, canonical=False)
    shape = rle.shape
    rows, n = _rows_of(shape), shape[-1]
    esc = (1 << rle.count_bits) - 1
    out = np.zeros((rows, n), dtype=np.int8)

    # §3.2 for all rows at once: pos after each code is the running sum of advances
    # since its row's first code; a non-escape code c wrote its value at (pos after) - 1.
    cum = np.cumsum(_code_advances(codes, esc))
    row_of_code = np.repeat(np.arange(rows, dtype=np.int64), np.diff(rle.code_offsets))
    row_start = np.concatenate([[0], cum])[rle.code_offsets[:-1]]
    pos_after = cum - row_start[row_of_code]
    writes = codes != esc
    out[row_of_code[writes], pos_after[writes] - 1] = _values_as_int8(rle.values, rle.value_bits, rle.num_values)
    return out.reshape(shape)


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


# ---------------------------------------------------------------------------
# §8 files: compressed tensors in safetensors
# ---------------------------------------------------------------------------

# §8 dtype table: code -> (bits per element, numpy dtype name, ml_dtypes name).
_ST_DTYPES = {
    "BOOL": (8, "bool", None),
    "U8": (8, "uint8", None),
    "I8": (8, "int8", None),
    "U16": (16, "uint16", None),
    "I16": (16, "int16", None),
    "F16": (16, "float16", None),
    "U32": (32, "uint32", None),
    "I32": (32, "int32", None),
    "F32": (32, "float32", None),
    "U64": (64, "uint64", None),
    "I64": (64, "int64", None),
    "F64": (64, "float64", None),
    "C64": (64, "complex64", None),
    "BF16": (16, None, "bfloat16"),
    "F8_E5M2": (8, None, "float8_e5m2"),
    "F8_E4M3": (8, None, "float8_e4m3fn"),
    "F8_E4M3FNUZ": (8, None, "float8_e4m3fnuz"),
    "F8_E5M2FNUZ": (8, None, "float8_e5m2fnuz"),
    "F8_E8M0": (8, None, "float8_e8m0fnu"),
    "F4": (4, None, None),
    "F6_E2M3": (6, None, None),
    "F6_E3M2": (6, None, None),
}
_ST_MAX_HEADER = 100_000_000
_ST_MAX_NDIM = 32
_PB_PARTS = ("signs", "mu", "alpha", "sigma", "residual.counts", "residual.values", "residual.code_offsets")


class StoredTensor:
    """A tensor kept as its safetensors dtype code, shape and bytes (what the reference
    ``load_file`` returns when numpy has no such dtype here)."""

    def __init__(self, dtype, shape, data):
        self.dtype, self.shape, self.data = dtype, tuple(shape), bytes(data)

    def __eq__(self, other):
        return (self.dtype, self.shape, bytes(self.data)) == (other.dtype, other.shape, bytes(other.data))


def _ml_dtype(name):
    try:
        import ml_dtypes
    except ImportError:
        return None
    return np.dtype(getattr(ml_dtypes, name)) if hasattr(ml_dtypes, name) else None


def _st_exact_dtype(code):
    """The numpy dtype holding ``code`` exactly here, or None."""
    _, nm, ml = _ST_DTYPES[code]
    if nm is not None:
        return np.dtype(nm)
    return _ml_dtype(ml) if ml is not None else None


def _st_nbytes(code, shape) -> int:
    """§8: bytes of a tensor; ValueError when the shape breaks the §8 rules."""
    bits = _ST_DTYPES[code][0]
    if len(shape) > _ST_MAX_NDIM:
        raise ValueError(f"{len(shape)} dimensions, at most {_ST_MAX_NDIM}")
    if _nonzero_product(shape) * max(bits // 8, 1) >= 1 << 63:
        raise ValueError(f"shape {list(shape)} is too large")
    if math.prod(shape) * bits % 8:
        raise ValueError(f"{code} of shape {list(shape)} does not fill whole bytes")
    return math.prod(shape) * bits // 8


def _st_entry(name, a):
    """(code, shape, little-endian bytes) of an array or a stored tensor."""
    if isinstance(getattr(a, "dtype", None), str):  # StoredTensor / pbcodec.RawTensor
        code, shape, data = a.dtype, tuple(a.shape), bytes(a.data)
        if code not in _ST_DTYPES or len(data) != _st_nbytes(code, shape):
            raise ValueError(f"tensor {name!r}: {code} data do not match shape {shape}")
        return code, [int(d) for d in shape], data
    a = np.asarray(a)
    code = None
    for c, (_, nm, ml) in _ST_DTYPES.items():
        want = np.dtype(nm) if nm is not None else (_ml_dtype(ml) if ml is not None else None)
        if want is not None and a.dtype.newbyteorder("=") == want:
            code = c
            break
    if code is None:
        raise TypeError(f"tensor {name!r}: cannot store dtype {a.dtype} in a safetensors file")
    if a.ndim > _ST_MAX_NDIM:
        raise ValueError(f"tensor {name!r}: {a.ndim} dimensions, at most {_ST_MAX_NDIM}")
    return code, [int(d) for d in a.shape], a.astype(a.dtype.newbyteorder("<")).tobytes()


def save_file(tensors, path, metadata=None) -> None:
    """Write ``{name: PBTensor | ndarray | StoredTensor}`` as a safetensors file with the
    canonical bytes of docs/format.md §8 (reference twin of ``pbcodec.save_file``).
    Everything is checked before the file is opened."""
    metadata = dict(metadata or {})
    if "pbcodec" in metadata:
        raise ValueError("metadata key 'pbcodec' is reserved")
    entries = {}
    desc = {}

    def put(key, value):
        if key in entries:
            raise ValueError(f"tensor name {key!r} is used twice")
        entries[key] = value

    for name, v in tensors.items():
        if name == "__metadata__":
            raise ValueError("'__metadata__' cannot name a tensor")
        if isinstance(v, PBTensor):
            v.to_bytes()  # validates, like the library does before writing
            r = v.residual
            arrays = (v.signs, v.mu, v.alpha, v.sigma, r.counts, r.values, r.code_offsets)
            for suffix, arr in zip(_PB_PARTS, arrays, strict=True):
                put(f"{name}.{suffix}", _st_entry(name, arr))
            desc[name] = {
                "codec": "pbcodec.pb",
                "version": 1,
                "shape": list(v.shape),
                "dense_bits": 1,
                "group_size": v.group_size,
                "count_bits": r.count_bits,
                "salient_bits": r.value_bits,
                "scale_dtype": str(v.mu.dtype),
            }
        else:
            put(name, _st_entry(name, v))
    order = sorted(entries, key=lambda k: (-_ST_DTYPES[entries[k][0]][0], k))
    header = {}
    offset = 0
    for k in order:
        code, shape, data = entries[k]
        header[k] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    if desc:
        metadata["pbcodec"] = json.dumps(desc, sort_keys=True)
    if metadata:
        header["__metadata__"] = metadata
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-(8 + len(hb)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb + b"".join(entries[k][2] for k in order))


class _Pairs(list):
    """A JSON object as its (key, value) pairs, in file order."""


_DESC_FIELDS = ("codec", "version", "shape", "dense_bits", "group_size", "count_bits", "salient_bits", "scale_dtype")


def _descriptions(text) -> dict:
    """§8.2: the description object. Keys may not repeat in it nor among a description's
    known fields; other fields are ignored, whatever they hold."""
    try:
        top = json.loads(text, object_pairs_hook=_Pairs)
    except (json.JSONDecodeError, RecursionError) as e:
        raise FormatError(f"pbcodec metadata is not valid JSON ({e})") from None
    if not isinstance(top, _Pairs):
        raise FormatError("pbcodec metadata must be a JSON object")
    out = {}
    for name, row in top:
        if name in out:
            raise FormatError(f"description {name!r} appears twice")
        if not isinstance(row, _Pairs):
            raise FormatError(f"{name}: description is not an object")
        fields = {}
        for k, v in row:
            if k not in _DESC_FIELDS:
                continue
            if k in fields:
                raise FormatError(f"{name}: field {k!r} appears twice")
            if isinstance(v, _Pairs) or (isinstance(v, list) and not all(_is_json_int(x) for x in v)):
                raise FormatError(f"{name}: field {k!r} must be a scalar or a list of integers")
            fields[k] = v
        out[name] = fields
    return out


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise FormatError("a JSON object repeats a key")
    return dict(pairs)


def _is_json_int(x) -> bool:
    return type(x) is int  # not bool, not float


def load_file(path) -> dict:
    """Read a safetensors file (reference twin of ``pbcodec.load_file``): compressed
    tensors are rebuilt from their components and serialized-form validated; plain
    tensors come back as numpy arrays of their exact dtype, or as
    :class:`StoredTensor` when numpy has none here (§8)."""
    with open(path, "rb") as f:
        buf = f.read()
    if len(buf) < 8:
        raise FormatError("file too short for safetensors")
    (n,) = struct.unpack_from("<Q", buf, 0)
    if n > min(_ST_MAX_HEADER, len(buf) - 8):
        raise FormatError("header length exceeds the file or the 100 MB limit")
    try:
        header = json.loads(buf[8 : 8 + n].decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise FormatError(f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise FormatError("header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError("__metadata__ must map strings to strings")
    data = buf[8 + n :]
    arrays, spans = {}, []
    for name, e in header.items():
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise FormatError(f"tensor {name!r}: bad entry")
        code, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(code, str) or code not in _ST_DTYPES:
            raise FormatError(f"tensor {name!r}: unknown dtype {code!r}")
        if not isinstance(shape, list) or not all(_is_json_int(d) and d >= 0 for d in shape):
            raise FormatError(f"tensor {name!r}: bad shape")
        if not isinstance(offs, list) or len(offs) != 2 or not all(_is_json_int(o) and o >= 0 for o in offs):
            raise FormatError(f"tensor {name!r}: bad data_offsets")
        try:
            nbytes = _st_nbytes(code, shape)
        except ValueError as err:
            raise FormatError(f"tensor {name!r}: {err}") from None
        b, end = offs
        if not b <= end <= len(data) or end - b != nbytes:
            raise FormatError(f"tensor {name!r}: bad data_offsets")
        spans.append((b, end))
        dt = _st_exact_dtype(code)
        raw = data[b:end]
        if dt is None:
            arrays[name] = StoredTensor(code, shape, raw)
        else:
            arrays[name] = np.frombuffer(raw, dtype=dt.newbyteorder("<")).reshape(shape)
    pos = 0
    for b, end in sorted(spans):
        if b != pos:
            raise FormatError("hole or overlap in the data buffer")
        pos = end
    if pos != len(data):
        raise FormatError("bytes after the last tensor")
    out = {}
    desc = _descriptions(metadata["pbcodec"]) if "pbcodec" in metadata else {}
    owned = set()
    for name, d in desc.items():
        d = {k: v for k, v in d.items() if v is not None}  # §8.2: a null field counts as absent
        if d.get("codec") != "pbcodec.pb" or not _is_json_int(d.get("version")) or d["version"] != 1:
            raise FormatError(f"{name}: unknown codec or version")
        missing = [k for k in _PB_PARTS if f"{name}.{k}" not in arrays]
        if missing:
            raise FormatError(f"{name}: missing component(s) {missing}")
        owned.update(f"{name}.{k}" for k in _PB_PARTS)
        a = {k: arrays[f"{name}.{k}"] for k in _PB_PARTS}
        try:
            m, n_ = d["shape"]
            if not all(_is_json_int(v) for v in (m, n_, d["group_size"], d["count_bits"], d["salient_bits"])):
                raise FormatError("non-integer parameters")
            dense_bits = d.get("dense_bits", 1)
            if d.get("scale_dtype") not in ("float16", "float32") or not _is_json_int(dense_bits) or dense_bits != 1:
                raise FormatError("bad scale_dtype or dense_bits")
            ng = _n_groups(n_, d["group_size"]) if d["group_size"] > 0 else -1
            want = {
                "signs": (np.uint8, (m, _packed_len(n_, 1))),
                "mu": (np.dtype(d["scale_dtype"]), (m, ng)),
                "alpha": (np.dtype(d["scale_dtype"]), (m, ng)),
                "sigma": (np.dtype(d["scale_dtype"]), (m,)),
                "residual.code_offsets": (np.int64, (m + 1,)),
                "residual.counts": (np.uint8, None),
                "residual.values": (np.int8 if d["salient_bits"] == 8 else np.uint8, None),
            }
            for k, (dt, shp) in want.items():
                arr = a[k]
                if not isinstance(arr, np.ndarray) or arr.dtype != dt:
                    raise FormatError(f"{k}: wrong dtype")
                if (arr.shape != shp) if shp is not None else (arr.ndim != 1):
                    raise FormatError(f"{k}: wrong shape {arr.shape}")
            co = a["residual.code_offsets"].astype(np.int64)
            vo = np.zeros(m + 1, np.int64)  # recomputed by from_bytes' validating walk below
            rle = RLE((m, n_), d["count_bits"], d["salient_bits"], a["residual.counts"], a["residual.values"], co, vo)
            num_values = _count_values(rle)
            rle = RLE(
                (m, n_), d["count_bits"], d["salient_bits"], a["residual.counts"], a["residual.values"], co, num_values
            )
            t = PBTensor((m, n_), a["signs"], a["mu"], a["alpha"], a["sigma"], rle, d["group_size"])
            out[name] = PBTensor.from_bytes(t.to_bytes())  # full §7 validation
        except (ValueError, TypeError, KeyError, IndexError) as e:
            raise FormatError(f"{name}: invalid components ({e})") from None
    for k, v in arrays.items():
        if k not in owned:
            out[k] = v
    return out


def _count_values(rle: RLE) -> np.ndarray:
    """value_offsets implied by the codes (non-escape codes per row)."""
    cb = rle.count_bits
    if not 1 <= cb <= 8:
        raise CorruptError(f"count_bits {cb} out of range")
    codes = unpack_bits(rle.counts, cb, int(rle.code_offsets[-1])) if rle.code_offsets.size else np.zeros(0, np.uint8)
    isval = (codes != (1 << cb) - 1).astype(np.int64)
    csum = np.concatenate([[0], np.cumsum(isval)])
    return csum[np.clip(rle.code_offsets, 0, codes.size)].astype(np.int64)


# ---------------------------------------------------------------------------
# §9 k-bit frames
# ---------------------------------------------------------------------------

_FRAME_HEADER = struct.Struct("<4sHBBQ")  # magic, version u16, bits u8, signed u8, count u64


def pack_frame(codes, bits, signed=False) -> bytes:
    """A whole array as one k-bit frame (§9): header, ``pack_bits`` of the
    C-order flattened codes, CRC-32C. Unsigned: uint8 (or int8 as its bytes)
    codes ``< 2**bits``; signed: int8 values stored in two's complement."""
    bits = _check_bits(bits)
    a = np.asarray(codes)
    flat = [int(v) for v in a.reshape(-1)]
    if signed:
        if a.dtype != np.int8:
            raise TypeError(f"signed frames take int8 values, got dtype {a.dtype}")
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        if any(v < lo or v > hi for v in flat):
            raise ValueError(f"values must be in {lo}..{hi} for bits={bits}")
        stored = [v & ((1 << bits) - 1) for v in flat]
    else:
        if a.dtype not in (np.uint8, np.int8):
            raise TypeError(f"unsigned frames take uint8 codes, got dtype {a.dtype}")
        stored = [v & 0xFF for v in flat]  # int8 taken as its byte
    packed = pack_bits(np.array(stored, dtype=np.int64).reshape(len(stored)), bits)
    body = _FRAME_HEADER.pack(b"PBBP", 1, bits, 1 if signed else 0, len(stored)) + packed.tobytes()
    return body + struct.pack("<I", crc32c(body))


def unpack_frame(buf) -> np.ndarray:
    """Inverse of :func:`pack_frame` (§9), with its checks in the order listed there."""
    data = bytes(buf)
    if len(data) < _FRAME_HEADER.size + _CRC_SIZE:
        raise TruncatedError(f"{len(data)} bytes is too short for a k-bit frame")
    magic, version, bits, signed, count = _FRAME_HEADER.unpack_from(data, 0)
    if magic != b"PBBP":
        raise CorruptError("bad magic")
    if version != 1:
        raise UnsupportedVersionError(f"unsupported version {version}")
    if not 1 <= bits <= 8 or signed not in (0, 1):
        raise CorruptError("bad bits or signed flag")
    need = _FRAME_HEADER.size + _packed_len(count, bits) + _CRC_SIZE
    if len(data) != need:
        raise (TruncatedError if need > len(data) else CorruptError)("length mismatch")
    if struct.unpack("<I", data[-4:])[0] != crc32c(data[:-4]):
        raise CorruptError("checksum mismatch")
    packed = np.frombuffer(data[_FRAME_HEADER.size : -4], dtype=np.uint8)
    used = count * bits
    if used % 8 and int(packed[-1]) >> (used % 8):
        raise CorruptError("nonzero padding bits")
    codes = unpack_bits(packed, bits, count)
    if not signed:
        return codes
    half = 1 << (bits - 1)
    return np.array([c - (1 << bits) if c >= half else c for c in codes.tolist()], dtype=np.int8)
