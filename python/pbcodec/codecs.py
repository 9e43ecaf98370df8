"""numcodecs codecs, so zarr (and anything else built on numcodecs) can store
sparse and low-bit quantized arrays with pbcodec's formats:

- :class:`ZeroRun` (``id = "pbcodec.zerorun"``): the escaped zero-run code of
  sparse int8 / int4 arrays (docs/format.md §3-4; one serialized RLE per chunk,
  rows along the chunk's last axis).
- :class:`BitPack` (``id = "pbcodec.bitpack"``): k-bit packing of 1..8-bit
  codes, unsigned or two's complement (docs/format.md §9).

Both are registered through the ``numcodecs.codecs`` entry point, so
``numcodecs.get_codec({"id": "pbcodec.zerorun"})`` (and zarr reading an array
whose metadata names them) finds them without importing pbcodec first.
Needs ``pip install "pbcodec[numcodecs]"``. With zarr, use them as the
compressor of a ``zarr_format=2`` array (zarr v3 arrays accept only codecs
registered with zarr itself).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numcodecs.abc import Codec
from numcodecs.compat import ensure_contiguous_ndarray, ensure_ndarray, ndarray_copy

from .bitpack import pack_frame, unpack_frame
from .rle import RLE, rle_decode, rle_encode

__all__ = ["BitPack", "ZeroRun"]


class ZeroRun(Codec):
    """Escaped zero-run code for sparse int8 (``value_bits=8``) or int4
    (``value_bits=4``, values in -8..7 held in int8) arrays.

    Parameters
    ----------
    count_bits : int 1..8 or ``"auto"``
        Run-code width (``"auto"``: the smallest encoding, docs/format.md §3.5).
    value_bits : 8 or 4

    ``encode`` takes an int8 array of any shape (rows = last axis) and returns
    the serialized RLE (bytes, CRC-32C checked); ``decode`` returns the int8
    array with its shape. Raises TypeError for a non-int8 input, ValueError for
    an int4 value out of range, :class:`pbcodec.FormatError` for a malformed buffer.
    Size: close to the entropy bound H(p) + 8p bits per element for density p.
    """

    codec_id = "pbcodec.zerorun"

    def __init__(self, count_bits: int | str = "auto", value_bits: int = 8) -> None:
        if count_bits != "auto" and not (type(count_bits) is int and 1 <= count_bits <= 8):
            raise ValueError(f"count_bits must be 1..8 or 'auto', got {count_bits!r}")
        if value_bits not in (4, 8) or type(value_bits) is not int:
            raise ValueError(f"value_bits must be 4 or 8, got {value_bits!r}")
        self.count_bits = count_bits
        self.value_bits = value_bits

    def encode(self, buf: Any) -> bytes:
        a = ensure_ndarray(buf)
        if a.dtype != np.int8:
            raise TypeError(f"{self.codec_id} encodes int8 arrays, got dtype {a.dtype}")
        a = np.ascontiguousarray(a)
        if a.ndim == 0:
            a = a.reshape(1)
        return rle_encode(a, count_bits=self.count_bits, value_bits=self.value_bits).to_bytes()

    def decode(self, buf: Any, out: Any = None) -> Any:
        b = ensure_contiguous_ndarray(buf).reshape(-1).view(np.uint8)
        dense = rle_decode(RLE.from_bytes(b))
        return ndarray_copy(dense, out) if out is not None else dense


class BitPack(Codec):
    """k-bit packing of small integer codes (docs/format.md §9).

    Parameters
    ----------
    bits : int 1..8
        Bits per code.
    signed : bool
        False: uint8 codes ``0 .. 2**bits - 1`` (int8 input is taken as its
        bytes); True: int8 values ``-2**(bits-1) .. 2**(bits-1) - 1`` in two's
        complement (e.g. int4 weights with ``bits=4``).

    ``encode`` returns the frame (bytes); ``decode`` returns the flat codes
    (uint8, or int8 when signed), which zarr reshapes to the chunk. Raises
    ValueError for a code out of range, :class:`pbcodec.FormatError` for a
    malformed buffer.
    """

    codec_id = "pbcodec.bitpack"

    def __init__(self, bits: int, signed: bool = False) -> None:
        if type(bits) is not int or not 1 <= bits <= 8:
            raise ValueError(f"bits must be an int in 1..8, got {bits!r}")
        self.bits = bits
        self.signed = bool(signed)

    def encode(self, buf: Any) -> bytes:
        a = ensure_ndarray(buf)
        if self.signed and a.dtype != np.int8:
            raise TypeError(f"{self.codec_id} with signed=True encodes int8 arrays, got dtype {a.dtype}")
        if not self.signed and a.dtype not in (np.uint8, np.int8):
            raise TypeError(f"{self.codec_id} encodes uint8 codes, got dtype {a.dtype}")
        return pack_frame(a, self.bits, signed=self.signed)

    def decode(self, buf: Any, out: Any = None) -> Any:
        codes = unpack_frame(ensure_contiguous_ndarray(buf).reshape(-1).view(np.uint8))
        return ndarray_copy(codes, out) if out is not None else codes
