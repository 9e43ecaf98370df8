"""k-bit frames (docs/format.md §9) against the reference, their validation,
and the numcodecs codecs (pbcodec.zerorun, pbcodec.bitpack): registry lookup
through the entry point, round trips, and zarr arrays written and read back
in a fresh process."""

import subprocess
import sys
import warnings

import numpy as np
import pbcodec
import pbcodec.reference as ref
import pytest
from conftest import sparse_int8
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp


@st.composite
def frames(draw):
    bits = draw(st.integers(1, 8))
    signed = draw(st.booleans())
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=40))
    if signed:
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        a = draw(hnp.arrays(np.int8, shape, elements=st.integers(lo, hi)))
    else:
        a = draw(hnp.arrays(np.uint8, shape, elements=st.integers(0, (1 << bits) - 1)))
    return a, bits, signed


@given(frames())
def test_frame_matches_reference(case):
    a, bits, signed = case
    buf = pbcodec.pack_frame(a, bits, signed=signed)
    assert buf == ref.pack_frame(a, bits, signed)
    assert len(buf) == 20 + (a.size * bits + 7) // 8
    got = pbcodec.unpack_frame(buf)
    np.testing.assert_array_equal(got, a.reshape(-1))
    assert got.dtype == (np.int8 if signed else np.uint8)
    np.testing.assert_array_equal(ref.unpack_frame(buf), got)
    assert pbcodec.pack_frame(got, bits, signed=signed) == buf  # canonical


def test_frame_rejects_bad_input():
    with pytest.raises(ValueError, match="3 bits"):
        pbcodec.pack_frame(np.array([8], np.uint8), 3)
    with pytest.raises(ValueError, match="-8..7"):
        pbcodec.pack_frame(np.array([8], np.int8), 4, signed=True)
    with pytest.raises(TypeError):
        pbcodec.pack_frame(np.array([1], np.int16), 4)
    with pytest.raises(TypeError):
        pbcodec.pack_frame(np.array([1], np.uint8), 4, signed=True)
    # int8 with 8 bits unsigned: stored as its bytes, decoded as uint8.
    a = np.array([-1, 0, 5], np.int8)
    np.testing.assert_array_equal(pbcodec.unpack_frame(pbcodec.pack_frame(a, 8)).view(np.int8), a)


def test_frame_every_truncation_and_bit_flip_is_a_format_error():
    buf = pbcodec.pack_frame(np.arange(37, dtype=np.uint8) % 8, 3)  # 111 bits: padding in the last byte
    for cut in range(len(buf)):
        with pytest.raises(pbcodec.FormatError):
            pbcodec.unpack_frame(buf[:cut])
        with pytest.raises(pbcodec.FormatError):
            ref.unpack_frame(buf[:cut])
    with pytest.raises(pbcodec.FormatError, match="length"):
        pbcodec.unpack_frame(buf + b"\0")
    for i in range(len(buf)):
        for bit in range(8):
            bad = bytearray(buf)
            bad[i] ^= 1 << bit
            with pytest.raises(pbcodec.FormatError):
                pbcodec.unpack_frame(bytes(bad))
    # A huge declared count is refused from the length check, before allocating.
    import struct

    body = struct.pack("<4sHBBQ", b"PBBP", 1, 8, 0, 2**62)
    fake = body + struct.pack("<I", ref.crc32c(body))
    with pytest.raises(pbcodec.FormatError, match="length mismatch"):
        pbcodec.unpack_frame(fake)
    # Nonzero padding with a valid checksum: not canonical.
    good = bytearray(buf[:-4])
    good[-1] |= 0x80
    forged = bytes(good) + struct.pack("<I", ref.crc32c(bytes(good)))
    for fn in (pbcodec.unpack_frame, ref.unpack_frame):
        with pytest.raises(pbcodec.FormatError, match="padding"):
            fn(forged)


# ------------------------------------------------------------------ numcodecs

numcodecs = pytest.importorskip("numcodecs", reason="numcodecs is not installed (pip install 'pbcodec[numcodecs]')")


def test_registry_finds_the_codecs_through_the_entry_point():
    from pbcodec.codecs import BitPack, ZeroRun

    c = numcodecs.get_codec({"id": "pbcodec.zerorun", "count_bits": 4, "value_bits": 8})
    assert isinstance(c, ZeroRun) and c.get_config() == {"id": "pbcodec.zerorun", "count_bits": 4, "value_bits": 8}
    c = numcodecs.get_codec({"id": "pbcodec.bitpack", "bits": 3, "signed": True})
    assert isinstance(c, BitPack) and (c.bits, c.signed) == (3, True)
    # In a fresh interpreter that has not imported pbcodec.
    code = "import numcodecs; print(type(numcodecs.get_codec({'id': 'pbcodec.bitpack', 'bits': 2})).__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "pbcodec.codecs"


@pytest.mark.parametrize("value_bits,count_bits", [(8, "auto"), (8, 2), (4, "auto"), (4, 5)])
def test_zerorun_round_trip(value_bits, count_bits):
    from pbcodec.codecs import ZeroRun

    rng = np.random.default_rng(value_bits)
    lo, hi = (-8, 7) if value_bits == 4 else (-128, 127)
    a = sparse_int8(rng, (6, 33, 70), 0.1, lo, hi)
    c = ZeroRun(count_bits=count_bits, value_bits=value_bits)
    enc = c.encode(a)
    assert enc == pbcodec.rle_encode(a, count_bits=count_bits, value_bits=value_bits).to_bytes()
    np.testing.assert_array_equal(c.decode(enc), a)
    out = np.empty_like(a)
    c.decode(enc, out=out)
    np.testing.assert_array_equal(out, a)
    assert c.decode(c.encode(np.int8(3))).tolist() == [3]  # 0-d chunks become 1-D
    with pytest.raises(TypeError, match="int8"):
        c.encode(a.astype(np.int16))
    with pytest.raises(pbcodec.FormatError):
        c.decode(enc[:-1])
    with pytest.raises(ValueError):
        ZeroRun(count_bits=9)


def test_bitpack_round_trip():
    from pbcodec.codecs import BitPack

    rng = np.random.default_rng(3)
    codes = rng.integers(0, 16, (40, 30)).astype(np.uint8)
    c = BitPack(4)
    enc = c.encode(codes)
    assert len(enc) == 20 + codes.size // 2
    np.testing.assert_array_equal(c.decode(enc).reshape(codes.shape), codes)
    int4 = rng.integers(-8, 8, (10, 7)).astype(np.int8)
    s = BitPack(4, signed=True)
    np.testing.assert_array_equal(s.decode(s.encode(int4)).reshape(int4.shape), int4)
    with pytest.raises(ValueError):
        c.encode(np.array([16], np.uint8))
    with pytest.raises(ValueError):
        BitPack(0)


# ----------------------------------------------------------------------- zarr


def test_zarr_round_trip_in_a_fresh_process(tmp_path):
    zarr = pytest.importorskip("zarr", reason="zarr is not installed")
    from pbcodec.codecs import BitPack, ZeroRun

    rng = np.random.default_rng(5)
    sparse = sparse_int8(rng, (64, 200), 0.08)
    int4 = sparse_int8(rng, (64, 200), 0.2, -8, 7)
    codes = rng.integers(0, 8, (50, 90)).astype(np.uint8)
    cases = {
        "sparse8": (sparse, ZeroRun()),
        "sparse4": (int4, ZeroRun(count_bits=3, value_bits=4)),
        "codes3": (codes, BitPack(3)),
        "int4": (int4, BitPack(4, signed=True)),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr warns that v2 numcodecs codecs are not in the v3 spec
        for name, (a, codec) in cases.items():
            z = zarr.create_array(
                store=str(tmp_path / name),
                shape=a.shape,
                chunks=(16, 64) if a.shape[1] >= 64 else (16, a.shape[1]),
                dtype=a.dtype,
                zarr_format=2,
                compressors=codec,
            )
            z[:] = a
            np.testing.assert_array_equal(z[:], a)
            np.save(tmp_path / f"{name}.npy", a)
    # Stored chunks are the codec's bytes; a fresh process reads them back
    # through the numcodecs entry point, without importing pbcodec itself.
    code = (
        "import sys, numpy as np, zarr\n"
        "for name in sys.argv[2:]:\n"
        "    z = zarr.open_array(sys.argv[1] + '/' + name, mode='r')\n"
        "    assert np.array_equal(z[:], np.load(sys.argv[1] + '/' + name + '.npy')), name\n"
        "    print(name, z.metadata.compressor.codec_id)\n"
    )
    r = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code, str(tmp_path), *cases], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [
        "sparse8",
        "pbcodec.zerorun",
        "sparse4",
        "pbcodec.zerorun",
        "codes3",
        "pbcodec.bitpack",
        "int4",
        "pbcodec.bitpack",
    ]
    # 8% dense: ~2.2 bits per element stored (entropy bound 1.04; each 16x64 chunk
    # carries its own header and row index), against 8 bits raw.
    stored = sum(p.stat().st_size for p in (tmp_path / "sparse8").iterdir() if p.name[0].isdigit())
    assert stored < sparse.size * 0.3
