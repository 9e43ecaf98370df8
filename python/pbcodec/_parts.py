"""The parts of a PBTensor as they cross the binding to the compiled core.

Every ``_core.pb_*`` function that works on a PBTensor takes ``(meta, arrays)``
(rust/src/python.rs: ``PbMeta``, ``PbArrays``) and the ones that make a tensor return
that pair. :class:`PBParts` names both halves; being plain tuples underneath, its
instances go to the core as they are (``_core.pb_decompress(*parts, out)``), and
:meth:`PBParts.of` names what comes back.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import numpy.typing as npt


class PBMeta(NamedTuple):
    """The integers of a PBTensor (docs/format.md §6-7)."""

    m: int
    n: int
    group_size: int  # 1..n (1 when n = 0)
    scale_bits: int  # 16 (float16 scales) or 32 (float32)
    count_bits: int  # 1..8, the residual's run-code width
    value_bits: int  # 8 or 4: the residual's value width (salient_bits)


class PBArrays(NamedTuple):
    """The arrays of a PBTensor, each 1-D, C-contiguous and aligned."""

    signs: npt.NDArray[np.uint8]  # uint8 (m * ceil(n/8),): the sign plane, rows padded (§2)
    mu: npt.NDArray[np.float32]  # float32 (m * n_groups,), exact values of the scale dtype
    alpha: npt.NDArray[np.float32]  # float32 (m * n_groups,)
    sigma: npt.NDArray[np.float32]  # float32 (m,)
    counts: npt.NDArray[np.uint8]  # uint8: the residual's packed run codes (§3.4)
    values: npt.NDArray[np.uint8]  # uint8: int8 values as bytes, or packed 4-bit nibbles
    code_offsets: npt.NDArray[np.int64]  # int64 (m + 1,)
    value_offsets: npt.NDArray[np.int64]  # int64 (m + 1,)


class PBParts(NamedTuple):
    """``(meta, arrays)``: one PBTensor in the form the core takes and returns."""

    meta: PBMeta
    arrays: PBArrays

    @classmethod
    def of(cls, res: tuple[tuple[int, ...], tuple[np.ndarray, ...]]) -> PBParts:
        """Name the plain ``(meta, arrays)`` pair a core function returned."""
        meta, arrays = res
        return cls(PBMeta._make(meta), PBArrays._make(arrays))
