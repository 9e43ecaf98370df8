"""Type stubs for the compiled core (internal: use the ``pbcodec`` package API).

Every function takes C-contiguous, aligned numpy arrays of exactly the dtypes
shown, re-checks all sizes, and raises ``ValueError`` (bad arguments) or
``pbcodec.FormatError`` (malformed encoded data). The GIL is released inside.
"""

import numpy as np
import numpy.typing as npt

U8 = npt.NDArray[np.uint8]
I8 = npt.NDArray[np.int8]
U16 = npt.NDArray[np.uint16]
U32 = npt.NDArray[np.uint32]
U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]
F32 = npt.NDArray[np.float32]

# (m, n, group_size, scale_bits, count_bits, value_bits)
PbMeta = tuple[int, int, int, int, int, int]
# (signs, mu, alpha, sigma as float32, counts, values, code_offsets, value_offsets)
PbArrays = tuple[U8, F32, F32, F32, U8, U8, I64, I64]
EncodedTuple = tuple[U8, U8, I64, I64, int]

def pack_bits(codes: U8, rows: int, n: int, bits: int, out: U8) -> None: ...
def unpack_bits(packed: U8, rows: int, count: int, bits: int, out: U8) -> None: ...
def pack_signs16(x: U16, rows: int, n: int, out: U8) -> None: ...
def pack_signs32(x: U32, rows: int, n: int, out: U8) -> None: ...
def pack_signs64(x: U64, rows: int, n: int, out: U8) -> None: ...
def unpack_signs16(packed: U8, rows: int, count: int, pos: int, neg: int, out: U16) -> None: ...
def unpack_signs32(packed: U8, rows: int, count: int, pos: int, neg: int, out: U32) -> None: ...
def unpack_signs64(packed: U8, rows: int, count: int, pos: int, neg: int, out: U64) -> None: ...
def rle_encode(x: I8, shape: list[int], count_bits: int, value_bits: int) -> EncodedTuple:
    """count_bits == 0 means "auto"; returns (counts, values, code_offsets, value_offsets, count_bits)."""

def rle_decode(
    counts: U8,
    values: U8,
    code_offsets: I64,
    value_offsets: I64,
    shape: list[int],
    count_bits: int,
    value_bits: int,
    out: I8,
) -> None: ...
def rle_to_bytes(
    counts: U8, values: U8, code_offsets: I64, shape: list[int], count_bits: int, value_bits: int
) -> bytes: ...
def rle_from_bytes(buf: U8) -> tuple[list[int], int, EncodedTuple]: ...
def rle_nbytes(ndim: int, rows: int, num_codes: int, num_values: int, count_bits: int, value_bits: int) -> int: ...
def crc32c(buf: U8) -> int: ...
def pb_compress(
    w: F32,
    m: int,
    n: int,
    importance: F32 | None,
    salient: float,
    salient_bits: int,
    count_bits: int,
    group_size: int,
    select_tensor: bool,
    shift: bool,
    scale_bits: int,
) -> tuple[PbMeta, PbArrays]:
    """count_bits == 0: auto; group_size == 0: whole row."""

def pb_decompress(meta: PbMeta, arrays: PbArrays, out: F32) -> None: ...
def pb_matvec(meta: PbMeta, arrays: PbArrays, x: F32, batch: int, out: F32) -> None: ...

class ExecLayout:
    """The execution layout of a PBTensor (docs/format.md §6.5); opaque."""

    @property
    def nbytes(self) -> int: ...
    @property
    def int8_supported(self) -> bool: ...

def pb_layout(meta: PbMeta, arrays: PbArrays) -> ExecLayout: ...
def pb_matvec_int8(layout: ExecLayout, x: F32, batch: int, out: F32, bias: F32 | None = None) -> None: ...
def pb_to_bytes(meta: PbMeta, arrays: PbArrays) -> bytes: ...
def pb_nbytes(meta: PbMeta, arrays: PbArrays) -> int: ...
def pb_validate(meta: PbMeta, arrays: PbArrays) -> I64:
    """Every from_bytes check on parts; returns the recomputed value offsets."""

def pb_from_bytes(buf: U8) -> tuple[PbMeta, PbArrays]: ...
def set_num_threads(n: int) -> None: ...
def get_num_threads() -> int: ...
def simd_level() -> str: ...
def available_simd_levels() -> list[str]: ...
def set_simd_level(name: str) -> None: ...
