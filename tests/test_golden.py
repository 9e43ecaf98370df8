"""Golden files (tests/golden/<version>/, written once by tests/golden/make_golden.py and
never edited): the bytes of each released format version stay readable and, for the
current version, stay exactly what the writers produce.

For every golden file, with the Rust core (``pbcodec``) and with the spec's pure-Python
twin (``pbcodec.reference``), on every SIMD level:

- the manifest's sha256 of every file matches (an accidental edit fails here first);
- it parses, re-serializes to the same bytes, and decodes to the committed arrays;
- encoding the committed input with the recorded parameters reproduces the file exactly
  (current format version only: an older directory is only read);
- int8 matvec (bit-exact by docs/format.md §6.4) reproduces the committed outputs;
- every truncation of a blob is a FormatError;
- the PBLinear state dict loads into an empty PBLinear (an older layout through the
  converter of docs/format.md §8.4), saves in today's layout, and matches a fresh conversion.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pbcodec
import pytest
from pbcodec import reference as ref

GOLDEN = Path(__file__).resolve().parent / "golden"
VERSIONS = sorted((d for d in GOLDEN.iterdir() if d.is_dir() and re.fullmatch(r"v\d+", d.name)), key=lambda d: d.name)


def _load_generator():
    spec = importlib.util.spec_from_file_location("make_golden", GOLDEN / "make_golden.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


MAKE_GOLDEN = _load_generator()
CURRENT = MAKE_GOLDEN.VERSION  # the version today's writers produce
MANIFESTS = {d.name: json.loads((d / "manifest.json").read_text()) for d in VERSIONS}


def cases(kind):
    return [
        pytest.param(GOLDEN / v, c, id=f"{v}/{c['name']}")
        for v, m in MANIFESTS.items()
        for c in m["cases"]
        if c["kind"] == kind
    ]


def npy(d: Path, name: str) -> np.ndarray:
    return np.load(d / name, allow_pickle=False)


def assert_same_array(got, want, what=""):
    """Same dtype, shape and bytes (so -0.0 != +0.0; NaNs compared bit for bit)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape, (
        f"{what}: {got.dtype}{got.shape} vs {want.dtype}{want.shape}"
    )
    assert np.ascontiguousarray(got).tobytes() == np.ascontiguousarray(want).tobytes(), f"{what}: contents differ"


def assert_same_bits_nan(got, want, what=""):
    """float32 equal bit for bit, except that any NaN equals any NaN (§6.4 fixes the
    arithmetic, not NaN payloads)."""
    assert got.dtype == want.dtype == np.float32 and got.shape == want.shape, what
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan), f"{what}: NaN positions differ"
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32)), f"{what}: outputs differ"


def compress_kwargs(d: Path, case: dict) -> dict:
    kw = dict(case["params"])
    if "importance" in case["inputs"]:
        kw["importance"] = npy(d, case["inputs"]["importance"])
    return kw


def pb_case(version: str, name: str) -> dict:
    return next(c for c in MANIFESTS[version]["cases"] if c["name"] == name)


# ------------------------------------------------------------------ the directory itself


def test_there_is_a_golden_directory_for_the_current_version():
    assert CURRENT in MANIFESTS, f"tests/golden/{CURRENT}/ is missing: run tests/golden/make_golden.py"


@pytest.mark.parametrize("d", VERSIONS, ids=lambda d: d.name)
def test_manifest_sha256_matches_every_file(d):
    m = MANIFESTS[d.name]
    on_disk = sorted(p.name for p in d.iterdir() if p.name != "manifest.json")
    assert on_disk == sorted(m["sha256"]), "files added to or removed from a golden directory"
    for name, digest in m["sha256"].items():
        assert hashlib.sha256((d / name).read_bytes()).hexdigest() == digest, f"{d.name}/{name} was modified"
    # Every file a case names exists and is covered by the checksums.
    for c in m["cases"]:
        named = [c["file"], *c.get("inputs", {}).values(), *c.get("outputs", {}).values()]
        named += [c["int8_matvec"][k] for k in ("x", "y")] if "int8_matvec" in c else []
        assert set(named) <= set(m["sha256"]), c["name"]


def test_generator_refuses_to_overwrite(capsys):
    before = {p.name: p.stat().st_mtime_ns for p in (GOLDEN / CURRENT).iterdir()}
    assert MAKE_GOLDEN.main(["--out", str(GOLDEN / CURRENT)]) == 1
    assert "never rewritten" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in (GOLDEN / CURRENT).iterdir()} == before


# ------------------------------------------------------------------ RLE (§3-4)


@pytest.mark.parametrize("d, case", cases("rle"))
def test_rle_golden(simd, d, case):
    blob = (d / case["file"]).read_bytes()
    values = npy(d, case["inputs"]["values"])
    for impl in (pbcodec, ref):
        what = f"{impl.__name__} {case['name']}"
        r = impl.RLE.from_bytes(blob)
        assert r.to_bytes() == blob, what
        assert r.nbytes == len(blob), what
        assert r.shape == values.shape, what
        assert_same_array(impl.rle_decode(r), values, what)
        if d.name == CURRENT:
            assert impl.rle_encode(values, **case["params"]).to_bytes() == blob, what + ": encoder output changed"


# ------------------------------------------------------------------ PBTensor (§6-7)


@pytest.mark.parametrize("d, case", cases("pbtensor"))
def test_pbtensor_golden(simd, d, case):
    blob = (d / case["file"]).read_bytes()
    weight = npy(d, case["inputs"]["weight"])
    w_hat = npy(d, case["outputs"]["decompressed"])
    for impl in (pbcodec, ref):
        what = f"{impl.__name__} {case['name']}"
        t = impl.PBTensor.from_bytes(blob)
        assert t.to_bytes() == blob, what
        assert t.nbytes == len(blob), what
        assert t.shape == weight.shape, what
        assert_same_array(t.decompress(), w_hat, what + " decompress")
        if d.name == CURRENT:
            again = impl.compress(weight, **compress_kwargs(d, case)).to_bytes()
            assert again == blob, what + ": compressor output changed"


@pytest.mark.parametrize("d, case", [p for p in cases("pbtensor") if "int8_matvec" in p.values[1]])
def test_pbtensor_golden_int8_matvec(simd, d, case):
    t_core = pbcodec.PBTensor.from_bytes((d / case["file"]).read_bytes())
    t_ref = ref.PBTensor.from_bytes((d / case["file"]).read_bytes())
    x = npy(d, case["int8_matvec"]["x"])
    y = npy(d, case["int8_matvec"]["y"])
    assert np.isnan(y).any() and np.isfinite(y).any()  # the NaN block and the normal rows
    for t in (t_core, t_ref):
        what = f"{type(t).__module__} {case['name']}"
        assert_same_bits_nan(t.matvec(x, activations="int8"), y, what)
        assert_same_bits_nan(t.matvec(x[0], activations="int8"), y[0], what + " 1-D")
    with _threads(1):
        assert_same_bits_nan(
            pbcodec.PBTensor.from_bytes(t_core.to_bytes()).matvec(x, activations="int8"), y, "1 thread"
        )


class _threads:
    def __init__(self, n):
        self.n = n

    def __enter__(self):
        self.before = pbcodec.get_num_threads()
        pbcodec.set_num_threads(self.n)

    def __exit__(self, *exc):
        pbcodec.set_num_threads(self.before)


# ------------------------------------------------------------------ truncations


@pytest.mark.parametrize("d, case", cases("rle") + cases("pbtensor"))
def test_every_truncation_is_a_format_error(d, case):
    blob = (d / case["file"]).read_bytes()
    cls_core = pbcodec.RLE if case["kind"] == "rle" else pbcodec.PBTensor
    cls_ref = ref.RLE if case["kind"] == "rle" else ref.PBTensor
    for k in range(len(blob)):
        with pytest.raises(pbcodec.FormatError):
            cls_core.from_bytes(blob[:k])
    for k in range(0, len(blob), 7):  # the pure-Python twin on a sample of lengths
        with pytest.raises(pbcodec.FormatError):
            cls_ref.from_bytes(blob[:k])
    with pytest.raises(pbcodec.FormatError):
        cls_core.from_bytes(blob + b"\0")


# ------------------------------------------------------------------ safetensors files (§8)


@pytest.mark.parametrize("d, case", cases("safetensors"))
def test_safetensors_golden(simd, tmp_path, d, case):
    path = d / case["file"]
    blob = path.read_bytes()
    plain = {k: npy(d, f) for k, f in case["inputs"].items()}
    pbs = {k: (d / pb_case(d.name, v["case"])["file"]).read_bytes() for k, v in case["compressed"].items()}
    meta = pbcodec.load_metadata(path)
    assert {k: v for k, v in meta.items() if k != "pbcodec"} == case["metadata"]
    assert list(meta)[: len(case["metadata"])] == list(case["metadata"])  # the caller's order is kept

    for impl in (pbcodec, ref):
        what = f"{impl.__name__} {case['name']}"
        loaded = impl.load_file(path)
        assert sorted(loaded) == sorted([*plain, *pbs]), what
        for k, a in plain.items():
            assert_same_array(loaded[k], a, f"{what} {k}")
        for k, b in pbs.items():
            assert isinstance(loaded[k], impl.PBTensor), what
            assert loaded[k].to_bytes() == b, f"{what} {k}"
            src = pb_case(d.name, case["compressed"][k]["case"])
            assert_same_array(loaded[k].decompress(), npy(d, src["outputs"]["decompressed"]), f"{what} {k}")
        out = tmp_path / f"{impl.__name__}.resaved.safetensors"
        impl.save_file(loaded, out, metadata=case["metadata"])
        assert out.read_bytes() == blob, what + ": re-serialization differs"
        if d.name == CURRENT:
            fresh = dict(plain)
            for k, v in case["compressed"].items():
                src = pb_case(d.name, v["case"])
                fresh[k] = impl.compress(npy(d, src["inputs"]["weight"]), **compress_kwargs(d, src))
            out = tmp_path / f"{impl.__name__}.fresh.safetensors"
            impl.save_file(fresh, out, metadata=case["metadata"])
            assert out.read_bytes() == blob, what + ": writer output changed"


# ------------------------------------------------------------------ PBLinear state dict


@pytest.mark.parametrize("d, case", cases("pblinear_state_dict"))
def test_pblinear_state_dict_golden(d, case):
    torch = pytest.importorskip("torch")
    st = pytest.importorskip("safetensors.numpy")
    from pbcodec.torch import PBLinear

    sd = st.load_file(str(d / case["file"]))
    assert {k: [str(v.dtype), list(v.shape)] for k, v in sd.items()} == case["keys"]
    # pbcodec's own safetensors reader agrees with the safetensors package on this file.
    for k, v in pbcodec.load_file(d / case["file"]).items():
        assert_same_array(v, sd[k], k)

    weight = npy(d, case["inputs"]["weight"])
    bias = npy(d, case["inputs"]["bias"])
    m, n = weight.shape
    mod = PBLinear(n, m)
    mod.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in sd.items()})
    src = pb_case(d.name, case["same_weight_as"])
    assert mod.pb.to_bytes() == (d / src["file"]).read_bytes()
    assert_same_array(mod.bias.detach().numpy(), bias, "bias")
    # Loaded from any version's layout, it saves in today's: the current directory's file.
    now = st.load_file(str(GOLDEN / CURRENT / case["file"]))
    resaved = {k: v.detach().numpy() for k, v in mod.state_dict().items()}
    assert sorted(resaved) == sorted(now)
    for k, v in resaved.items():
        assert_same_array(v, now[k], f"re-saved state_dict[{k!r}]")

    if "int8_matvec" in src:  # int8 forward = the golden int8 matvec + bias (one float32 add)
        mod.activations = "int8"
        x = npy(d, src["int8_matvec"]["x"])
        with torch.no_grad():
            y = mod(torch.from_numpy(x)).numpy()
        assert_same_bits_nan(y, npy(d, src["int8_matvec"]["y"]) + bias, "forward int8")

    if d.name == CURRENT:
        lin = torch.nn.Linear(n, m)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(weight))
            lin.bias.copy_(torch.from_numpy(bias))
        fresh = PBLinear.from_linear(lin, **case["params"]).state_dict()
        assert sorted(fresh) == sorted(sd)
        for k, v in fresh.items():
            assert_same_array(v.detach().numpy(), sd[k], f"state_dict[{k!r}]")
