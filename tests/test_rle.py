"""The escaped zero-run code: Rust vs the pure-Python reference (every field and
every serialized byte), round trips, the spec's literal examples, and malformed
input of every kind."""

import numpy as np
import pbcodec
import pytest
from conftest import sparse_int8
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from pbcodec import reference as ref


def codes_of(r) -> np.ndarray:
    return pbcodec.unpack_bits(r.counts, r.count_bits, r.num_codes)


def assert_same(rust: pbcodec.RLE, py: "ref.RLE"):
    assert rust.shape == py.shape
    assert (rust.count_bits, rust.value_bits) == (py.count_bits, py.value_bits)
    assert (rust.num_codes, rust.num_values) == (py.num_codes, py.num_values)
    np.testing.assert_array_equal(rust.counts, py.counts)
    np.testing.assert_array_equal(rust.values.view(np.uint8), py.values.view(np.uint8))
    np.testing.assert_array_equal(rust.code_offsets, py.code_offsets)
    np.testing.assert_array_equal(rust.value_offsets, py.value_offsets)
    blob = rust.to_bytes()
    assert blob == py.to_bytes()
    assert len(blob) == rust.nbytes == py.nbytes


# ----------------------------------------------------------- literal examples


def test_seed_example():
    r = pbcodec.rle_encode(np.array([0, 0, 0, 0, 0, 0, 5, 0, 0, 1], np.int8), count_bits=4)
    assert codes_of(r).tolist() == [6, 2]
    assert r.values.tolist() == [5, 1]
    np.testing.assert_array_equal(pbcodec.rle_decode(r), [0, 0, 0, 0, 0, 0, 5, 0, 0, 1])


def test_escape_example():
    x = np.zeros(41, np.int8)
    x[40] = 3
    r = pbcodec.rle_encode(x, count_bits=4)
    assert codes_of(r).tolist() == [15, 15, 10]
    assert r.values.tolist() == [3]
    np.testing.assert_array_equal(pbcodec.rle_decode(r), x)


# ------------------------------------------------------------- property tests


@st.composite
def sparse_arrays(draw, value_bits=8):
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=60))
    density = draw(st.sampled_from([0.0, 0.01, 0.1, 0.3, 0.9, 1.0]))
    seed = draw(st.integers(0, 2**32 - 1))
    lo, hi = (-128, 127) if value_bits == 8 else (-8, 7)
    return sparse_int8(np.random.default_rng(seed), shape, density, lo, hi)


@given(data=st.data())
def test_encode_matches_reference(simd, data):
    vb = data.draw(st.sampled_from([4, 8]))
    x = data.draw(sparse_arrays(vb))
    cb = data.draw(st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8, "auto"]))
    r = pbcodec.rle_encode(x, count_bits=cb, value_bits=vb)
    assert_same(r, ref.rle_encode(x, count_bits=cb, value_bits=vb))
    np.testing.assert_array_equal(pbcodec.rle_decode(r), x)
    assert pbcodec.RLE.from_bytes(r.to_bytes()) == r
    # Cross-parse: each side reads the other's bytes.
    py = ref.RLE.from_bytes(r.to_bytes())
    np.testing.assert_array_equal(ref.rle_decode(py), x)


@given(hnp.arrays(np.int8, hnp.array_shapes(min_dims=1, max_dims=2, max_side=50)))
def test_dense_random_bytes(simd, x):
    # Arbitrary int8 (mostly nonzero): the worst case for the code.
    for cb in (1, 4, 8):
        r = pbcodec.rle_encode(x, count_bits=cb)
        assert_same(r, ref.rle_encode(x, count_bits=cb))
        np.testing.assert_array_equal(pbcodec.rle_decode(r), x)


@pytest.mark.parametrize("cb", range(1, 9))
@pytest.mark.parametrize("vb", [4, 8])
def test_runs_around_escape(simd, cb, vb):
    esc = (1 << cb) - 1
    top = 7 if vb == 4 else 127
    bottom = -8 if vb == 4 else -128
    for run in sorted({0, 1, esc - 1, esc, esc + 1, 2 * esc - 1, 2 * esc, 2 * esc + 1, 3 * esc}):
        if run < 0:
            continue
        row = np.zeros(run + 3, np.int8)
        row[run] = bottom
        row[run + 1] = top
        r = pbcodec.rle_encode(row, count_bits=cb, value_bits=vb)
        codes = codes_of(r).tolist()
        assert codes[: run // esc] == [esc] * (run // esc)
        assert codes[run // esc :] == [run % esc, 0]
        assert_same(r, ref.rle_encode(row, count_bits=cb, value_bits=vb))
        np.testing.assert_array_equal(pbcodec.rle_decode(r), row)


@pytest.mark.parametrize("vb", [4, 8])
def test_edge_arrays(simd, vb):
    lo, hi = (-8, 7) if vb == 4 else (-128, 127)
    cases = [
        np.zeros(0, np.int8),
        np.zeros((0, 5), np.int8),
        np.zeros((3, 0), np.int8),
        np.array([hi], np.int8),
        np.array([0], np.int8),
        np.zeros((4, 100), np.int8),
        np.full((3, 33), lo, np.int8),
        np.resize(np.array([lo, hi], np.int8), (2, 3, 65)),
    ]
    for x in cases:
        for cb in [1, 3, 4, 8, "auto"]:
            r = pbcodec.rle_encode(x, count_bits=cb, value_bits=vb)
            assert_same(r, ref.rle_encode(x, count_bits=cb, value_bits=vb))
            np.testing.assert_array_equal(pbcodec.rle_decode(r), x)
            assert pbcodec.RLE.from_bytes(r.to_bytes()) == r


def test_large_multirow(simd):
    x = sparse_int8(np.random.default_rng(5), (64, 3001), 0.07)
    for cb in [2, 4, "auto"]:
        r = pbcodec.rle_encode(x, count_bits=cb)
        assert_same(r, ref.rle_encode(x, count_bits=cb))
        np.testing.assert_array_equal(pbcodec.rle_decode(r), x)


def test_rows_decode_independently():
    x = sparse_int8(np.random.default_rng(9), (7, 500), 0.1)
    r = pbcodec.rle_encode(x, count_bits=3)
    codes = codes_of(r)
    for i in range(7):
        c0, c1 = r.code_offsets[i], r.code_offsets[i + 1]
        v0, v1 = r.value_offsets[i], r.value_offsets[i + 1]
        one = pbcodec.RLE((500,), 3, 8, pbcodec.pack_bits(codes[c0:c1], 3), r.values[v0:v1], [0, c1 - c0], [0, v1 - v0])
        np.testing.assert_array_equal(pbcodec.rle_decode(one), x[i])


@pytest.mark.parametrize("p", [0.01, 0.05, 0.1, 0.2])
def test_auto_near_entropy_bound(p):
    # iid masks: "auto" stays within 4% of H(p) + 8p bits per position (issue target).
    rng = np.random.default_rng(int(p * 1000))
    x = sparse_int8(rng, (256, 4096), p)
    r = pbcodec.rle_encode(x, count_bits="auto")
    q = np.count_nonzero(x) / x.size
    bound = -(q * np.log2(q) + (1 - q) * np.log2(1 - q)) + 8 * q
    stream_bits = 8 * (r.counts.nbytes + r.values.nbytes) / x.size
    assert stream_bits <= 1.04 * bound, (r.count_bits, stream_bits, bound)
    # And "auto" really is the smallest of the eight widths.
    sizes = [pbcodec.rle_encode(x, count_bits=b).nbytes for b in range(1, 9)]
    assert r.nbytes == min(sizes) and r.count_bits == 1 + sizes.index(min(sizes))


def test_decode_out():
    x = sparse_int8(np.random.default_rng(1), (3, 40), 0.2)
    r = pbcodec.rle_encode(x)
    out = np.full((3, 40), 99, np.int8)
    assert pbcodec.rle_decode(r, out=out) is out
    np.testing.assert_array_equal(out, x)
    with pytest.raises(ValueError, match="shape"):
        pbcodec.rle_decode(r, out=np.empty((3, 41), np.int8))
    with pytest.raises(TypeError, match="dtype"):
        pbcodec.rle_decode(r, out=np.empty((3, 40), np.uint8))


# ------------------------------------------------------------------ bad input


def test_bad_arguments():
    x = np.zeros(10, np.int8)
    with pytest.raises(TypeError):
        pbcodec.rle_encode(np.zeros(10, np.float32))
    with pytest.raises(ValueError, match="count_bits"):
        pbcodec.rle_encode(x, count_bits=0)
    with pytest.raises(ValueError, match="count_bits"):
        pbcodec.rle_encode(x, count_bits=9)
    with pytest.raises(ValueError, match="count_bits"):
        pbcodec.rle_encode(x, count_bits="best")
    with pytest.raises(ValueError, match="value_bits"):
        pbcodec.rle_encode(x, value_bits=6)
    with pytest.raises(ValueError, match="4 bits"):
        pbcodec.rle_encode(np.array([0, 8], np.int8), value_bits=4)
    with pytest.raises(ValueError, match="4 bits"):
        pbcodec.rle_encode(np.array([-9, 0], np.int8), value_bits=4)
    with pytest.raises(ValueError):
        pbcodec.rle_encode(np.array([300]))
    with pytest.raises(ValueError):
        pbcodec.rle_encode(np.int8(3))
    with pytest.raises(TypeError):
        pbcodec.rle_decode(b"not an RLE")


def sample_blobs():
    rng = np.random.default_rng(3)
    for shape, cb, vb in [((50,), 4, 8), ((3, 40), 2, 4), ((2, 3, 17), "auto", 8), ((4, 0), 3, 8)]:
        lo, hi = (-8, 7) if vb == 4 else (-128, 127)
        yield pbcodec.rle_encode(sparse_int8(rng, shape, 0.15, lo, hi), count_bits=cb, value_bits=vb).to_bytes()


@pytest.mark.parametrize("blob", list(sample_blobs()))
def test_truncated_extended_flipped(blob):
    for parse in (pbcodec.RLE.from_bytes, ref.RLE.from_bytes):
        for cut in range(len(blob)):
            with pytest.raises(pbcodec.FormatError):
                parse(blob[:cut])
        for extra in (b"\0", b"\0" * 7, blob):
            with pytest.raises(pbcodec.FormatError):
                parse(blob + extra)
    for i in range(len(blob)):
        for bit in range(8):
            bad = bytearray(blob)
            bad[i] ^= 1 << bit
            with pytest.raises(pbcodec.FormatError):
                pbcodec.RLE.from_bytes(bytes(bad))


def _reseal(body: bytes) -> bytes:
    """Re-sign a tampered blob with a valid CRC so deeper checks are reached."""
    return body + ref.crc32c(body).to_bytes(4, "little")


def _blob_parts(r):
    return bytearray(r.to_bytes()[:-4])


def test_malformed_but_checksummed():
    x = np.zeros(20, np.int8)
    x[5], x[19] = 3, -2
    r = pbcodec.rle_encode(x, count_bits=4)
    base = _blob_parts(r)
    header_end = 16 + 8 + 16  # 1-D
    cases = {}
    b = base.copy()
    b[4] = 2
    cases["version"] = b
    b = base.copy()
    b[0] = ord("X")
    cases["magic"] = b
    b = base.copy()
    b[6] = 9
    cases["count_bits"] = b
    b = base.copy()
    b[7] = 5
    cases["value_bits"] = b
    b = base.copy()
    b[9] = 8
    cases["index width"] = b
    b = base.copy()
    b[12] = 1
    cases["reserved"] = b
    b = base.copy()
    b[16:24] = (19).to_bytes(8, "little")
    cases["row too short"] = b
    b = base.copy()
    b[24:32] = (2**40).to_bytes(8, "little")
    cases["huge num_codes"] = b
    b = base.copy()
    b[32:40] = (2**62).to_bytes(8, "little")
    cases["huge num_values"] = b
    b = base.copy()
    b[16:24] = (2**64 - 1).to_bytes(8, "little")
    cases["huge shape"] = b
    # The codes are [5, 13] in one byte: make the second code an escape (15) that
    # leaves a trailing escape, then a zero value.
    b = base.copy()
    b[header_end + 4] = 0xF5
    cases["trailing escape / count mismatch"] = b
    b = base.copy()
    b[-1] = 0
    cases["zero value"] = b
    for _name, body in cases.items():
        blob = _reseal(bytes(body))
        with pytest.raises(pbcodec.FormatError):
            pbcodec.RLE.from_bytes(blob)
        with pytest.raises(pbcodec.FormatError):
            ref.RLE.from_bytes(blob)


def test_hand_built_rle_is_validated():
    # A row whose code points past its end must raise, not write out of bounds.
    bad = pbcodec.RLE((5,), 4, 8, np.array([9], np.uint8), np.array([1], np.int8), [0, 1], [0, 1])
    with pytest.raises(pbcodec.FormatError):
        pbcodec.rle_decode(bad)
    with pytest.raises(pbcodec.FormatError):
        bad.to_bytes()
    # Offsets that point past the value stream.
    bad = pbcodec.RLE((5,), 4, 8, np.array([0], np.uint8), np.array([], np.int8), [0, 1], [0, 1])
    with pytest.raises(pbcodec.FormatError):
        pbcodec.rle_decode(bad)
    # Offsets of the wrong length.
    bad = pbcodec.RLE((2, 5), 4, 8, np.array([0], np.uint8), np.array([1], np.int8), [0, 1], [0, 1])
    with pytest.raises(pbcodec.FormatError):
        pbcodec.rle_decode(bad)


def test_from_bytes_accepts_buffer_types():
    blob = pbcodec.rle_encode(np.array([0, 1, 0, 2], np.int8)).to_bytes()
    for b in (blob, bytearray(blob), memoryview(blob)):
        assert pbcodec.RLE.from_bytes(b).to_bytes() == blob


def test_decode_refuses_decompression_bombs():
    # 40 zeros per row are free; a 60-byte blob can declare 2**33 elements.
    r = pbcodec.rle_encode(np.zeros((2, 8), np.int8))
    bomb = pbcodec.RLE((2, 2**32), r.count_bits, 8, r.counts, r.values, r.code_offsets, r.value_offsets)
    assert len(bomb.to_bytes()) < 100
    with pytest.raises(ValueError, match="max_elements"):
        pbcodec.rle_decode(bomb)
    small = pbcodec.RLE((2, 1000), r.count_bits, 8, r.counts, r.values, r.code_offsets, r.value_offsets)
    np.testing.assert_array_equal(pbcodec.rle_decode(small, max_elements=2000), np.zeros((2, 1000), np.int8))
