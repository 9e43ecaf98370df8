"""Write the golden files of one format version (tests/golden/<version>/), once.

Usage (from the repository root, with the package installed)::

    python tests/golden/make_golden.py            # writes tests/golden/v2/
    python tests/golden/make_golden.py --out DIR  # same content elsewhere (a dry run)

A golden directory is never rewritten: the script refuses to write into an existing
one. A new format version gets a new directory (v2/, ...) and a new ``VERSION`` here;
the old directory stays as it is, and tests/test_golden.py keeps checking it, so a change
that alters the bytes of a released format fails the tests instead of passing silently
(its writer and reader would otherwise change together). v2 differs from v1 only in the
PBLinear state dict (layout 2, docs/format.md §8.4: a file's component names under
``weight.``); every blob and file format is still at version 1 (``versions`` in the
manifest).

Every input is drawn from a fixed seed, shaped by hand to reach the corner cases of
docs/format.md (runs longer than ESC, runs of exactly ESC, empty rows, rows that start or
end with a value, -128 and -8 values, groups that do not divide n, n = 0, a partial last
64-column block, more rows than one 16-row tile), and stored next to its output as .npy,
so the tests never depend on numpy's random streams. Each output is produced by the Rust
core and checked, here already, against ``pbcodec.reference`` byte for byte.
``manifest.json`` records, for every case, how it was produced (function, parameters,
seed) and the sha256 of every file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pbcodec
from pbcodec import reference as ref

#: The golden directory this script writes: what today's writers produce.
VERSION = "v2"
#: The version of each stored form they write (docs/format.md §10).
FORM_VERSIONS = {"rle": 1, "pbtensor": 1, "safetensors": 1, "pblinear_state_dict": 2}
HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------- inputs


def sparse(rng: np.random.Generator, shape, density: float, lo: int, hi: int) -> np.ndarray:
    """int8 array with about ``density`` nonzeros drawn from lo..hi without 0."""
    v = rng.integers(lo, hi + 1, size=shape)
    v[v == 0] = hi
    return np.where(rng.random(shape) < density, v, 0).astype(np.int8)


def rle_inputs() -> dict[str, tuple[np.ndarray, dict, int]]:
    """name -> (int8 array, rle_encode parameters, seed)."""
    out = {}

    seed = 101
    rng = np.random.default_rng(seed)
    a = sparse(rng, (6, 70), 0.12, -128, 127)
    a[1] = 0  # an empty row: no codes at all
    a[2, :] = 0
    a[2, 15] = -128  # run of exactly ESC = 15: escape, then code 0; the most negative value
    a[2, 16] = 127  # adjacent values: code 0
    a[3, :] = 0
    a[3, 0] = 5  # value at the row start
    a[3, 69] = -1  # value at the row end after a run of 68 (4 escapes + 8)
    a[4, 60:] = 0  # trailing zeros emit nothing
    out["rle_cb4_v8"] = (a, {"count_bits": 4, "value_bits": 8}, seed)

    seed = 102
    rng = np.random.default_rng(seed)
    a = sparse(rng, (2, 3, 41), 0.2, -128, 127)  # 3-D: rows are the last axis
    a[0, 1] = 0
    out["rle_auto_v8"] = (a, {"count_bits": "auto", "value_bits": 8}, seed)

    seed = 103
    rng = np.random.default_rng(seed)
    a = sparse(rng, (5, 37), 0.15, -8, 7)
    a[0, :] = 0
    a[0, 36] = -8  # 4-bit extremes
    a[1, 0] = 7
    a[4] = 0
    out["rle_cb4_v4"] = (a, {"count_bits": 4, "value_bits": 4}, seed)

    seed = 104
    rng = np.random.default_rng(seed)
    a = sparse(rng, (4, 53), 0.05, -8, 7)
    a[2, 52] = 3  # after a long run
    if np.count_nonzero(a) % 2 == 0:  # an odd value count: a padding nibble
        a[3, 0] = 0 if a[3, 0] else 1
    out["rle_auto_v4"] = (a, {"count_bits": "auto", "value_bits": 4}, seed)

    seed = 105
    rng = np.random.default_rng(seed)
    a = sparse(rng, (90,), 0.3, -128, 127)  # 1-D: one row; count_bits 1 (ESC = 1)
    out["rle_cb1_1d"] = (a, {"count_bits": 1, "value_bits": 8}, seed)

    out["rle_n0"] = (np.zeros((3, 0), np.int8), {"count_bits": "auto", "value_bits": 8}, 0)
    return out


def pb_inputs() -> dict[str, tuple[dict[str, np.ndarray], dict, int]]:
    """name -> ({"weight": W, ["importance": imp]}, compress parameters, seed)."""
    out = {}

    seed = 201
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((6, 40)).astype(np.float32)
    w[2, :5] = 0.0  # sign(0) = +1
    w[3, 7] = -0.0
    out["pb_f16_row"] = ({"weight": w}, {"salient": 0.1, "scale_dtype": "float16"}, seed)

    seed = 202
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((5, 50)) * 0.02).astype(np.float32)
    w[4] = 0.0  # all-zero row: alpha = sigma = 0
    out["pb_f32_g16_s4"] = (
        {"weight": w},
        # 16 does not divide 50: the last group has 2 columns
        {"salient": 0.15, "salient_bits": 4, "group_size": 16, "scale_dtype": "float32"},
        seed,
    )

    seed = 203
    rng = np.random.default_rng(seed)
    w = rng.laplace(size=(4, 70)).astype(np.float32)
    imp = rng.random(70).astype(np.float32)
    imp[3] = 0.0
    out["pb_f16_g32_tensor"] = (
        {"weight": w, "importance": imp},
        {"salient": 0.08, "group_size": 32, "select": "tensor", "count_bits": 3, "scale_dtype": "float16"},
        seed,
    )

    seed = 204
    rng = np.random.default_rng(seed)
    # 20 rows: two 16-row tiles; n = 130: three 64-column blocks (the last of 2 columns),
    # groups of 64 (int8 mode allowed), the last group of 2 columns.
    w = rng.standard_normal((20, 130)).astype(np.float32)
    w[:, 100] *= 40.0  # a strong outlier column
    out["pb_int8_g64"] = ({"weight": w}, {"salient": 0.1, "group_size": 64, "scale_dtype": "float16"}, seed)

    seed = 205
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((17, 100)) + 0.5).astype(np.float32)
    out["pb_int8_f32_noshift"] = (
        {"weight": w},
        {"salient": 0.05, "shift": False, "count_bits": "auto", "scale_dtype": "float32"},
        seed,
    )

    out["pb_n0"] = ({"weight": np.zeros((3, 0), np.float32)}, {"salient": 0.1}, 0)
    return out


#: int8 matvec cases (docs/format.md §6.4): tensor name -> seed of x.
INT8_CASES = {"pb_int8_g64": 301, "pb_int8_f32_noshift": 302}


def int8_x(n: int, seed: int) -> np.ndarray:
    """A batch of 5 activation rows: Gaussian, a huge-magnitude row, an all-zero row
    (d_b = 0), a row with an exact 0.5-step tie, and a row with a NaN in one block."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((5, n)).astype(np.float32)
    x[1] *= np.float32(1e4)
    x[2] = 0.0
    x[3, :] = 0.0
    x[3, :4] = [127.0, 0.5, 1.5, -2.5]  # d = 1: rne ties 0.5 -> 0, 1.5 -> 2, -2.5 -> -2
    x[4, n // 2] = np.nan  # one block quantizes to NaN: its rows' outputs are NaN
    return x


#: The safetensors file (docs/format.md §8): compressed tensors (name -> pb case whose
#: input and parameters it uses) and plain tensors (name -> seed).
ST_PB = {"encoder.layer0.weight": "pb_f16_row", "encoder.layer1.weight": "pb_f32_g16_s4"}
ST_METADATA = {"format": "pt", "note": "pbcodec golden file"}


def st_plain() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(401)
    return {
        "encoder.layer0.bias": rng.standard_normal(6).astype(np.float32),
        "embed.half": rng.standard_normal((3, 4)).astype(np.float16),
        "position_ids": np.arange(7, dtype=np.int64),
        "mask": np.array([1, 0, 1], np.uint8),
    }


#: The PBLinear state dict: the weight and parameters of this pb case, plus a bias.
SD_CASE = "pb_int8_g64"
SD_BIAS_SEED = 501


# ---------------------------------------------------------------------------- writer


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _require_equal(what: str, a: bytes, b: bytes) -> None:
    if a != b:
        raise SystemExit(f"make_golden: core and reference disagree on {what}; fix that before writing golden files")


def write(out: Path) -> None:
    out.mkdir(parents=True)  # FileExistsError if a previous run left anything
    cases: list[dict] = []

    def save_npy(name: str, a: np.ndarray) -> str:
        np.save(out / name, a, allow_pickle=False)
        return name

    for name, (a, params, seed) in rle_inputs().items():
        blob = pbcodec.rle_encode(a, **params).to_bytes()
        _require_equal(name, blob, ref.rle_encode(a, **params).to_bytes())
        (out / f"{name}.pbrl").write_bytes(blob)
        cases.append(
            {
                "name": name,
                "kind": "rle",
                "file": f"{name}.pbrl",
                "function": "pbcodec.rle_encode",
                "params": params,
                "seed": seed,
                "inputs": {"values": save_npy(f"{name}.values.npy", a)},
            }
        )

    pbs = {}
    for name, (arrays, params, seed) in pb_inputs().items():
        t = pbcodec.compress(arrays["weight"], importance=arrays.get("importance"), **params)
        blob = t.to_bytes()
        rt = ref.compress(arrays["weight"], importance=arrays.get("importance"), **params)
        _require_equal(name, blob, rt.to_bytes())
        w_hat = rt.decompress()
        _require_equal(f"{name} decompress", t.decompress().tobytes(), w_hat.tobytes())
        pbs[name] = t
        (out / f"{name}.pbtn").write_bytes(blob)
        case = {
            "name": name,
            "kind": "pbtensor",
            "file": f"{name}.pbtn",
            "function": "pbcodec.compress",
            "params": params,
            "seed": seed,
            "inputs": {k: save_npy(f"{name}.{k}.npy", v) for k, v in arrays.items()},
            "outputs": {"decompressed": save_npy(f"{name}.decompressed.npy", w_hat)},
        }
        if name in INT8_CASES:
            x = int8_x(t.shape[1], INT8_CASES[name])
            y = rt.matvec(x, activations="int8")  # the spec's twin defines the expected bits
            got = t.matvec(x, activations="int8")
            nan = np.isnan(y)
            if not (
                np.array_equal(nan, np.isnan(got))
                and np.array_equal(y[~nan].view(np.uint32), got[~nan].view(np.uint32))
            ):
                raise SystemExit(f"make_golden: core and reference int8 matvec disagree on {name}")
            case["int8_matvec"] = {
                "seed": INT8_CASES[name],
                "x": save_npy(f"{name}.x.npy", x),
                "y": save_npy(f"{name}.y_int8.npy", y),
            }
        cases.append(case)

    plain = st_plain()
    tensors = {**{k: pbs[v] for k, v in ST_PB.items()}, **plain}
    pbcodec.save_file(tensors, out / "model.safetensors", metadata=ST_METADATA)
    ref_path = out / "model.reference.tmp"
    ref.save_file(
        {**{k: ref.PBTensor.from_bytes(pbs[v].to_bytes()) for k, v in ST_PB.items()}, **plain},
        ref_path,
        metadata=ST_METADATA,
    )
    try:
        _require_equal("model.safetensors", (out / "model.safetensors").read_bytes(), ref_path.read_bytes())
    finally:
        ref_path.unlink()
    cases.append(
        {
            "name": "model",
            "kind": "safetensors",
            "file": "model.safetensors",
            "function": "pbcodec.save_file",
            "metadata": ST_METADATA,
            "compressed": {k: {"case": v} for k, v in ST_PB.items()},
            "inputs": {k: save_npy(f"model.{k}.npy", v) for k, v in plain.items()},
        }
    )

    write_state_dict(out, cases)

    files = sorted(p.name for p in out.iterdir())
    manifest = {
        "versions": FORM_VERSIONS,
        "generator": "tests/golden/make_golden.py",
        "generated_with": {"pbcodec": pbcodec.__version__, "numpy": np.__version__},
        "note": "Never edit or regenerate this directory; a new format version gets a new one.",
        "cases": cases,
        "sha256": {f: sha256(out / f) for f in files},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


def write_state_dict(out: Path, cases: list[dict]) -> None:
    """``PBLinear.from_linear(...).state_dict()`` saved with the safetensors package (no
    pickle): the saved layout of pbcodec.torch.PBLinear at this format version."""
    import safetensors.numpy
    import torch
    from pbcodec.torch import PBLinear

    arrays, params, seed = pb_inputs()[SD_CASE]
    bias = np.random.default_rng(SD_BIAS_SEED).standard_normal(arrays["weight"].shape[0]).astype(np.float32)
    lin = torch.nn.Linear(arrays["weight"].shape[1], arrays["weight"].shape[0])
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(arrays["weight"]))
        lin.bias.copy_(torch.from_numpy(bias))
    mod = PBLinear.from_linear(lin, **params)
    np.save(out / "pblinear.bias.npy", bias, allow_pickle=False)
    sd = {k: v.detach().cpu().numpy() for k, v in mod.state_dict().items()}
    safetensors.numpy.save_file(sd, str(out / "pblinear.safetensors"))
    cases.append(
        {
            "name": "pblinear",
            "kind": "pblinear_state_dict",
            "file": "pblinear.safetensors",
            "function": "pbcodec.torch.PBLinear.from_linear(torch.nn.Linear).state_dict(), saved by safetensors.numpy",
            "params": params,
            "seed": seed,
            "bias_seed": SD_BIAS_SEED,
            "same_weight_as": SD_CASE,
            "inputs": {
                "weight": f"{SD_CASE}.weight.npy",
                "bias": "pblinear.bias.npy",
            },
            "keys": {k: [str(v.dtype), list(v.shape)] for k, v in sd.items()},
        }
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=HERE / VERSION, help=f"directory to create (default: {HERE / VERSION})")
    args = p.parse_args(argv)
    if args.out.exists():
        print(
            f"make_golden: {args.out} exists; golden files are never rewritten "
            "(a new format version gets a new directory)",
            file=sys.stderr,
        )
        return 1
    write(args.out)
    print(f"wrote {args.out} ({sum(f.stat().st_size for f in args.out.iterdir())} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
