"""pack_bits / unpack_bits / pack_signs / unpack_signs: Rust vs the pure-Python
reference (byte for byte, on every SIMD path), vs numpy, and on bad input."""

import numpy as np
import pbcodec
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from pbcodec import reference as ref

# Row lengths around the 8/16/32/64-code block edges of the kernels.
EDGE_LENGTHS = [0, 1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 200, 1000]

shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=70)


@st.composite
def codes_and_bits(draw):
    bits = draw(st.integers(1, 8))
    shape = draw(shapes)
    codes = draw(hnp.arrays(np.uint8, shape, elements=st.integers(0, (1 << bits) - 1)))
    return codes, bits


@given(codes_and_bits())
def test_pack_bits_matches_reference(simd, cb):
    codes, bits = cb
    got = pbcodec.pack_bits(codes, bits)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, ref.pack_bits(codes, bits))
    np.testing.assert_array_equal(pbcodec.unpack_bits(got, bits, codes.shape[-1]), codes)
    np.testing.assert_array_equal(ref.unpack_bits(got, bits, codes.shape[-1]), codes)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", EDGE_LENGTHS)
def test_pack_unpack_edge_lengths(simd, bits, n):
    rng = np.random.default_rng(n * 10 + bits)
    for shape in [(n,), (3, n), (2, 2, n)]:
        codes = rng.integers(0, 1 << bits, size=shape, dtype=np.uint8)
        packed = pbcodec.pack_bits(codes, bits)
        assert packed.shape == shape[:-1] + ((n * bits + 7) // 8,)
        np.testing.assert_array_equal(packed, ref.pack_bits(codes, bits))
        np.testing.assert_array_equal(pbcodec.unpack_bits(packed, bits, n), codes)
    # Extremes: all zero and all max.
    for v in (0, (1 << bits) - 1):
        codes = np.full((2, n), v, np.uint8)
        np.testing.assert_array_equal(pbcodec.pack_bits(codes, bits), ref.pack_bits(codes, bits))


@pytest.mark.parametrize("bits", range(1, 9))
def test_large_rows_every_path(simd, bits):
    # Long enough for many SIMD blocks, with a ragged tail and ragged rows.
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 1 << bits, size=(5, 4099), dtype=np.uint8)
    packed = pbcodec.pack_bits(codes, bits)
    np.testing.assert_array_equal(packed, ref.pack_bits(codes, bits))
    np.testing.assert_array_equal(pbcodec.unpack_bits(packed, bits, 4099), codes)


@given(hnp.arrays(np.uint8, shapes, elements=st.integers(0, 1)))
def test_bits1_equals_numpy(simd, x):
    np.testing.assert_array_equal(pbcodec.pack_bits(x, 1), np.packbits(x, axis=-1, bitorder="little"))
    packed = np.packbits(x, axis=-1, bitorder="little")
    want = np.unpackbits(packed, axis=-1, count=x.shape[-1], bitorder="little")
    np.testing.assert_array_equal(pbcodec.unpack_bits(packed, 1, x.shape[-1]), want)


@given(hnp.arrays(np.uint8, hnp.array_shapes(min_dims=1, max_dims=2, max_side=40)), st.integers(1, 8))
def test_unpack_ignores_padding_like_reference(simd, packed, bits):
    count = packed.shape[-1] * 8 // bits  # every byte used, last partially
    if (count * bits + 7) // 8 != packed.shape[-1]:
        return
    np.testing.assert_array_equal(pbcodec.unpack_bits(packed, bits, count), ref.unpack_bits(packed, bits, count))


def test_other_integer_dtypes_and_lists():
    np.testing.assert_array_equal(pbcodec.pack_bits([1, 2, 3], 2), pbcodec.pack_bits(np.array([1, 2, 3], np.uint8), 2))
    np.testing.assert_array_equal(
        pbcodec.pack_bits(np.array([[True, False, True]]), 1), np.packbits([[1, 0, 1]], axis=-1, bitorder="little")
    )
    x = np.arange(40, dtype=np.int64).reshape(4, 10) % 16
    np.testing.assert_array_equal(pbcodec.pack_bits(x, 4), ref.pack_bits(x.astype(np.uint8), 4))


def test_non_contiguous_input():
    x = np.random.default_rng(0).integers(0, 8, size=(20, 30), dtype=np.uint8)
    np.testing.assert_array_equal(
        pbcodec.pack_bits(x[::2, ::3], 3), ref.pack_bits(np.ascontiguousarray(x[::2, ::3]), 3)
    )
    np.testing.assert_array_equal(pbcodec.pack_bits(x.T, 3), ref.pack_bits(np.ascontiguousarray(x.T), 3))


def test_out_is_filled_in_place():
    x = np.arange(64, dtype=np.uint8).reshape(4, 16) % 4
    out = np.empty((4, 4), np.uint8)
    assert pbcodec.pack_bits(x, 2, out=out) is out
    np.testing.assert_array_equal(out, ref.pack_bits(x, 2))
    back = np.empty((4, 16), np.uint8)
    assert pbcodec.unpack_bits(out, 2, 16, out=back) is back
    np.testing.assert_array_equal(back, x)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("bits", [0, 9, -1])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        pbcodec.pack_bits(np.zeros(8, np.uint8), bits)
    with pytest.raises(ValueError, match="bits"):
        pbcodec.unpack_bits(np.zeros(1, np.uint8), bits, 8)


def test_bits_wrong_type():
    with pytest.raises(TypeError):
        pbcodec.pack_bits(np.zeros(8, np.uint8), 2.0)


@pytest.mark.parametrize("bits", range(1, 8))
def test_code_too_wide_is_rejected(simd, bits):
    for n, where in [(1, 0), (100, 99), (4099, 2000)]:
        x = np.zeros(n, np.uint8)
        x[where] = 1 << bits
        with pytest.raises(ValueError, match="does not fit"):
            pbcodec.pack_bits(x, bits)
        with pytest.raises(ValueError):
            ref.pack_bits(x, bits)
    with pytest.raises(ValueError, match="does not fit"):
        pbcodec.pack_bits(np.array([0, 1 << bits], np.int64), bits)
    with pytest.raises(ValueError, match="does not fit"):
        pbcodec.pack_bits(np.array([0, -1], np.int64), bits)


def test_wrong_dtypes():
    with pytest.raises(TypeError):
        pbcodec.pack_bits(np.zeros(8, np.float32), 1)
    with pytest.raises(TypeError):
        pbcodec.unpack_bits(np.zeros(1, np.int8), 1, 8)
    with pytest.raises(TypeError):
        pbcodec.pack_signs(np.zeros(8, np.int32))
    with pytest.raises(TypeError):
        pbcodec.unpack_signs(np.zeros(1, np.uint8), 8, dtype=np.int32)


def test_scalar_input_rejected():
    with pytest.raises(ValueError, match="dimension"):
        pbcodec.pack_bits(np.uint8(1), 1)


def test_unpack_wrong_packed_length():
    with pytest.raises(ValueError, match="need"):
        pbcodec.unpack_bits(np.zeros((2, 3), np.uint8), 4, 8)
    with pytest.raises(ValueError, match="need"):
        pbcodec.unpack_signs(np.zeros((2, 3), np.uint8), 8)


def test_bad_out():
    x = np.zeros((4, 16), np.uint8)
    with pytest.raises(ValueError, match="shape"):
        pbcodec.pack_bits(x, 2, out=np.empty((4, 5), np.uint8))
    with pytest.raises(TypeError, match="dtype"):
        pbcodec.pack_bits(x, 2, out=np.empty((4, 4), np.int8))
    with pytest.raises(ValueError, match="contiguous"):
        pbcodec.pack_bits(x, 2, out=np.empty((4, 8), np.uint8)[:, ::2])
    with pytest.raises(TypeError):
        pbcodec.pack_bits(x, 2, out=[0] * 16)
    ro = np.empty((4, 4), np.uint8)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        pbcodec.pack_bits(x, 2, out=ro)


def test_core_rechecks_sizes():
    # Calling the compiled layer directly with inconsistent sizes must raise, not crash.
    from pbcodec import _core

    with pytest.raises(ValueError):
        _core.pack_bits(np.zeros(10, np.uint8), 1, 10, 1, np.zeros(1, np.uint8))
    with pytest.raises(ValueError):
        _core.unpack_bits(np.zeros(1, np.uint8), 1, 64, 1, np.zeros(64, np.uint8))
    with pytest.raises(ValueError):
        _core.pack_bits(np.zeros(10, np.uint8), 3, 10, 1, np.zeros(6, np.uint8))


# -------------------------------------------------------------------- signs

SPECIALS = np.array([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, -np.nan, 1e-30, -1e-30], np.float64)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@given(data=st.data())
def test_pack_signs_matches_reference(simd, dtype, data):
    # Rows past every SIMD block size, few of them: big float16 draws made hypothesis
    # reject too many examples (a flaky FailedHealthCheck).
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=4))[:-1]
    shape = (*shape, data.draw(st.integers(0, 200)))
    x = data.draw(
        hnp.arrays(dtype, shape, elements=hnp.from_dtype(np.dtype(dtype), allow_nan=True, allow_infinity=True))
    )
    got = pbcodec.pack_signs(x)
    np.testing.assert_array_equal(got, ref.pack_signs(x))
    np.testing.assert_array_equal(got, np.packbits(np.signbit(x), axis=-1, bitorder="little"))
    pm = pbcodec.unpack_signs(got, x.shape[-1], dtype=dtype)
    assert pm.dtype == dtype
    np.testing.assert_array_equal(pm, ref.unpack_signs(got, x.shape[-1], dtype=dtype))
    np.testing.assert_array_equal(pm, np.where(np.signbit(x), -1.0, 1.0).astype(dtype))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("n", EDGE_LENGTHS)
def test_signs_edge_lengths_and_specials(simd, dtype, n):
    rng = np.random.default_rng(n)
    x = np.resize(SPECIALS, (3, n)).astype(dtype) if n else np.zeros((3, 0), dtype)
    x = x * rng.choice([1, -1], size=x.shape).astype(dtype) if n else x
    np.testing.assert_array_equal(pbcodec.pack_signs(x), np.packbits(np.signbit(x), axis=-1, bitorder="little"))
    np.testing.assert_array_equal(pbcodec.pack_signs(x), ref.pack_signs(x))


def test_minus_zero_is_negative():
    np.testing.assert_array_equal(pbcodec.pack_signs(np.array([-0.0, 0.0], np.float32)), [1])


def test_bfloat16_as_uint16_bits(simd):
    rng = np.random.default_rng(1)
    f = rng.standard_normal((4, 77)).astype(np.float32)
    bf = (f.view(np.uint32) >> 16).astype(np.uint16)  # truncation to bfloat16 bits
    got = pbcodec.pack_signs(bf)
    np.testing.assert_array_equal(got, np.packbits(np.signbit(f), axis=-1, bitorder="little"))
    np.testing.assert_array_equal(got, ref.pack_signs(bf))


def test_unpack_signs_out():
    packed = np.array([[0b10100101]], np.uint8)
    out = np.empty((1, 8), np.float32)
    assert pbcodec.unpack_signs(packed, 8, out=out) is out
    np.testing.assert_array_equal(out, [[-1, 1, -1, 1, 1, -1, 1, -1]])
    with pytest.raises(TypeError, match="dtype"):
        pbcodec.unpack_signs(packed, 8, out=np.empty((1, 8), np.float64))


def test_simd_level_api():
    levels = pbcodec.available_simd_levels()
    assert levels[0] == "scalar"
    assert pbcodec.simd_level() in levels
    with pytest.raises(ValueError):
        pbcodec.set_simd_level("sse9")


def test_torch_bfloat16_tensor(simd):
    torch = pytest.importorskip("torch")
    f = torch.randn(3, 77)
    f[0, 0] = -0.0
    got = pbcodec.pack_signs(f.to(torch.bfloat16))
    np.testing.assert_array_equal(got, np.packbits(np.signbit(f.numpy()), axis=-1, bitorder="little"))
