"""§9 k-bit frames (docs/format.md)."""

from __future__ import annotations

import struct

import numpy as np

from ..errors import CorruptError, TruncatedError, UnsupportedVersionError
from ._common import _check_bits, _packed_len
from .bitpack import pack_bits, unpack_bits
from .checksum import _CRC_SIZE, crc32c

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
