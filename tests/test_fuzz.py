"""Fuzz-style robustness: random mutations of valid blobs and files must only
ever raise FormatError (never another exception, a crash or a hang), and
anything accepted must re-serialize to exactly the same bytes."""

import numpy as np
import pbcodec
from hypothesis import given, settings
from hypothesis import strategies as st
from pbcodec import reference as ref

RNG = np.random.default_rng(123)
RLE_BLOB = pbcodec.rle_encode((RNG.random((5, 70)) < 0.15).astype(np.int8) * 3, count_bits="auto").to_bytes()
PB_BLOB = pbcodec.compress(RNG.standard_normal((6, 40)).astype(np.float32), salient=0.2, group_size=16).to_bytes()


@st.composite
def mutated(draw, blob: bytes, reseal: bool):
    b = bytearray(blob)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["set", "insert", "delete"]))
        i = draw(st.integers(0, max(len(b) - 1, 0)))
        if kind == "set" and b:
            b[i] = draw(st.integers(0, 255))
        elif kind == "insert":
            b[i:i] = bytes(draw(st.lists(st.integers(0, 255), min_size=1, max_size=9)))
        elif b:
            del b[i : i + draw(st.integers(1, 9))]
    if reseal and len(b) >= 4:  # valid checksum: reach the deeper checks
        body = bytes(b[:-4])
        b = bytearray(body + ref.crc32c(body).to_bytes(4, "little"))
    return bytes(b)


def _parse_or_format_error(parse, b: bytes):
    try:
        obj = parse(b)
    except pbcodec.FormatError:
        return None
    return obj


@settings(max_examples=300)
@given(st.data())
def test_rle_from_bytes_mutations(data):
    b = data.draw(mutated(RLE_BLOB, reseal=data.draw(st.booleans())))
    obj = _parse_or_format_error(pbcodec.RLE.from_bytes, b)
    if obj is not None:
        assert obj.to_bytes() == b
        assert ref.RLE.from_bytes(b).to_bytes() == b
        # A valid blob may declare a huge shape (trailing zeros are free): the
        # default cap refuses to allocate it, anything smaller decodes.
        try:
            pbcodec.rle_decode(obj, max_elements=2**24)
        except ValueError as e:
            assert "max_elements" in str(e)


@settings(max_examples=300)
@given(st.data())
def test_pbtensor_from_bytes_mutations(data):
    b = data.draw(mutated(PB_BLOB, reseal=data.draw(st.booleans())))
    obj = _parse_or_format_error(pbcodec.PBTensor.from_bytes, b)
    if obj is not None:
        assert obj.to_bytes() == b
        obj.matvec(np.ones(obj.shape[1], np.float32))
        obj.decompress()


@settings(max_examples=100)
@given(st.data())
def test_load_file_mutations(tmp_path_factory, data):
    d = tmp_path_factory.mktemp("fuzz")
    p = d / "f.safetensors"
    pbcodec.save_file({"w": pbcodec.PBTensor.from_bytes(PB_BLOB), "b": np.arange(3, dtype=np.float32)}, p)
    raw = bytearray(p.read_bytes())
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    p.write_bytes(bytes(raw))
    try:
        got = pbcodec.load_file(p)
    except pbcodec.FormatError:
        return
    for v in got.values():
        if isinstance(v, pbcodec.PBTensor):
            v.matvec(np.ones(v.shape[1], np.float32))
