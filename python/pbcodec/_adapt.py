"""Per-tensor adaptation of compression settings: one rule for the command line
(``pbcodec compress``) and :func:`pbcodec.torch.compress_model`.

When a whole model is compressed with one set of options, some tensors cannot take
them as given. The rule, applied per tensor and reported with the tensor's name:

- ``group_size`` larger than the tensor's number of columns: whole rows (one group).
- float16 scales that do not fit (a scale overflows, or a row's scales all underflow to
  zero: :class:`pbcodec.ScaleRangeError`): float32 scales for that tensor.
- float32 scales that still do not fit (weights near float32's limits): the tensor is
  left uncompressed (the caller copies it unchanged) with the reason.

Anything else (non-finite weights, bad options) is an error naming the tensor.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import ScaleRangeError
from .pb import PBTensor, compress


def fit_group_size(group_size: int | None, columns: int) -> tuple[int | None, str | None]:
    """The group size to use for a tensor with ``columns`` columns, and a note when it
    differs from the one asked for (``None``: whole rows)."""
    if group_size is not None and columns > 0 and group_size > columns:
        return None, f"group size {group_size} > {columns} columns: whole rows"
    return group_size, None


def compress_adapted(weight: Any, **kwargs: Any) -> tuple[PBTensor, list[str]]:
    """:func:`pbcodec.compress` with the module's adaptation rule. Returns the tensor and
    the notes (empty when nothing was adapted). Raises :class:`ScaleRangeError` when
    even float32 scales do not fit, and whatever :func:`compress` raises otherwise."""
    notes = []
    columns = int(np.shape(weight)[-1]) if np.ndim(weight) == 2 else 0
    gs, note = fit_group_size(kwargs.get("group_size"), columns)
    if note:
        notes.append(note)
        kwargs = {**kwargs, "group_size": gs}
    try:
        return compress(weight, **kwargs), notes
    except ScaleRangeError as e:
        if np.dtype(kwargs.get("scale_dtype", "float16")) != np.float16:
            raise
        reason = str(e).split(";")[0]  # drop the "use scale_dtype=..." hint: done here
        notes.append(f"float16 scales do not fit ({reason}): float32 scales")
    return compress(weight, **{**kwargs, "scale_dtype": "float32"}), notes
