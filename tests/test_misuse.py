"""Settings and misuse (issue 7, section 6): one validation path for the thread count
(set_num_threads and PBCODEC_NUM_THREADS), out= that overlaps an input, unaligned
arrays."""

import os
import subprocess
import sys

import numpy as np
import pbcodec
import pytest

RNG = np.random.default_rng(5)


def unaligned(a: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of ``a`` whose data start 1 byte past an aligned address."""
    buf = np.zeros(a.nbytes + a.itemsize, np.uint8)
    v = np.frombuffer(buf.data, dtype=a.dtype, count=a.size, offset=1).reshape(a.shape)
    v[...] = a
    assert v.flags.c_contiguous and not v.flags.aligned
    return v


# -- threads ---------------------------------------------------------------------------
THREADS = """
import time, warnings, numpy as np
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    import pbcodec
t0 = time.time()
t = pbcodec.compress(np.ones((64, 64), np.float32))
t.matvec(np.ones(64, np.float32))
print(pbcodec.get_num_threads(), round(time.time() - t0, 1), "warnings:" + "|".join(str(x.message) for x in w))
"""


def run_threads(value):
    env = dict(os.environ, PBCODEC_NUM_THREADS=value)
    r = subprocess.run([sys.executable, "-c", THREADS], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    head, msg = r.stdout.strip().split("warnings:", 1)
    n, seconds = head.split()
    return int(n), float(seconds), msg


@pytest.mark.parametrize("value", ["20000", "1025", "0", "-3", "abc", "2.5"])
def test_invalid_thread_variable_is_ignored_with_a_warning(value):
    n, seconds, msg = run_threads(value)
    assert f"PBCODEC_NUM_THREADS={value!r}" in msg.replace('"', "'") and "1..1024" in msg
    assert 1 <= n <= min(os.cpu_count() or 1, 1024) and seconds < 60  # no 20000-thread pool


@pytest.mark.parametrize("value", ["abc", "-1", "1000001", "2.5"])
def test_invalid_spin_variable_is_ignored_with_a_warning(value):
    code = (
        "import warnings\nwith warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n    import pbcodec\n"
        "print('|'.join(str(x.message) for x in w))"
    )
    env = dict(os.environ, PBCODEC_SPIN_US=value)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert f"PBCODEC_SPIN_US={value!r}" in r.stdout.replace('"', "'") and "microseconds" in r.stdout
    env["PBCODEC_SPIN_US"] = "0"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == ""


def test_valid_thread_variable_is_used_silently():
    assert run_threads("3")[0] == 3 and run_threads("3")[2] == ""
    assert run_threads(" 2 ")[0] == 2


def test_set_num_threads_shares_the_check():
    before = pbcodec.get_num_threads()
    for bad in (0, 1025, 20000, -1, True, 2.0, "4"):
        with pytest.raises(ValueError, match="1..1024"):
            pbcodec.set_num_threads(bad)
    assert pbcodec.get_num_threads() == before
    pbcodec.set_num_threads(1024 if os.cpu_count() and os.cpu_count() >= 1024 else 2)
    pbcodec.set_num_threads(before)


# -- out= overlapping an input -------------------------------------------------------
def test_matvec_out_overlapping_x():
    n = 96
    t = pbcodec.compress(RNG.standard_normal((n, n)).astype(np.float32), salient=0.2)
    x = RNG.standard_normal(n).astype(np.float32)
    want = t.matvec(x)
    y = x.copy()
    assert t.matvec(y, out=y) is y
    np.testing.assert_array_equal(y, want)
    xb = RNG.standard_normal((3, n)).astype(np.float32)
    yb = xb.copy()
    t.matvec(yb, out=yb)
    np.testing.assert_array_equal(yb, t.matvec(xb))
    # A partial overlap: out starts one element into x.
    buf = np.zeros(n + 1, np.float32)
    buf[:n] = x
    t.matvec(buf[:n], out=buf[1:])
    np.testing.assert_array_equal(buf[1:], want)


def test_codec_functions_with_out_overlapping_the_input():
    codes = RNG.integers(0, 256, (4, 40)).astype(np.uint8)
    c = codes.copy()
    np.testing.assert_array_equal(pbcodec.pack_bits(c, 8, out=c), pbcodec.pack_bits(codes, 8))
    np.testing.assert_array_equal(pbcodec.unpack_bits(c, 8, 40, out=c), codes)
    x = RNG.standard_normal((4, 64)).astype(np.float32)
    want = pbcodec.pack_signs(x)
    xs = x.copy()
    out = xs.reshape(-1).view(np.uint8)[: want.size].reshape(want.shape)
    np.testing.assert_array_equal(pbcodec.pack_signs(xs, out=out), want)
    packed = pbcodec.pack_signs(x)
    buf = np.zeros(4 * 64, np.float32)
    pk = buf.view(np.uint8)[: packed.size].reshape(packed.shape)
    pk[...] = packed
    res = pbcodec.unpack_signs(pk, 64, np.float32, out=buf.reshape(4, 64))
    np.testing.assert_array_equal(res, np.where(x < 0, -1.0, 1.0).astype(np.float32))
    r = pbcodec.rle_encode((RNG.random((2, 50)) < 0.2).astype(np.int8) * 3)
    buf = np.zeros(100, np.int8)
    buf[: r.num_values] = r.values
    shared = pbcodec.RLE(r.shape, r.count_bits, 8, r.counts, buf[: r.num_values], r.code_offsets, r.value_offsets)
    assert np.shares_memory(shared.values, buf)
    with pytest.raises(ValueError, match="overlaps"):  # decoding into the stream being decoded
        pbcodec.rle_decode(shared, out=buf.reshape(2, 50))


# -- unaligned arrays ------------------------------------------------------------------
def test_unaligned_inputs_are_copied_not_refused():
    w = RNG.standard_normal((32, 48)).astype(np.float32)
    t = pbcodec.compress(w)
    assert pbcodec.compress(unaligned(w)) == t
    imp = RNG.random(48).astype(np.float32)
    assert pbcodec.compress(unaligned(w), importance=unaligned(imp)) == pbcodec.compress(w, importance=imp)
    x = RNG.standard_normal((2, 48)).astype(np.float32)
    np.testing.assert_array_equal(t.matvec(unaligned(x)), t.matvec(x))
    np.testing.assert_array_equal(t.matvec(unaligned(x[0])), t.matvec(x[0]))
    np.testing.assert_array_equal(pbcodec.pack_signs(unaligned(w)), pbcodec.pack_signs(w))
    r = t.residual
    r2 = pbcodec.RLE(
        r.shape, r.count_bits, r.value_bits, r.counts, r.values, unaligned(r.code_offsets), unaligned(r.value_offsets)
    )
    np.testing.assert_array_equal(pbcodec.rle_decode(r2), pbcodec.rle_decode(r))


def test_unaligned_out_is_refused_naming_the_alignment():
    t = pbcodec.compress(RNG.standard_normal((32, 48)).astype(np.float32))
    for call in (
        lambda: t.matvec(np.ones(48, np.float32), out=unaligned(np.zeros(32, np.float32))),
        lambda: t.decompress(out=unaligned(np.zeros((32, 48), np.float32))),
        lambda: pbcodec.unpack_signs(t.signs, 48, np.float32, out=unaligned(np.zeros((32, 48), np.float32))),
    ):
        with pytest.raises(ValueError, match="not aligned"):
            call()
