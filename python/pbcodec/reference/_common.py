"""Small argument helpers shared by the sections of the reference."""

from __future__ import annotations

import math

import numpy as np

_U64_MAX = 2**64 - 1


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
