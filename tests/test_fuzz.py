"""Fuzz-style robustness: random mutations of valid blobs and files must only
ever raise FormatError (never another exception, a crash or a hang), and
anything accepted must re-serialize to exactly the same bytes."""

import json
import struct

import numpy as np
import pbcodec
from hypothesis import event, given, settings
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


# -- structure-aware: valid JSON of the wrong form ------------------------------------
EDGE_INTS = [-1, 0, 1, 2, 7, 8, 2**31, 2**32, 2**53, 2**60, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**70]


def json_values(max_depth: int = 3):
    """Any JSON value: scalars (edge integers included), strings, lists, objects, and
    deeply nested arrays."""
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.sampled_from(EDGE_INTS),
        st.integers(-(2**66), 2**66),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=6),
        st.sampled_from(["U8", "F32", "BF16", "F4", "pbcodec.pb", "float16", "float32", "__metadata__"]),
    )
    deep = st.integers(1, 400).map(lambda d: json.loads("[" * d + "]" * d))
    tree = st.recursive(
        scalars,
        lambda kids: st.one_of(st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=4), kids, max_size=3)),
        max_leaves=8,
    )
    return st.one_of(tree, deep, st.lists(st.sampled_from(EDGE_INTS), max_size=40))


def _sample_file(p):
    w = pbcodec.PBTensor.from_bytes(PB_BLOB)
    pbcodec.save_file({"w": w, "b": np.arange(3, dtype=np.float32)}, p, metadata={"note": "x"})
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


@st.composite
def mutated_header(draw, header: dict):
    h = json.loads(json.dumps(header))  # deep copy
    desc = json.loads(h["__metadata__"]["pbcodec"])
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["field", "add", "drop", "entry", "top", "meta", "desc", "desc_add", "dims"]))
        name = draw(st.sampled_from(sorted(k for k in h if k != "__metadata__") or ["x"]))
        ent = h.get(name)
        if op == "field" and isinstance(ent, dict):
            ent[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(json_values())
        elif op == "add" and isinstance(ent, dict):
            ent[draw(st.text(max_size=5))] = draw(json_values())
        elif op == "drop" and isinstance(ent, dict) and ent:
            del ent[draw(st.sampled_from(sorted(ent)))]
        elif op == "entry":
            h[name] = draw(json_values())
        elif op == "top":
            h[draw(st.text(max_size=5))] = draw(json_values())
        elif op == "meta":
            h["__metadata__"][draw(st.sampled_from(["note", "pbcodec", "new"]))] = draw(json_values())
        elif op == "desc" and isinstance(desc.get("w"), dict) and desc["w"]:
            desc["w"][draw(st.sampled_from(sorted(desc["w"])))] = draw(json_values())
        elif op == "desc_add":
            desc[draw(st.sampled_from(["w", "b", "x"]))] = draw(json_values())
        elif op == "dims" and isinstance(ent, dict):  # huge and zero dimensions
            ent["shape"] = draw(st.lists(st.sampled_from([0, 1, 3, 2**31, 2**62, 2**63, 2**64 - 1]), max_size=6))
    if isinstance(h.get("__metadata__"), dict) and isinstance(h["__metadata__"].get("pbcodec"), str):
        h["__metadata__"]["pbcodec"] = json.dumps(desc)
    return json.dumps(h).encode()


@settings(max_examples=150)
@given(st.data())
def test_load_file_structured_header_mutations(tmp_path_factory, data):
    """Valid JSON with wrong types, nested values, huge and zero dimensions, in the
    header and in pbcodec's descriptions: only FormatError, and the library and the
    reference (written from docs/format.md) accept and reject the same files."""
    d = tmp_path_factory.mktemp("fuzz")
    p = d / "f.safetensors"
    header, body = _sample_file(p)
    hb = data.draw(mutated_header(header))
    p.write_bytes(struct.pack("<Q", len(hb)) + hb + body)
    outcomes = []
    for load in (pbcodec.load_file, ref.load_file):
        try:
            got = load(p)
        except pbcodec.FormatError:
            outcomes.append(None)
            continue
        outcomes.append(sorted(got))
    assert outcomes[0] == outcomes[1]
    event("accepted" if outcomes[0] is not None else "rejected")


DIMS = st.sampled_from([0, 1, 2, 3, 8, 40, 2**31, 2**32, 2**60 - 1, 2**60, 2**62, 2**63 - 1, 2**63, 2**64 - 1])


def _seal(b: bytes) -> bytes:
    return b + ref.crc32c(b).to_bytes(4, "little")


@st.composite
def rle_blobs(draw):
    """RLE blobs with a valid checksum and structurally placed but extreme fields: zero
    and huge dimensions, counts, index widths, short or long bodies."""
    ndim = draw(st.integers(1, 4))
    shape = [draw(DIMS) for _ in range(ndim)]
    num_codes, num_values = draw(DIMS), draw(DIMS)
    cb, vb = draw(st.integers(0, 9)), draw(st.sampled_from([4, 8, 0, 16]))
    w = draw(st.sampled_from([4, 8, 2]))
    head = struct.pack("<4sHBBBBHI", b"PBRL", 1, cb, vb, ndim, w, 0, 0)
    head += b"".join(struct.pack("<Q", d) for d in shape) + struct.pack("<QQ", num_codes, num_values)
    return _seal(head + bytes(draw(st.lists(st.integers(0, 255), max_size=24))))


@settings(max_examples=200)
@given(rle_blobs())
def test_rle_from_bytes_structured(blob):
    outcomes = [_parse_or_format_error(parse, blob) for parse in (pbcodec.RLE.from_bytes, ref.RLE.from_bytes)]
    assert (outcomes[0] is None) == (outcomes[1] is None)
    event("accepted" if outcomes[0] is not None else "rejected")
    if outcomes[0] is not None:
        assert outcomes[0].to_bytes() == blob == outcomes[1].to_bytes()


@settings(max_examples=200)
@given(st.data())
def test_pbtensor_from_bytes_structured(data):
    """PBTensor blobs of shape (m, n) with zero and huge dimensions around an embedded RLE
    of the same shape, valid checksums: FormatError or a tensor, never anything else, and
    the reference agrees."""
    m, n = data.draw(DIMS), data.draw(DIMS)
    g = data.draw(st.sampled_from([0, 1, 2, n, n + 1, 2**64 - 1]))
    rle = _seal(struct.pack("<4sHBBBBHI", b"PBRL", 1, 4, 8, 2, 4, 0, 0) + struct.pack("<QQQQ", m, n, 0, 0))
    rle += bytes(4 * min(m, 4)) if data.draw(st.booleans()) else b""
    body = struct.pack("<4sHBB", b"PBTN", 1, 1, data.draw(st.sampled_from([16, 32]))) + struct.pack(
        "<QQQQ", m, n, g & (2**64 - 1), data.draw(st.sampled_from([len(rle), 0, 2**64 - 1]))
    )
    blob = _seal(body + bytes(data.draw(st.lists(st.integers(0, 255), max_size=16))) + rle)
    outcomes = [_parse_or_format_error(parse, blob) for parse in (pbcodec.PBTensor.from_bytes, ref.PBTensor.from_bytes)]
    assert (outcomes[0] is None) == (outcomes[1] is None)
    event("accepted" if outcomes[0] is not None else "rejected")
    if outcomes[0] is not None:
        t = outcomes[0]
        assert t.to_bytes() == blob
        if t.shape[0] * t.shape[1] <= 2**20:
            np.testing.assert_array_equal(t.decompress(), outcomes[1].decompress())
