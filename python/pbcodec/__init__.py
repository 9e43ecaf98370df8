"""pbcodec: storage and compute for partially-binarized neural-network weights.

Codec primitives (this module):

- :func:`pack_bits` / :func:`unpack_bits`: k-bit codes <-> little-endian bit streams.
- :func:`pack_signs` / :func:`unpack_signs`: IEEE sign bits <-> packed bits / ±1.0.
- :func:`pack_frame` / :func:`unpack_frame`: a whole array of k-bit codes in one self-describing frame.
- :func:`rle_encode` / :func:`rle_decode` / :class:`RLE`: the escaped zero-run code.
- :func:`compress` / :class:`PBTensor`: partially-binarized matrices with a
  decode-fused, multi-threaded :meth:`PBTensor.matvec`.
- :func:`from_pbllm`: pack PB-LLM's fake-quantized weights (binarized weights exact).
- :func:`compress_gptq` / :func:`input_hessian`: calibrated compression (GPTQ-style
  error compensation on calibration inputs) into the same PBTensors.
- :func:`save_file` / :func:`load_file`: safetensors files holding compressed tensors.
- :class:`RawTensor`: a stored tensor whose dtype numpy lacks (bfloat16 without
  ``ml_dtypes``, float8, packed float4/6), kept as its safetensors dtype and bytes.
- :class:`FormatError`: raised for any malformed serialized input or file; blob parsers
  raise one of its subclasses :class:`CorruptError`, :class:`TruncatedError`,
  :class:`UnsupportedVersionError`. :class:`ScaleRangeError`: a scale the chosen scale
  dtype cannot hold.
- :mod:`pbcodec.reference`: pure-Python twins of everything, written from docs/format.md.

SIMD kernels are chosen at run time; ``PBCODEC_SIMD=scalar|avx2|avx512`` caps
the level, and :func:`set_simd_level` changes it at run time.
``PBCODEC_NUM_THREADS`` sets the worker threads (an int in 1..1024, checked like
:func:`set_num_threads`; an invalid value is ignored with a ``RuntimeWarning``).
"""

from __future__ import annotations

import warnings

from . import _core
from .bitpack import pack_bits, pack_frame, pack_signs, unpack_bits, unpack_frame, unpack_signs
from .errors import CorruptError, FormatError, ScaleRangeError, TruncatedError, UnsupportedVersionError
from .files import RawTensor, load_file, load_metadata, save_file
from .gptq import compress_gptq, input_hessian
from .pb import PBTensor, compress, snr_db
from .pbllm import from_pbllm
from .rle import RLE, rle_decode, rle_encode

__version__ = "0.1.0"

__all__ = [
    "CorruptError",
    "FormatError",
    "PBTensor",
    "RLE",
    "RawTensor",
    "ScaleRangeError",
    "TruncatedError",
    "UnsupportedVersionError",
    "compress",
    "from_pbllm",
    "compress_gptq",
    "get_num_threads",
    "input_hessian",
    "load_file",
    "load_metadata",
    "save_file",
    "set_num_threads",
    "snr_db",
    "available_simd_levels",
    "pack_bits",
    "pack_frame",
    "pack_signs",
    "rle_decode",
    "rle_encode",
    "set_simd_level",
    "simd_level",
    "unpack_bits",
    "unpack_frame",
    "unpack_signs",
]


def simd_level() -> str:
    """The SIMD level the kernels use now: ``"scalar"``, ``"avx2"`` or ``"avx512"``."""
    return _core.simd_level()


def available_simd_levels() -> list[str]:
    """Every level this CPU can run, lowest first (``"scalar"`` is always there)."""
    return list(_core.available_simd_levels())


def set_simd_level(level: str) -> None:
    """Force a SIMD level for this process (tests, benchmarks). ValueError if
    the CPU lacks it. Codec outputs (packed bits, RLE streams, blobs) are
    identical on every level; matvec sums in a different order per level
    (agreement to ~1e-6 relative), but is identical for any thread count."""
    _core.set_simd_level(level)


def set_num_threads(n: int) -> None:
    """Worker threads for multi-threaded kernels (default: ``PBCODEC_NUM_THREADS``
    or all cores): an int in 1..1024 (ValueError otherwise; the core checks both
    sources with the same rule). Results are identical for any thread count."""
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < 2**63:
        raise ValueError(f"number of threads must be an int in 1..1024, got {n!r}")
    _core.set_num_threads(n)


def get_num_threads() -> int:
    """Current number of worker threads."""
    return int(_core.get_num_threads())


for _env_error in (_core.env_threads_error(), _core.env_spin_error()):
    if _env_error is not None:
        warnings.warn(_env_error, RuntimeWarning, stacklevel=2)
del _env_error
