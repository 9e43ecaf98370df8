"""Pure-Python reference implementation of the pbcodec formats.

Written strictly from the byte-level specification in ``docs/format.md`` (which is
normative); section numbers in comments (``§3.2``) refer to that document. It uses only
the standard library and numpy and imports nothing from the compiled ``pbcodec._core``,
so property tests can check the Rust core against it byte for byte.

Clarity comes first; numpy vectorization is used only where it stays an obvious
transcription of the spec (bit planes for packing, cumulative sums for run positions).

One module per section group of docs/format.md: ``bitpack`` (§1-2), ``rle`` (§3-4),
``checksum`` (§5), ``pb`` (§6-7, including the int8 matvec of §6.4), ``files`` (§8),
``frames`` (§9); the public names are all importable from ``pbcodec.reference``.

Conventions: "row" is the last axis; an array of shape ``(d0, ..., dk, n)`` has
``rows = d0*...*dk`` independent rows of length ``n`` (a 1-D array is one row).
"""

from __future__ import annotations

from ..errors import FormatError
from ..errors import ScaleRangeError as ScaleRangeError  # reachable here, as before the split
from .bitpack import pack_bits, pack_signs, unpack_bits, unpack_signs
from .checksum import crc32c
from .files import StoredTensor as StoredTensor  # what load_file returns for dtypes numpy lacks
from .files import load_file, save_file
from .frames import pack_frame, unpack_frame
from .pb import PBTensor, compress, snr_db
from .rle import RLE, rle_decode, rle_encode

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
