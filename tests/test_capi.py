"""The C API (capi/, include/pbcodec.h) from C: build the library, compile
examples/c/pbcodec_matvec.c with `cc` (against the shared and the static
library), run it on files written by `pbcodec compress`, and compare its
output with Python's PBTensor.matvec bit for bit. Under valgrind (when
installed) on a valid file and on structurally corrupted ones: no memory
error, no leak, a clean error exit."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pbcodec
import pytest
from pbcodec.files import read_safetensors, write_safetensors

ROOT = Path(__file__).resolve().parents[1]
CAPI = ROOT / "capi"
EXAMPLE = ROOT / "examples" / "c" / "pbcodec_matvec.c"

missing = [tool for tool in ("cc", "cargo") if shutil.which(tool) is None]
pytestmark = pytest.mark.skipif(bool(missing), reason=f"the C API test needs {' and '.join(missing)} on PATH")


@pytest.fixture(scope="module")
def binaries(tmp_path_factory):
    """The example linked against libpbcodec_c.so (with an rpath) and libpbcodec_c.a."""
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=CAPI, check=True, timeout=1200, env=_cargo_env())
    lib = CAPI / "target" / "release"
    out = tmp_path_factory.mktemp("capi")
    common = ["cc", "-O2", "-Wall", "-Wextra", "-Werror", f"-I{CAPI / 'include'}", str(EXAMPLE)]
    shared, static = out / "matvec_shared", out / "matvec_static"
    subprocess.run(
        [*common, f"-L{lib}", f"-Wl,-rpath,{lib}", "-lpbcodec_c", "-o", str(shared)], check=True, timeout=120
    )
    subprocess.run(
        [*common, str(lib / "libpbcodec_c.a"), "-lpthread", "-ldl", "-lm", "-o", str(static)], check=True, timeout=120
    )
    return {"shared": shared, "static": static}


def _cargo_env():
    env = dict(os.environ)
    env.setdefault("CARGO_TERM_COLOR", "never")
    return env


def _model(tmp_path, args):
    """A small checkpoint compressed by the command line with `args`."""
    rng = np.random.default_rng(7)
    src, dst = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    pbcodec.save_file(
        {
            "layers.0.q_proj.weight": rng.standard_normal((48, 80)).astype(np.float32),
            "layers.0.up_proj.weight": rng.standard_normal((96, 40)).astype(np.float16),
            "layers.0.q_proj.bias": rng.standard_normal(48).astype(np.float32),
            "embed_tokens.weight": rng.standard_normal((50, 16)).astype(np.float32),
        },
        src,
    )
    cmd = [sys.executable, "-m", "pbcodec", "compress", str(src), str(dst), "-q", *args]
    subprocess.run(cmd, check=True, timeout=120, capture_output=True)
    return dst


def _run(exe, *args, valgrind=False, timeout=120):
    cmd = [str(exe), *map(str, args)]
    if valgrind:
        cmd = [
            "valgrind",
            "-q",
            "--error-exitcode=99",
            "--leak-check=full",
            # rayon's worker threads live until exit by design ("possibly lost").
            "--errors-for-leak-kinds=definite,indirect",
            "--show-leak-kinds=definite,indirect",
            *cmd,
        ]
    env = {**os.environ, "PBCODEC_NUM_THREADS": "2"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _outputs(stdout, tag="y"):
    rows = [line.split() for line in stdout.splitlines() if line.startswith(tag + " ")]
    return {(int(b), int(i)): np.float32(v) for _, b, i, v in rows}


def _x(batch, n):
    b, j = np.arange(batch)[:, None], np.arange(n)[None, :]
    return ((((7 * j + 3 * b) % 17) - 8) / 8).astype(np.float32)


@pytest.mark.parametrize(
    "args", [[], ["--group-size", "16", "--salient-bits", "4", "--scale-dtype", "float32", "--salient", "0.3"]]
)
@pytest.mark.parametrize("link", ["shared", "static"])
def test_c_example_matches_python(binaries, tmp_path, args, link):
    path = _model(tmp_path, args)
    tensors = pbcodec.load_file(path)
    for name in ("layers.0.q_proj.weight", "layers.0.up_proj.weight"):
        t = tensors[name]
        r = _run(binaries[link], path, name, 3)
        assert r.returncode == 0, r.stderr
        assert f"{name}" in r.stdout and "pbcodec" in r.stdout
        assert "layers.0.q_proj.bias" in r.stdout and "F32" in r.stdout  # plain tensors are listed too
        got = _outputs(r.stdout)
        want = t.matvec(_x(3, t.shape[1]))
        assert len(got) == want.size
        for (b, i), v in got.items():
            assert v.tobytes() == want[b, i].tobytes(), (name, b, i, v, want[b, i])
        if t.group_size == t.shape[1] or t.group_size % 64 == 0:
            assert "int8 mode: status 0 (ok)" in r.stdout
            got8 = _outputs(r.stdout, "q")
            want8 = t.matvec(_x(3, t.shape[1]), activations="int8")
            assert len(got8) == want8.size
            for (b, i), v in got8.items():
                assert v.tobytes() == want8[b, i].tobytes(), (name, b, i, v, want8[b, i])
        else:  # group size 16: the int8 mode refuses it, with a reason
            assert "int8 mode: status 1 (int8 activations need a group size that is a multiple of 64" in r.stdout


def _corrupt(path, out, edit):
    raw, meta = read_safetensors(path)
    tensors = dict(raw)
    edit(tensors, meta)
    write_safetensors(out, tensors, meta)
    return out


def _replace(tensors, name, fn):
    from pbcodec.files import _raw

    a = tensors[name].array().copy()
    tensors[name] = _raw(fn(a), name)


def _corruptions(path, tmp_path):
    """Files that are valid safetensors but invalid pbcodec files, plus broken headers."""
    w = "layers.0.q_proj.weight"
    data = path.read_bytes()
    files = {}
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) - 5])
    files["truncated"] = tmp_path / "truncated.safetensors"
    bad_header = bytearray(data)
    bad_header[8] = ord("[")
    (tmp_path / "header.safetensors").write_bytes(bytes(bad_header))
    files["header"] = tmp_path / "header.safetensors"

    def offsets(a):
        a[5] = a[-1] + 10  # points past the code stream
        return a

    def neg_alpha(a):
        a[0, 0] = -abs(a[0, 0]) - 1
        return a

    files["code_offsets"] = _corrupt(
        path, tmp_path / "co.safetensors", lambda t, m: _replace(t, f"{w}.residual.code_offsets", offsets)
    )
    files["alpha"] = _corrupt(path, tmp_path / "al.safetensors", lambda t, m: _replace(t, f"{w}.alpha", neg_alpha))
    files["missing"] = _corrupt(path, tmp_path / "mi.safetensors", lambda t, m: t.pop(f"{w}.sigma"))
    files["counts"] = _corrupt(
        path,
        tmp_path / "cn.safetensors",
        lambda t, m: _replace(t, f"{w}.residual.counts", lambda a: np.full_like(a, 0xFF)),
    )
    return files


def test_c_example_rejects_corrupted_files(binaries, tmp_path):
    path = _model(tmp_path, [])
    for what, bad in _corruptions(path, tmp_path).items():
        with pytest.raises(pbcodec.FormatError):  # Python rejects it ...
            pbcodec.load_file(bad)
        r = _run(binaries["shared"], bad)  # ... and so does C, with a message
        assert r.returncode == 2, (what, r.stdout, r.stderr)
        assert "pbcodec_file_open failed (status 2)" in r.stderr, (what, r.stderr)


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_c_example_under_valgrind(binaries, tmp_path):
    path = _model(tmp_path, ["--group-size", "16"])
    r = _run(binaries["shared"], path, "layers.0.q_proj.weight", 2, valgrind=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "==" not in r.stderr, r.stderr  # valgrind reported nothing
    for what, bad in _corruptions(path, tmp_path).items():
        r = _run(binaries["shared"], bad, valgrind=True, timeout=600)
        assert r.returncode == 2, (what, r.stderr)
        assert "==" not in r.stderr, (what, r.stderr)
