"""PBParts (python/pbcodec/_parts.py) is the one Python definition of what crosses the
binding for a PBTensor: its field order must be the one rust/src/python.rs reads."""

from __future__ import annotations

import numpy as np
import pbcodec
import pytest
from pbcodec import _core
from pbcodec._parts import PBArrays, PBMeta, PBParts


def _tensor(**kw):
    w = np.random.default_rng(3).standard_normal((5, 40)).astype(np.float32)
    return pbcodec.compress(w, group_size=8, **kw)


@pytest.mark.parametrize("scale_dtype", ["float16", "float32"])
def test_parts_are_named_and_typed(scale_dtype):
    t = _tensor(scale_dtype=scale_dtype, salient_bits=4)
    p = t._parts()
    assert isinstance(p, PBParts) and isinstance(p.meta, PBMeta) and isinstance(p.arrays, PBArrays)
    r = t.residual
    assert p.meta == (5, 40, 8, 16 if scale_dtype == "float16" else 32, r.count_bits, 4)
    assert p.meta.group_size == 8 and p.meta.value_bits == 4
    want = dict(
        signs=np.uint8,
        mu=np.float32,
        alpha=np.float32,
        sigma=np.float32,
        counts=np.uint8,
        values=np.uint8,
        code_offsets=np.int64,
        value_offsets=np.int64,
    )
    assert PBArrays._fields == tuple(want)
    for name, dt in want.items():
        a = getattr(p.arrays, name)
        assert a.dtype == dt and a.ndim == 1 and a.flags.c_contiguous, name
    np.testing.assert_array_equal(p.arrays.mu, t.mu.astype(np.float32).ravel())
    np.testing.assert_array_equal(p.arrays.code_offsets, r.code_offsets)


def test_core_returns_what_pbparts_names():
    t = _tensor()
    p = PBParts.of(_core.pb_from_bytes(np.frombuffer(t.to_bytes(), np.uint8)))
    q = t._parts()
    assert p.meta == q.meta
    for name in PBArrays._fields:
        np.testing.assert_array_equal(getattr(p.arrays, name), getattr(q.arrays, name), err_msg=name)


@pytest.mark.parametrize("i", range(len(PBArrays._fields)))
def test_binding_reads_each_array_under_its_field_name(i):
    """The binding names an array in its errors: a non-contiguous array in field ``i``
    must be reported under PBArrays' name for field ``i`` (same order on both sides)."""
    meta, arrays = _tensor()._parts()
    a = arrays[i]
    strided = np.repeat(a, 2)[::2] if a.size > 1 else np.zeros(4, a.dtype)[::2]
    assert not strided.flags.c_contiguous
    bad = arrays._replace(**{PBArrays._fields[i]: strided})
    with pytest.raises(ValueError, match=rf"^{PBArrays._fields[i]} must be C-contiguous"):
        _core.pb_nbytes(meta, bad)


def test_binding_reads_scale_bits_from_its_field():
    meta, arrays = _tensor()._parts()
    with pytest.raises(ValueError, match="scale bits"):
        _core.pb_nbytes(meta._replace(scale_bits=8), arrays)
    # m, n, group_size, count_bits, value_bits in their fields: a wrong one is refused.
    assert (meta.m, meta.n, meta.group_size, meta.value_bits) == (5, 40, 8, 8)
    wrong = dict(m=6, n=48, group_size=16, count_bits=meta.count_bits % 8 + 1, value_bits=4)
    for field, v in wrong.items():
        with pytest.raises(ValueError):
            _core.pb_validate(meta._replace(**{field: v}), arrays)
