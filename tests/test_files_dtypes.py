"""Every safetensors dtype x shapes (), (0,), (3, 0), (1,), (2, 3, 4) round-trips
through save_file / load_file exactly (bytes, dtype name, shape), with the
safetensors package as the oracle in both directions, with and without ml_dtypes;
what cannot round-trip is refused before anything is written (issue 7, section 1)."""

import json
import os
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pbcodec
import pytest
from pbcodec import reference as ref
from pbcodec.files import DTYPE_CODES, RawTensor, tensor_nbytes

safetensors = pytest.importorskip("safetensors")
ml_dtypes = pytest.importorskip("ml_dtypes")

SHAPES = [(), (0,), (3, 0), (1,), (2, 3, 4)]
# safetensors' writer names (TensorSpec) for each code; F6 has no writer name (hand-made files).
ORACLE_NAMES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "U16": "uint16",
    "I16": "int16",
    "F16": "float16",
    "U32": "uint32",
    "I32": "int32",
    "F32": "float32",
    "U64": "uint64",
    "I64": "int64",
    "F64": "float64",
    "C64": "complex64",
    "BF16": "bfloat16",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
    "F4": "float4_e2m1fn_x2",
}
NUMPY_NAMES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "U16": "uint16",
    "I16": "int16",
    "F16": "float16",
    "U32": "uint32",
    "I32": "int32",
    "F32": "float32",
    "U64": "uint64",
    "I64": "int64",
    "F64": "float64",
    "C64": "complex64",
}
ML_NAMES = {
    "BF16": "bfloat16",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
}


def test_dtype_table_is_the_safetensors_one():
    assert set(DTYPE_CODES) == set(ORACLE_NAMES) | {"F6_E2M3", "F6_E3M2"}
    assert len(DTYPE_CODES) == 22  # safetensors 0.8 defines 22 dtypes


def sample_bytes(code, n):
    b = ((np.arange(n, dtype=np.int64) * 37 + 11) % 256).astype(np.uint8)
    return (b & 1 if code == "BOOL" else b).tobytes()


def valid(code, shape):
    try:
        tensor_nbytes(code, shape)
    except ValueError:
        return False
    return True


def handmade(code, shape, data):
    """A safetensors file written byte by byte (docs/format.md §8), for dtypes the
    oracle cannot write and for shapes it refuses."""
    h = json.dumps({"x": {"dtype": code, "shape": list(shape), "data_offsets": [0, len(data)]}}).encode()
    h += b" " * (-(8 + len(h)) % 8)
    return struct.pack("<Q", len(h)) + h + data


def oracle_write(code, shape, data):
    """The file safetensors' own writer produces, or None when it has no name for ``code``."""
    name = ORACLE_NAMES.get(code)
    if name is None:
        return None
    spec_shape = list(shape)
    if code == "F4":  # the writer takes the packed (x2) shape and doubles the last dimension
        if not shape or shape[-1] % 2:
            return None
        spec_shape[-1] //= 2
    buf = np.frombuffer(data, np.uint8) if data else np.zeros(1, np.uint8)
    try:
        spec = safetensors.TensorSpec(dtype=name, shape=spec_shape, data_ptr=buf.ctypes.data, data_len=len(data))
        return bytes(safetensors.serialize({"x": spec}))
    except (AttributeError, TypeError, safetensors.SafetensorError) as e:  # an older safetensors
        pytest.skip(f"this safetensors cannot write {code}: {e}")


def oracle_read(raw):
    [(name, info)] = safetensors.deserialize(raw)
    return name, info["dtype"], tuple(info["shape"]), bytes(info["data"])


@pytest.fixture(params=["ml_dtypes", "no ml_dtypes"])
def ml(request, monkeypatch):
    """Run once with ml_dtypes importable and once with it hidden (import fails)."""
    if request.param == "no ml_dtypes":
        monkeypatch.setitem(sys.modules, "ml_dtypes", None)
        return False
    return True


def check_value(v, code, shape, data, ml):
    """load_file's value: the exact numpy dtype when one exists here, else a RawTensor."""
    if code in NUMPY_NAMES or (ml and code in ML_NAMES):
        assert isinstance(v, np.ndarray)
        assert v.dtype.name == NUMPY_NAMES.get(code) or v.dtype.name == ML_NAMES.get(code)
        assert v.shape == shape
        assert v.tobytes() == data
    else:
        assert isinstance(v, RawTensor)
        assert (v.dtype, v.shape, v.tobytes()) == (code, shape, data)


def ref_view(v):
    """(dtype name or code, shape, bytes) of what the reference loader returns."""
    if isinstance(v, np.ndarray):
        return v.dtype.name, v.shape, v.tobytes()
    return v.dtype, v.shape, bytes(v.data)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("code", DTYPE_CODES)
def test_every_dtype_and_shape_round_trips_with_the_oracle(tmp_path, code, shape, ml):
    ok = valid(code, shape)
    data = sample_bytes(code, tensor_nbytes(code, shape) if ok else 1)
    theirs = oracle_write(code, shape, data) if ok else None
    by_oracle = theirs is not None
    if not by_oracle:
        try:  # does this safetensors know the dtype at all?
            oracle_read(handmade(code, (0,), b""))
        except safetensors.SafetensorError:
            pytest.skip(f"this safetensors does not know {code}")
        theirs = handmade(code, shape, data)
        try:
            oracle_read(theirs)
            oracle_ok = True
        except safetensors.SafetensorError:
            oracle_ok = False
        assert oracle_ok == ok, "we accept exactly what safetensors accepts"
    p = tmp_path / "theirs.safetensors"
    p.write_bytes(theirs)
    if not ok:
        for load in (pbcodec.load_file, ref.load_file):
            with pytest.raises(pbcodec.FormatError):
                load(p)
        with pytest.raises(ValueError):
            RawTensor(code, shape, data)
        return
    # It writes, we read: bytes, dtype name and shape exactly.
    v = pbcodec.load_file(p)["x"]
    check_value(v, code, shape, data, ml)
    rv = ref.load_file(p)["x"]
    name = NUMPY_NAMES.get(code) or (ML_NAMES.get(code) if ml else None) or code
    assert ref_view(rv) == (name, shape, data)
    # We write, it reads -- the very bytes its writer produces -- and save_file(load_file(f))
    # keeps the dtype.
    q = tmp_path / "ours.safetensors"
    pbcodec.save_file({"x": v}, q)
    assert oracle_read(q.read_bytes()) == ("x", code, shape, data)
    if by_oracle:
        assert q.read_bytes() == theirs
    check_value(pbcodec.load_file(q)["x"], code, shape, data, ml)
    # The reference writer produces the same bytes.
    r = tmp_path / "ref.safetensors"
    ref.save_file({"x": rv}, r)
    assert r.read_bytes() == q.read_bytes()


def test_readme_example_with_float64_bias(tmp_path, ml):
    # The README's own example: numpy's default float64 bias must stay F64 (it was
    # written as "BF16" over 8-byte data when ml_dtypes was missing).
    t = pbcodec.compress(np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32))
    p = tmp_path / "model.pb.safetensors"
    pbcodec.save_file({"w": t, "bias": np.zeros(16)}, p)
    got = pbcodec.load_file(p)
    assert got["w"] == t and got["bias"].dtype == np.float64 and got["bias"].shape == (16,)
    with safetensors.safe_open(str(p), "np") as f:
        assert f.get_tensor("bias").dtype == np.float64 and "pbcodec" in f.metadata()
    assert {n: i["dtype"] for n, i in safetensors.deserialize(p.read_bytes())}["bias"] == "F64"


def test_zero_dim_arrays_keep_their_shape(tmp_path, ml):
    p = tmp_path / "s.safetensors"
    pbcodec.save_file({"num_batches_tracked": np.array(7), "f": np.float32(2.5)}, p)
    got = pbcodec.load_file(p)
    assert got["num_batches_tracked"].shape == () and int(got["num_batches_tracked"]) == 7
    assert got["f"].shape == () and got["f"].dtype == np.float32
    assert {n: i["shape"] for n, i in safetensors.deserialize(p.read_bytes())} == {"num_batches_tracked": [], "f": []}
    r = tmp_path / "r.safetensors"
    ref.save_file({"num_batches_tracked": np.array(7), "f": np.float32(2.5)}, r)
    assert r.read_bytes() == p.read_bytes()


REFUSED = {
    "longdouble": lambda: np.zeros(2, np.longdouble),
    "complex128": lambda: np.zeros(2, np.complex128),
    "str": lambda: np.array(["a"]),
    "object": lambda: np.array([None]),
    "datetime": lambda: np.zeros(2, "datetime64[s]"),
    "structured": lambda: np.zeros(2, "i4,f4"),
    "ml int4": lambda: np.zeros(2, ml_dtypes.int4),
    "ml float8_e4m3 (IEEE-like, no safetensors code)": lambda: np.zeros(2, ml_dtypes.float8_e4m3),
    "ml float4_e2m1fn (one value per byte)": lambda: np.zeros(2, ml_dtypes.float4_e2m1fn),
    "33 dimensions": lambda: np.zeros((1,) * 33, np.float32),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unstorable_arrays_are_refused_before_writing(tmp_path, case):
    p = tmp_path / "x.safetensors"
    p.write_bytes(b"old")
    bad = REFUSED[case]()
    for save in (pbcodec.save_file, ref.save_file):
        with pytest.raises((TypeError, ValueError), match="'b'"):
            save({"a": np.ones(3, np.float32), "b": bad}, p)
        assert p.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["x.safetensors"]


def test_bad_names_are_refused_before_writing(tmp_path):
    p = tmp_path / "x.safetensors"
    for tensors, meta in [
        ({"__metadata__": np.zeros(1)}, None),
        ({"bad\ud800": np.zeros(1)}, None),
        ({"a": np.zeros(1)}, {"k": "v\udc00"}),
    ]:
        with pytest.raises(ValueError):
            pbcodec.save_file(tensors, p, metadata=meta)
        assert not p.exists()


@pytest.mark.parametrize("code", sorted(ML_NAMES))
def test_small_floats_widen_exactly_without_ml_dtypes(code):
    bits = np.arange(256 if code != "BF16" else 65536, dtype=np.uint8 if code != "BF16" else np.uint16)
    t = RawTensor(code, bits.shape, bits.view(np.uint8))
    want = bits.view(getattr(ml_dtypes, ML_NAMES[code])).astype(np.float32)
    got = t.float32()  # a table built from the format definition, not ml_dtypes
    np.testing.assert_array_equal(got.view(np.uint32)[~np.isnan(want)], want.view(np.uint32)[~np.isnan(want)])
    assert np.array_equal(np.isnan(got), np.isnan(want))


def test_raw_tensor_never_reinterprets(monkeypatch):
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)
    t = RawTensor("BF16", (2,), np.array([0x3FC0, 0xC010], "<u2").view(np.uint8))
    np.testing.assert_array_equal(t.float32(), [1.5, -2.25])
    with pytest.raises(TypeError, match="BF16"):
        np.asarray(t)
    with pytest.raises(ImportError, match="ml_dtypes"):
        t.array()
    f4 = RawTensor("F4", (2,), b"\x21")
    with pytest.raises(TypeError):
        f4.array()
    with pytest.raises(TypeError):
        f4.float32()
    assert f4.tobytes() == b"\x21" and f4 == RawTensor("F4", (2,), b"\x21") and f4 != RawTensor("F4", (2,), b"\x12")


def test_bf16_checkpoint_through_the_command_line(tmp_path):
    """A bf16 checkpoint through `pbcodec compress`, then load_file, in a process where
    ml_dtypes cannot be imported: the copied bf16 tensors stay BF16 (1.5 stays 1.5, not
    16320), and saving what was loaded keeps them BF16."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 64)).astype(np.float32)
    norm = np.array([1.5, -2.25, 3.0, 0.5], np.float32)

    def bf16(a):  # round to nearest even, as torch / ml_dtypes do
        u = a.view(np.uint32).astype(np.uint64)
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2")

    src, dst, again = tmp_path / "in.safetensors", tmp_path / "out.safetensors", tmp_path / "again.safetensors"
    pbcodec.save_file(
        {
            "layers.0.proj.weight": RawTensor("BF16", w.shape, bf16(w).view(np.uint8)),
            "layers.0.norm.weight": RawTensor("BF16", norm.shape, bf16(norm).view(np.uint8)),
        },
        src,
    )
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["ml_dtypes"] = None  # as if it were not installed
        import numpy as np, pbcodec
        from pbcodec.cli import main
        assert main(["compress", {str(src)!r}, {str(dst)!r}, "-q"]) == 0
        got = pbcodec.load_file({str(dst)!r})
        n = got["layers.0.norm.weight"]
        assert isinstance(n, pbcodec.RawTensor) and n.dtype == "BF16", n
        assert n.float32().tolist() == [1.5, -2.25, 3.0, 0.5], n.float32()
        assert isinstance(got["layers.0.proj.weight"], pbcodec.PBTensor)
        pbcodec.save_file(got, {str(again)!r})
        print("ok")
        """
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr
    dtypes = {n: i["dtype"] for n, i in safetensors.deserialize(again.read_bytes())}
    assert dtypes["layers.0.norm.weight"] == "BF16"
    got = pbcodec.load_file(again)  # here ml_dtypes is installed: a bfloat16 array
    assert got["layers.0.norm.weight"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got["layers.0.norm.weight"].astype(np.float32), norm)
