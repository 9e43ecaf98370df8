"""Argument checking shared by the public wrappers (no Rust here)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def rows_of(shape: tuple[int, ...]) -> int:
    """Number of rows (product of all but the last axis) of an array shape."""
    if len(shape) <= 2:  # the common cases, without math.prod's overhead
        return shape[0] if len(shape) == 2 else 1
    return math.prod(shape[:-1])


def check_bits(bits: Any, name: str = "bits") -> int:
    if type(bits) is int and 1 <= bits <= 8:  # fast path: the checks below cost ~0.4 us
        return bits
    if isinstance(bits, (bool, np.bool_)) or not isinstance(bits, (int, np.integer)):
        raise TypeError(f"{name} must be an int in 1..8, got {bits!r}")
    if not 1 <= int(bits) <= 8:
        raise ValueError(f"{name} must be in 1..8, got {bits}")
    return int(bits)


def count_bits_arg(count_bits: Any) -> int:
    """``count_bits`` of the zero-run code: an int in 1..8, or ``"auto"`` (returned as 0)."""
    if isinstance(count_bits, str):
        if count_bits != "auto":
            raise ValueError(f"count_bits must be 1..8 or 'auto', got {count_bits!r}")
        return 0
    return check_bits(count_bits, "count_bits")


def check_count(count: Any) -> int:
    if type(count) is int and count >= 0:
        return count
    if isinstance(count, (bool, np.bool_)) or not isinstance(count, (int, np.integer)):
        raise TypeError(f"count must be a non-negative int, got {count!r}")
    if count < 0:
        raise ValueError(f"count must be non-negative, got {count}")
    return int(count)


def as_array(x: Any, name: str) -> np.ndarray:
    """Any array-like (torch tensors included, via __array__) as an ndarray of ndim >= 1."""
    a = np.asarray(x)
    if a.ndim == 0:
        raise ValueError(f"{name} must have at least one dimension (got a scalar)")
    return a


def as_uint8_codes(x: Any, bits: int, name: str = "codes") -> np.ndarray:
    """C-contiguous uint8 codes. uint8 input is used as is (the core checks the
    range); other integer dtypes are range-checked here so narrowing never
    silently truncates."""
    a = as_array(x, name)
    if a.dtype.char == "B":  # the common case, first: dtype comparisons cost ~0.3 us each
        return np.ascontiguousarray(a)
    if a.dtype == np.bool_:
        a = a.view(np.uint8)
    else:
        if a.dtype.kind not in "ui":
            raise TypeError(f"{name} must be an unsigned integer array, got dtype {a.dtype}")
        if a.size:
            lo, hi = int(a.min()), int(a.max())
            if lo < 0 or hi >= (1 << bits):
                bad = lo if lo < 0 else hi
                raise ValueError(f"{name} value {bad} does not fit in {bits} bits (0..{(1 << bits) - 1})")
        a = a.astype(np.uint8)
    return np.ascontiguousarray(a)


def as_int8(x: Any, name: str = "values") -> np.ndarray:
    """C-contiguous int8; other integer dtypes must already be in -128..127."""
    a = as_array(x, name)
    if a.dtype != np.int8:
        if a.dtype.kind not in "uib":
            raise TypeError(f"{name} must be an int8 array, got dtype {a.dtype}")
        if a.size and a.dtype != np.bool_:
            lo, hi = int(a.min()), int(a.max())
            if lo < -128 or hi > 127:
                raise ValueError(f"{name} value {lo if lo < -128 else hi} does not fit in int8")
        a = a.astype(np.int8)
    return np.ascontiguousarray(a)


def c_aligned(a: np.ndarray) -> np.ndarray:
    """``a`` if it is C-contiguous and aligned, else an aligned C-contiguous copy: the
    core reads arrays as Rust slices, which must be both (an unaligned view, e.g. of a
    memory-mapped file or a byte offset into a buffer, is copied, not rejected)."""
    f = a.flags
    if f.c_contiguous and f.aligned:
        return a
    return np.require(a, requirements=["C", "A"])


def unshared(a: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """``a``, or a copy of it when it may share memory with the caller's ``out=``
    (``f(x, out=x)``): the result is then what it would be without ``out=``, as with
    numpy's own functions."""
    if out is not None and np.may_share_memory(a, out):
        return a.copy()
    return a


def check_disjoint(out: np.ndarray | None, arrays: Any, what: str) -> None:
    """ValueError when ``out=`` overlaps the (encoded) data it is computed from."""
    if out is not None and any(np.may_share_memory(out, a) for a in arrays):
        raise ValueError(f"out overlaps the {what} it is computed from; pass a separate array")


def prepare_out(out: Any, shape: tuple[int, ...], dtype: Any, name: str = "out") -> np.ndarray:
    """Allocate the result, or check a caller's `out=`: exact dtype and shape,
    C-contiguous, aligned and writeable (results are written in place, never copied)."""
    if out is None:
        return np.empty(shape, dtype=dtype)
    if (
        type(out) is np.ndarray
        and out.dtype is np.dtype(dtype)
        and out.shape == shape
        and out.flags.c_contiguous
        and out.flags.aligned
        and out.flags.writeable
    ):
        return out  # fast path; the checks below name the problem
    dtype = np.dtype(dtype)
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(out).__name__}")
    if out.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {out.dtype}")
    if out.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {out.shape}")
    if not out.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    if not out.flags.aligned:
        raise ValueError(
            f"{name} is not aligned in memory (address {out.ctypes.data:#x} is not a multiple of "
            f"{out.dtype.alignment}); results are written in place, so pass an aligned array"
        )
    if not out.flags.writeable:
        raise ValueError(f"{name} must be writeable")
    return out
