"""PBTensor: Rust compress is byte-identical to the reference (docs/format.md §6.1),
matvec agrees with the reference on every SIMD path and thread count, the
serialized form round-trips and rejects malformed input."""

import numpy as np
import pbcodec
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pbcodec import reference as ref


def weights(rng, m, n, kind="gauss"):
    if kind == "gauss":
        return rng.standard_normal((m, n)).astype(np.float32)
    if kind == "heavy":
        return (rng.standard_t(3, size=(m, n)) * 0.02).astype(np.float32)
    if kind == "ties":  # many equal magnitudes: exercises tie-breaking
        return rng.choice(np.array([-2, -1, -0.0, 0, 1, 2], np.float32), size=(m, n))
    raise ValueError(kind)


def assert_same_tensor(rust, py):
    assert rust.shape == py.shape and rust.group_size == py.group_size
    assert rust.to_bytes() == py.to_bytes()
    assert rust.nbytes == py.nbytes == len(rust.to_bytes())


config = st.fixed_dictionaries(
    {
        "salient": st.sampled_from([0.0, 0.05, 0.1, 0.3, 1.0]),
        "salient_bits": st.sampled_from([4, 8]),
        "count_bits": st.sampled_from(["auto", 1, 3, 4, 8]),
        "select": st.sampled_from(["row", "tensor"]),
        "shift": st.booleans(),
        "scale_dtype": st.sampled_from(["float16", "float32"]),
    }
)


@given(
    cfg=config,
    m=st.integers(0, 9),
    n=st.integers(0, 80),
    group=st.sampled_from([None, 1, 7, 8, 32]),
    kind=st.sampled_from(["gauss", "heavy", "ties"]),
    use_importance=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_compress_byte_identical_to_reference(cfg, m, n, group, kind, use_importance, seed):
    rng = np.random.default_rng(seed)
    w = weights(rng, m, n, kind)
    if group is not None and not 1 <= group <= max(n, 1):
        group = None
    imp = rng.random(n).astype(np.float32) * 3 if use_importance else None
    if imp is not None and n:
        imp[rng.integers(0, n)] = -0.0  # -0.0 must rank like +0.0
    kw = dict(cfg, group_size=group, importance=imp)
    rust = pbcodec.compress(w, **kw)
    py = ref.compress(w, **kw)
    assert_same_tensor(rust, py)
    assert pbcodec.PBTensor.from_bytes(rust.to_bytes()) == rust
    np.testing.assert_array_equal(rust.decompress(), py.decompress())


def test_compress_larger_matrix_identical():
    rng = np.random.default_rng(1)
    w = weights(rng, 64, 1000, "heavy")
    for kw in [dict(), dict(group_size=128, salient_bits=4), dict(select="tensor", salient=0.2)]:
        assert_same_tensor(pbcodec.compress(w, **kw), ref.compress(w, **kw))


def test_float16_input_is_exact():
    w = np.random.default_rng(2).standard_normal((8, 40)).astype(np.float16)
    assert pbcodec.compress(w).to_bytes() == pbcodec.compress(w.astype(np.float32)).to_bytes()


def test_deterministic():
    w = np.random.default_rng(3).standard_normal((32, 256)).astype(np.float32)
    assert pbcodec.compress(w).to_bytes() == pbcodec.compress(w.copy()).to_bytes()


def test_half_rounding_vector_from_the_reference_author():
    # alpha = 1 + 2^-10 + 2^-11 + 2^-23 must round (directly from float64) to 0x3C01.
    w = np.array([[1, 1, 1 + 2**-10 + 2**-11 + 2**-23]], np.float32)
    t = pbcodec.compress(w, salient=0, shift=False)
    assert t.alpha.view(np.uint16)[0, 0] == 0x3C01
    assert t.to_bytes() == ref.compress(w, salient=0, shift=False).to_bytes()


def test_row_select_counts_and_salient_accuracy():
    rng = np.random.default_rng(4)
    w = weights(rng, 16, 200, "heavy")
    t = pbcodec.compress(w, salient=0.1)
    per_row = np.diff(t.residual.value_offsets)
    assert per_row.max() <= 20  # round(0.1 * 200); a code may round to 0
    wh = t.decompress()
    top = np.argsort(-np.abs(w), axis=1, kind="stable")[:, :20]
    rows = np.arange(16)[:, None]
    # Salient weights are reconstructed to within half a residual step.
    step = t.sigma.astype(np.float32)[:, None]
    assert np.all(np.abs(wh[rows, top] - w[rows, top]) <= 0.5 * step + 1e-6)


def test_more_salient_means_better_snr():
    w = weights(np.random.default_rng(5), 64, 512, "heavy")
    snrs = [pbcodec.snr_db(w, pbcodec.compress(w, salient=s).decompress()) for s in (0.0, 0.05, 0.1, 0.3)]
    assert snrs == sorted(snrs) and snrs[-1] > snrs[0] + 3


# ------------------------------------------------------------------- matvec


def rel_err(y, y_ref):
    return float(np.max(np.abs(y - y_ref)) / (np.max(np.abs(y_ref)) + 1e-30))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("count_bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_matvec_every_path(simd, threads, count_bits):
    rng = np.random.default_rng(count_bits)
    pbcodec.set_num_threads(threads)
    try:
        for (m, n), group, sb in [((37, 203), None, 8), ((64, 256), 32, 4), ((5, 50), 7, 8), ((100, 40), 8, 4)]:
            w = weights(rng, m, n, "heavy")
            t = pbcodec.compress(w, salient=0.15, salient_bits=sb, count_bits=count_bits, group_size=group)
            wh = t.decompress().astype(np.float64)
            for shape in [(n,), (1, n), (3, n), (17, n)]:
                x = rng.standard_normal(shape).astype(np.float32)
                y = t.matvec(x)
                assert y.shape == shape[:-1] + (m,) and y.dtype == np.float32
                y_ref = x.astype(np.float64) @ wh.T
                assert rel_err(y, y_ref) < 1e-5
                py = ref.PBTensor.from_bytes(t.to_bytes()).matvec(x)
                assert rel_err(y, py) < 1e-5
    finally:
        pbcodec.set_num_threads(2)


def test_matvec_identical_across_thread_counts():
    rng = np.random.default_rng(7)
    t = pbcodec.compress(weights(rng, 300, 500, "heavy"))
    x = rng.standard_normal((4, 500)).astype(np.float32)
    results = []
    for th in (1, 2, 3):
        pbcodec.set_num_threads(th)
        results.append(t.matvec(x))
    pbcodec.set_num_threads(2)
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


def test_matvec_out_and_errors():
    rng = np.random.default_rng(8)
    t = pbcodec.compress(weights(rng, 10, 30))
    x = rng.standard_normal(30).astype(np.float32)
    out = np.empty(10, np.float32)
    assert t.matvec(x, out=out) is out
    np.testing.assert_allclose(out, t.decompress() @ x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(t.matvec(x.astype(np.float64)), out, rtol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        t.matvec(np.zeros(31, np.float32))
    with pytest.raises(ValueError):
        t.matvec(np.zeros((2, 2, 30), np.float32))
    with pytest.raises(TypeError):
        t.matvec(np.zeros(30, np.int32))
    with pytest.raises(ValueError, match="shape"):
        t.matvec(x, out=np.empty(11, np.float32))


def test_empty_shapes():
    for m, n in [(0, 5), (4, 0), (0, 0)]:
        w = np.zeros((m, n), np.float32)
        t = pbcodec.compress(w)
        assert t.decompress().shape == (m, n)
        assert t.matvec(np.zeros(n, np.float32)).shape == (m,)
        assert pbcodec.PBTensor.from_bytes(t.to_bytes()) == t
        assert t.to_bytes() == ref.compress(w).to_bytes()


# -------------------------------------------------------- size and stats


def test_bits_per_weight_and_stats():
    w = np.random.default_rng(9).standard_normal((512, 4096)).astype(np.float32)
    t = pbcodec.compress(w, salient=0.1)
    st_ = t.stats()
    assert t.bits_per_weight <= 2.35
    parts = sum(
        st_[k]
        for k in ("signs_bpw", "scales_bpw", "residual_codes_bpw", "residual_values_bpw", "index_and_headers_bpw")
    )
    assert abs(parts - t.bits_per_weight) < 1e-9
    assert st_["signs_bpw"] == 1.0 and abs(st_["salient_fraction"] - 0.1) < 0.002
    assert st_["count_bits"] in range(1, 9)


def test_snr_db():
    w = np.array([1.0, -2.0, 3.0])
    assert pbcodec.snr_db(w, w) == float("inf")
    assert abs(pbcodec.snr_db(w, w * 0.9) - 20.0) < 1e-9
    assert pbcodec.snr_db(w, w * 0.9) == ref.snr_db(w, w * 0.9)
    with pytest.raises(ValueError):
        pbcodec.snr_db(w, w[:2])


# ------------------------------------------------------------- bad input


def test_bad_arguments():
    w = np.zeros((4, 16), np.float32)
    with pytest.raises(TypeError):
        pbcodec.compress(np.zeros((4, 16), np.int32))
    with pytest.raises(ValueError, match="2-D"):
        pbcodec.compress(np.zeros(16, np.float32))
    with pytest.raises(ValueError, match="salient"):
        pbcodec.compress(w, salient=1.5)
    with pytest.raises(ValueError, match="salient_bits"):
        pbcodec.compress(w, salient_bits=3)
    with pytest.raises(ValueError, match="group_size"):
        pbcodec.compress(w, group_size=17)
    with pytest.raises(ValueError, match="select"):
        pbcodec.compress(w, select="column")
    with pytest.raises(ValueError, match="importance"):
        pbcodec.compress(w, importance=np.ones(15))
    with pytest.raises(ValueError, match="importance"):
        pbcodec.compress(w, importance=-np.ones(16))
    with pytest.raises(ValueError, match="finite"):
        pbcodec.compress(np.full((2, 2), np.nan, np.float32))
    with pytest.raises(ValueError, match="float32"):  # float16 scale overflow
        pbcodec.compress(np.full((2, 4), 1e6, np.float32), salient=0)
    assert pbcodec.compress(np.full((2, 4), 1e6, np.float32), salient=0, scale_dtype="float32").mu[0, 0] == 1e6


def blobs():
    rng = np.random.default_rng(10)
    yield pbcodec.compress(weights(rng, 3, 21, "heavy"), salient=0.2).to_bytes()
    yield pbcodec.compress(weights(rng, 2, 16), group_size=8, salient_bits=4, scale_dtype="float32").to_bytes()


@pytest.mark.parametrize("blob", list(blobs()))
def test_truncated_extended_flipped(blob):
    for cut in range(len(blob)):
        with pytest.raises(pbcodec.FormatError):
            pbcodec.PBTensor.from_bytes(blob[:cut])
    with pytest.raises(pbcodec.FormatError):
        pbcodec.PBTensor.from_bytes(blob + b"\0")
    for i in range(len(blob)):
        for bit in range(8):
            bad = bytearray(blob)
            bad[i] ^= 1 << bit
            with pytest.raises(pbcodec.FormatError):
                pbcodec.PBTensor.from_bytes(bytes(bad))


def test_malformed_with_valid_checksum_matches_reference():
    # Bit flips re-signed with a valid CRC: the Rust and reference parsers must
    # agree on accept/reject, and anything accepted must re-serialize identically.
    blob = next(iter(blobs()))
    agree = 0
    for i in range(len(blob) - 4):
        for bit in range(8):
            body = bytearray(blob[:-4])
            body[i] ^= 1 << bit
            b = bytes(body) + ref.crc32c(bytes(body)).to_bytes(4, "little")
            try:
                t = pbcodec.PBTensor.from_bytes(b)
            except pbcodec.FormatError:
                with pytest.raises(pbcodec.FormatError):
                    ref.PBTensor.from_bytes(b)
                continue
            assert ref.PBTensor.from_bytes(b).to_bytes() == b == t.to_bytes()
            agree += 1
    assert agree > 0  # some flips (e.g. in scale mantissas) are valid data


def test_hand_modified_parts_raise_not_crash():
    t = pbcodec.compress(weights(np.random.default_rng(11), 4, 64), salient=0.2, count_bits=4)
    r = t.residual
    counts = r.counts.copy()
    counts[:] = 0xEE  # every code 14: values land past the row end
    bad = pbcodec.PBTensor(
        t.shape,
        t.signs,
        t.mu,
        t.alpha,
        t.sigma,
        pbcodec.RLE(r.shape, r.count_bits, r.value_bits, counts, r.values, r.code_offsets, r.value_offsets),
        t.group_size,
    )
    before = pbcodec.simd_level()
    try:
        for level in pbcodec.available_simd_levels():
            pbcodec.set_simd_level(level)
            with pytest.raises(pbcodec.FormatError):
                bad.matvec(np.ones(64, np.float32))
    finally:
        pbcodec.set_simd_level(before)
    with pytest.raises(pbcodec.FormatError):
        bad.decompress()
    with pytest.raises(pbcodec.FormatError):
        bad.to_bytes()


def test_review_regressions():
    """Malformed user-modified objects raise, never panic or hang; byte order is honoured."""
    rng = np.random.default_rng(12)
    t = pbcodec.compress(weights(rng, 4, 64), salient=0.2, count_bits=4)
    r = t.residual
    x = np.ones(64, np.float32)
    # Fewer values than the codes claim, offsets agreeing with the short stream.
    short = pbcodec.PBTensor(
        t.shape,
        t.signs,
        t.mu,
        t.alpha,
        t.sigma,
        pbcodec.RLE(r.shape, 4, 8, r.counts, r.values[:0], r.code_offsets, np.zeros(5, np.int64)),
        t.group_size,
    )
    # count_bits outside 1..8 in a hand-built residual.
    zero_cb = pbcodec.PBTensor(
        t.shape,
        t.signs,
        t.mu,
        t.alpha,
        t.sigma,
        pbcodec.RLE(r.shape, 0, 8, r.counts[:0], r.values, r.code_offsets, r.value_offsets),
        t.group_size,
    )
    before = pbcodec.simd_level()
    try:
        for level in pbcodec.available_simd_levels():
            pbcodec.set_simd_level(level)
            for bad in (short, zero_cb):
                with pytest.raises(pbcodec.FormatError):
                    bad.matvec(x)
    finally:
        pbcodec.set_simd_level(before)
    # group_size for n == 0 must be 1, so to_bytes() output always parses.
    with pytest.raises(ValueError):
        pbcodec.PBTensor(
            (2, 0),
            np.zeros((2, 0), np.uint8),
            np.zeros((2, 0), np.float16),
            np.zeros((2, 0), np.float16),
            np.zeros(2, np.float16),
            pbcodec.rle_encode(np.zeros((2, 0), np.int8)),
            0,
        )
    # Scales are read-only views: in-place edits cannot be silently ignored.
    with pytest.raises(ValueError):
        t.mu[0, 0] = 1.0
    # Non-native byte order is converted, not misread.
    f = rng.standard_normal((2, 19))
    for dt in (">f4", ">f8", ">f2"):
        np.testing.assert_array_equal(
            pbcodec.pack_signs(f.astype(dt)), np.packbits(np.signbit(f), axis=-1, bitorder="little")
        )
    with pytest.raises(TypeError):
        pbcodec.unpack_signs(np.zeros((1, 1), np.uint8), 8, dtype=">f4")
    with pytest.raises(ValueError):
        pbcodec.set_num_threads(100000)
    with pytest.raises(ValueError):
        pbcodec.compress(np.ones((2, 8), np.float32), count_bits=9)
    with pytest.raises(TypeError):
        pbcodec.compress(np.ones((2, 8), np.float32), count_bits=3.7)
    with pytest.raises(TypeError):
        t.decompress(np.int32)


@given(
    m=st.integers(1, 6),
    n=st.integers(1, 40),
    log_scale=st.floats(-10.0, 6.0),
    cfg=config,
    seed=st.integers(0, 2**32 - 1),
)
def test_scale_range_errors_match_the_reference(m, n, log_scale, cfg, seed):
    """float16 overflow and underflow (a row whose scales all round to 0) are refused
    alike, by the core and the reference; otherwise the bytes are identical."""
    w = (weights(np.random.default_rng(seed), m, n) * 10.0**log_scale).astype(np.float32)
    outcomes = []
    for impl in (pbcodec.compress, ref.compress):
        try:
            outcomes.append(impl(w, **cfg).to_bytes())
        except pbcodec.ScaleRangeError:
            outcomes.append("ScaleRangeError")
    assert outcomes[0] == outcomes[1]
    if cfg["scale_dtype"] == "float32":
        assert outcomes[0] != "ScaleRangeError"


def test_float16_underflow_boundary():
    # alpha of a row of +-a is a: 2**-25 rounds (half to even) to 0 -> refused; the next
    # float32 above rounds up to the smallest float16 subnormal -> accepted.
    for a, ok in [(2.0**-25, False), (np.nextafter(np.float32(2.0**-25), np.float32(1)), True), (1e-9, False)]:
        w = np.tile(np.array([a, -a], np.float32), (2, 8))
        for impl in (pbcodec.compress, ref.compress):
            if ok:
                assert impl(w, salient=0, shift=False).alpha[0, 0] == np.float16(2.0**-24)
            else:
                with pytest.raises(pbcodec.ScaleRangeError, match="underflow"):
                    impl(w, salient=0, shift=False)
        assert pbcodec.compress(w, salient=0, shift=False, scale_dtype="float32").alpha[0, 0] == np.float32(a)
    # A zero row has zero scales: not an underflow. Nor is a row that keeps nonzero scales
    # while some alpha rounds to 0 (group size 1: alpha is mu's own rounding error).
    assert pbcodec.compress(np.zeros((2, 16), np.float32)).alpha.max() == 0
    w = (1e-6 * (1 + np.arange(64) / 64)).astype(np.float32)[None, :]
    t = pbcodec.compress(w, salient=0, group_size=1)
    assert (
        np.any((t.alpha == 0) & (t.mu.astype(np.float32) != w))
        and t.to_bytes() == ref.compress(w, salient=0, group_size=1).to_bytes()
    )
