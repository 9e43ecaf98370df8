"""save_file / load_file: safetensors files that the standard safetensors
package can read, validated and memory-mapped on load, atomic on write."""

import json
import struct

import numpy as np
import pbcodec
import pytest
from pbcodec.files import read_safetensors

safetensors_numpy = pytest.importorskip("safetensors.numpy")


@pytest.fixture
def sample():
    rng = np.random.default_rng(0)
    return {
        "layer.0.weight": pbcodec.compress(rng.standard_normal((32, 200)).astype(np.float32)),
        "layer.1.weight": pbcodec.compress(
            rng.standard_normal((16, 64)).astype(np.float32), salient_bits=4, group_size=32, scale_dtype="float32"
        ),
        "layer.0.bias": rng.standard_normal(32).astype(np.float32),
        "ids": np.arange(7, dtype=np.int64),
        "mask": np.array([True, False]),
        "half": np.ones((2, 3), np.float16),
    }


def test_round_trip(tmp_path, sample):
    p = tmp_path / "m.safetensors"
    pbcodec.save_file(sample, p, metadata={"format": "pt"})
    got = pbcodec.load_file(p)
    assert set(got) == set(sample)
    for k, v in sample.items():
        if isinstance(v, pbcodec.PBTensor):
            assert got[k] == v
            np.testing.assert_array_equal(got[k].decompress(), v.decompress())
            x = np.ones(v.shape[1], np.float32)
            np.testing.assert_array_equal(got[k].matvec(x), v.matvec(x))
        else:
            assert got[k].dtype == v.dtype
            np.testing.assert_array_equal(got[k], v)
    assert pbcodec.load_metadata(p)["format"] == "pt"


def test_standard_safetensors_reads_every_component(tmp_path, sample):
    p = tmp_path / "m.safetensors"
    pbcodec.save_file(sample, p)
    std = safetensors_numpy.load_file(str(p))
    t = sample["layer.1.weight"]
    np.testing.assert_array_equal(std["layer.1.weight.signs"], t.signs)
    np.testing.assert_array_equal(std["layer.1.weight.mu"], t.mu)
    assert std["layer.1.weight.mu"].dtype == np.float32
    np.testing.assert_array_equal(std["layer.1.weight.residual.counts"], t.residual.counts)
    np.testing.assert_array_equal(std["layer.1.weight.residual.values"], t.residual.values)
    np.testing.assert_array_equal(std["layer.1.weight.residual.code_offsets"], t.residual.code_offsets)
    np.testing.assert_array_equal(std["layer.0.bias"], sample["layer.0.bias"])
    from safetensors import safe_open

    with safe_open(str(p), "np") as f:
        desc = json.loads(f.metadata()["pbcodec"])
    assert desc["layer.0.weight"]["codec"] == "pbcodec.pb" and desc["layer.0.weight"]["shape"] == [32, 200]


@pytest.mark.parametrize("mmap", [False, True])
def test_loaded_arrays_are_aligned_and_mapped_only_on_request(tmp_path, sample, mmap):
    p = tmp_path / "m.safetensors"
    pbcodec.save_file(sample, p)
    got = pbcodec.load_file(p, mmap=mmap)
    t = got["layer.0.weight"]
    for a in (t.signs, t.residual.counts, t.residual.code_offsets, got["layer.0.bias"]):
        assert a.flags.aligned
    assert not t.residual.counts.flags.owndata  # a view of one buffer, not a copy per tensor
    # Default: memory this process owns (writable); mmap=True: read-only views of the file.
    assert got["ids"].flags.writeable is not mmap


def test_write_is_atomic(tmp_path):
    p = tmp_path / "m.safetensors"
    with pytest.raises(TypeError):
        pbcodec.save_file({"a": np.zeros(3), "b": np.array(["text"])}, p)
    assert not p.exists() and list(tmp_path.iterdir()) == []


def test_name_collisions_and_reserved_metadata(tmp_path):
    t = pbcodec.compress(np.ones((2, 8), np.float32))
    with pytest.raises(ValueError, match="twice"):
        pbcodec.save_file({"w": t, "w.signs": np.zeros(1)}, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="reserved"):
        pbcodec.save_file({"a": np.zeros(1)}, tmp_path / "x.safetensors", metadata={"pbcodec": "x"})


def _rewrite(path, header=None, data=None, raw_header=None):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    h = json.loads(raw[8 : 8 + n])
    body = raw[8 + n :]
    if header is not None:
        h = header(h)
    if data is not None:
        body = data(body)
    hb = raw_header if raw_header is not None else json.dumps(h).encode()
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + body)


def _meta(h, f):
    d = json.loads(h["__metadata__"]["pbcodec"])
    f(d)
    h["__metadata__"]["pbcodec"] = json.dumps(d)
    return h


def _rename(h, old, new):
    h[new] = h.pop(old)
    return h


# case -> (rewrite, message the loader must give): each check is reached on its own.
MALFORMED = {
    "not json": (dict(raw_header=b"{not json"), "not valid JSON"),
    "header is a list": (dict(raw_header=b"[1, 2]"), "expected a JSON object"),
    "truncated data": (dict(data=lambda b: b[:-1]), "data_offsets"),
    "trailing data": (dict(data=lambda b: b + b"\0"), "after the last tensor"),
    "unknown dtype": (dict(header=lambda h: {**h, "ids": {**h["ids"], "dtype": "Q7"}}), "unsupported dtype"),
    "bad shape": (dict(header=lambda h: {**h, "ids": {**h["ids"], "shape": [-1]}}), "bad shape"),
    "size mismatch": (dict(header=lambda h: {**h, "ids": {**h["ids"], "shape": [8]}}), "data_offsets"),
    "missing component": (dict(header=lambda h: _rename(h, "w.sigma", "w.sigma2")), "missing component"),
    "unknown version": (dict(header=lambda h: _meta(h, lambda d: d["w"].update(version=2))), "version"),
    "unknown codec": (dict(header=lambda h: _meta(h, lambda d: d["w"].update(codec="zip"))), "unknown codec"),
    "wrong shape in metadata": (dict(header=lambda h: _meta(h, lambda d: d["w"].update(shape=[4, 64]))), "shape"),
    "wrong salient bits": (dict(header=lambda h: _meta(h, lambda d: d["w"].update(salient_bits=4))), "salient_bits"),
    "wrong count bits": (dict(header=lambda h: _meta(h, lambda d: d["w"].update(count_bits=9))), "count_bits"),
    "string group size": (dict(header=lambda h: _meta(h, lambda d: d["w"].update(group_size="64"))), "group_size"),
    "metadata not json": (dict(header=lambda h: {**h, "__metadata__": {"pbcodec": "{"}}), "not valid JSON"),
    "metadata values not strings": (dict(header=lambda h: {**h, "__metadata__": {"pbcodec": 3}}), "a string"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_files_raise_format_error(tmp_path, case):
    p = tmp_path / "m.safetensors"
    t = pbcodec.compress(np.random.default_rng(1).standard_normal((8, 64)).astype(np.float32), salient=0.2)
    pbcodec.save_file({"w": t, "ids": np.arange(4, dtype=np.int64)}, p)
    rewrite, message = MALFORMED[case]
    _rewrite(p, **rewrite)
    with pytest.raises(pbcodec.FormatError, match=message):
        pbcodec.load_file(p)


def test_corrupted_component_bytes(tmp_path):
    p = tmp_path / "m.safetensors"
    t = pbcodec.compress(np.random.default_rng(2).standard_normal((8, 64)).astype(np.float32), salient=0.2)
    pbcodec.save_file({"w": t}, p)
    raw, _ = read_safetensors(p)
    counts = raw["w.residual.counts"]
    start = p.stat().st_size - sum(x.nbytes for x in raw.values())
    # Find the counts span in the data buffer and scramble it: codes now overrun rows.
    body = bytearray(p.read_bytes())
    (n,) = struct.unpack("<Q", body[:8])
    h = json.loads(body[8 : 8 + n])
    b, e = h["w.residual.counts"]["data_offsets"]
    body[8 + n + b : 8 + n + e] = b"\xee" * (e - b)
    p.write_bytes(bytes(body))
    assert start >= 8 and counts.nbytes == e - b
    with pytest.raises(pbcodec.FormatError):
        pbcodec.load_file(p)


def test_huge_header_length_is_rejected_without_allocating(tmp_path):
    p = tmp_path / "m.safetensors"
    p.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    with pytest.raises(pbcodec.FormatError, match="header length"):
        pbcodec.load_file(p)
    p.write_bytes(b"\x01")
    with pytest.raises(pbcodec.FormatError):
        pbcodec.load_file(p)


def test_bfloat16_raw_tensors_survive(tmp_path):
    # A BF16 tensor written by another tool reads back as float32 exactly.
    f = np.array([1.5, -2.25, 3.0], np.float32)
    bits = (f.view(np.uint32) >> 16).astype("<u2")
    from pbcodec.files import RawTensor, write_safetensors

    p = tmp_path / "b.safetensors"
    write_safetensors(p, {"x": RawTensor("BF16", (3,), memoryview(bits.view(np.uint8)))}, {})
    raw, _ = read_safetensors(p)
    np.testing.assert_array_equal(raw["x"].float32(), f)


def test_bytes_identical_to_reference_writer(tmp_path, sample):
    from pbcodec import reference as ref

    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "ref.safetensors"
    pbcodec.save_file(sample, ours, metadata={"format": "pt", "note": "x"})
    ref_tensors = {
        k: ref.PBTensor.from_bytes(v.to_bytes()) if isinstance(v, pbcodec.PBTensor) else v for k, v in sample.items()
    }
    ref.save_file(ref_tensors, theirs, metadata={"format": "pt", "note": "x"})
    assert ours.read_bytes() == theirs.read_bytes()
    # Each reads the other's file.
    back = ref.load_file(ours)
    assert back["layer.0.weight"].to_bytes() == sample["layer.0.weight"].to_bytes()
    np.testing.assert_array_equal(back["ids"], sample["ids"])
    got = pbcodec.load_file(theirs)
    assert got["layer.1.weight"] == sample["layer.1.weight"]


def test_reference_loader_rejects_corruption(tmp_path):
    from pbcodec import reference as ref

    p = tmp_path / "m.safetensors"
    t = pbcodec.compress(np.random.default_rng(7).standard_normal((8, 64)).astype(np.float32), salient=0.2)
    pbcodec.save_file({"w": t}, p)
    body = bytearray(p.read_bytes())
    (n,) = struct.unpack("<Q", body[:8])
    h = json.loads(body[8 : 8 + n])
    b, e = h["w.residual.counts"]["data_offsets"]
    body[8 + n + b : 8 + n + e] = b"\xee" * (e - b)
    p.write_bytes(bytes(body))
    for load in (pbcodec.load_file, ref.load_file):
        with pytest.raises(pbcodec.FormatError):
            load(p)
