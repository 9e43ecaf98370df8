"""§3 the escaped zero-run code and §4 its serialized form (docs/format.md)."""

from __future__ import annotations

import struct

import numpy as np

from ..errors import CorruptError, TruncatedError, UnsupportedVersionError
from ._common import _U64_MAX, _is_int, _nonzero_product, _packed_len, _rows_of
from .bitpack import pack_bits, unpack_bits
from .checksum import _CRC_SIZE, crc32c

# §4 fixed layout: magic, version u16, count_bits u8, value_bits u8, ndim u8,
# index_width u8, reserved u16, reserved u32.
_MAGIC = b"PBRL"
_VERSION = 1
_HEADER = struct.Struct("<4sHBBBBHI")
assert _HEADER.size == 16
_MAX_NDIM = 32


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
