"""Each kind of bad data raises its own FormatError subclass, from the compiled core
and from ``pbcodec.reference`` alike: TruncatedError for data that ends early,
UnsupportedVersionError for a version (or PBTensor dense_bits) this build does not
read, CorruptError for everything else. All stay FormatError and ValueError."""

import numpy as np
import pbcodec
import pytest
from conftest import sparse_int8
from pbcodec import CorruptError, FormatError, TruncatedError, UnsupportedVersionError
from pbcodec import reference as ref

KINDS = (CorruptError, TruncatedError, UnsupportedVersionError)


def _reseal(body) -> bytes:
    """A blob body with a valid CRC-32C appended, so checks after the checksum run."""
    body = bytes(body)
    return body + ref.crc32c(body).to_bytes(4, "little")


def _cases():
    """(name, blob, core parser, reference parser, offset of the u16 version)."""
    rng = np.random.default_rng(8)
    rle = pbcodec.rle_encode(sparse_int8(rng, (3, 40), 0.15, -8, 7), count_bits=3, value_bits=4).to_bytes()
    w = rng.standard_normal((5, 48)).astype(np.float32)
    pb = pbcodec.compress(w, salient=0.1, group_size=16).to_bytes()
    frame = pbcodec.pack_frame(np.arange(37, dtype=np.uint8) % 8, 3)
    return [
        ("rle", rle, pbcodec.RLE.from_bytes, ref.RLE.from_bytes),
        ("pbtensor", pb, pbcodec.PBTensor.from_bytes, ref.PBTensor.from_bytes),
        ("frame", frame, pbcodec.unpack_frame, ref.unpack_frame),
    ]


CASES = _cases()
IDS = [c[0] for c in CASES]


def _raises(parse, blob, kind, match=None):
    with pytest.raises(kind, match=match) as e:
        parse(blob)
    # Exactly one kind, and still a FormatError / ValueError for existing handlers.
    assert [k for k in KINDS if isinstance(e.value, k)] == [kind]
    assert isinstance(e.value, FormatError) and isinstance(e.value, ValueError)


def test_kinds_are_format_errors():
    for kind in KINDS:
        assert issubclass(kind, FormatError) and issubclass(kind, ValueError)
        assert getattr(pbcodec, kind.__name__) is kind and kind.__name__ in pbcodec.__all__
    assert not issubclass(pbcodec.ScaleRangeError, FormatError)


@pytest.mark.parametrize("name, blob, core, py", CASES, ids=IDS)
def test_every_truncation_is_truncated(name, blob, core, py):
    for parse in (core, py):
        parse(blob)  # the intact blob parses
        for cut in range(len(blob)):
            _raises(parse, blob[:cut], TruncatedError)


@pytest.mark.parametrize("name, blob, core, py", CASES, ids=IDS)
def test_version_bump_is_unsupported(name, blob, core, py):
    for version in (0, 2, 0xFFFF):
        body = bytearray(blob[:-4])
        body[4:6] = version.to_bytes(2, "little")
        for parse in (core, py):
            _raises(parse, _reseal(body), UnsupportedVersionError, match="version")


def test_pbtensor_dense_bits_and_embedded_rle_version_are_unsupported():
    _, blob, core, py = CASES[1]
    body = bytearray(blob[:-4])
    body[6] = 2  # a 2-bit dense plane: reserved for a later format
    for parse in (core, py):
        _raises(parse, _reseal(body), UnsupportedVersionError, match="dense_bits")
    # The residual blob (the last L bytes before the CRC) with version 7, both CRCs valid.
    rle_len = int.from_bytes(blob[32:40], "little")
    start = len(blob) - 4 - rle_len
    inner = bytearray(blob[start : len(blob) - 8])
    inner[4:6] = (7).to_bytes(2, "little")
    body = blob[:start] + _reseal(inner)
    for parse in (core, py):
        _raises(parse, _reseal(body), UnsupportedVersionError, match="version 7")


@pytest.mark.parametrize("name, blob, core, py", CASES, ids=IDS)
def test_damage_is_corrupt(name, blob, core, py):
    bad_crc = blob[:-1] + bytes([blob[-1] ^ 0x01])
    bad_magic = b"X" + blob[1:]
    for parse in (core, py):
        _raises(parse, bad_crc, CorruptError)
        _raises(parse, bad_magic, CorruptError)
        for extra in (b"\0", blob):  # longer than the header describes
            _raises(parse, blob + extra, CorruptError)
    # Every single-bit flip is some FormatError kind: Unsupported exactly in the
    # version field, Corrupt in the checksum itself.
    for i in range(len(blob)):
        for bit in (0, 5):
            bad = bytearray(blob)
            bad[i] ^= 1 << bit
            kind = UnsupportedVersionError if i in (4, 5) else CorruptError if i >= len(blob) - 4 else FormatError
            for parse in (core, py):
                with pytest.raises(kind):
                    parse(bytes(bad))


def test_hand_built_streams_are_corrupt():
    # A code pointing past the row end, and offsets pointing past the values: data
    # errors of the streams themselves (no serialized length is involved).
    bad = pbcodec.RLE((5,), 4, 8, np.array([9], np.uint8), np.array([1], np.int8), [0, 1], [0, 1])
    _raises(pbcodec.rle_decode, bad, CorruptError)
    _raises(lambda r: r.to_bytes(), bad, CorruptError)
    bad = pbcodec.RLE((5,), 4, 8, np.array([0], np.uint8), np.array([], np.int8), [0, 1], [0, 1])
    _raises(pbcodec.rle_decode, bad, CorruptError)
