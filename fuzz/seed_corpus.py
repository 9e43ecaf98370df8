"""Seed the fuzz corpora (fuzz/corpus/<target>/) from the golden files (tests/golden/v*/).

    python fuzz/seed_corpus.py        # idempotent: seeds are named after their source

rle_from_bytes gets every golden RLE blob and the residual embedded in every golden
PBTensor; pb_from_bytes every golden PBTensor blob; pb_parts every golden PBTensor as
parts in the input format of ``pbcodec_fuzz::pb_parts`` (fuzz/src/lib.rs), with the
golden int8 activations where there are some; load_file (fuzz/fuzz_load_file.py) every
golden safetensors file. Run it with the project's venv (numpy
and the installed pbcodec; only its pure-Python twin pbcodec.reference is used).
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import numpy as np
from pbcodec import reference as ref

ROOT = Path(__file__).resolve().parent.parent


def pb_parts_input(t: ref.PBTensor, x: np.ndarray | None) -> bytes:
    """A valid tensor in pb_parts' input format (header, then nine counted sections)."""
    m, n = t.shape
    r = t.residual
    batch = 2
    head = struct.pack("<IIIBBBB", m, n, t.group_size, t.mu.dtype.itemsize == 4, r.count_bits, r.value_bits, batch)

    def section(a: np.ndarray, dtype: str) -> bytes:
        a = np.ascontiguousarray(a, dtype=dtype).ravel()
        return struct.pack("<I", a.size) + a.tobytes()

    if x is None:
        x = np.linspace(-2.0, 2.0, max(n, 1), dtype=np.float32)[:n]
    return head + b"".join(
        [
            section(t.signs, "u1"),
            section(t.mu.astype(np.float32), "<f4"),
            section(t.alpha.astype(np.float32), "<f4"),
            section(t.sigma.astype(np.float32), "<f4"),
            section(r.counts, "u1"),
            section(r.values.view(np.uint8), "u1"),
            section(r.code_offsets, "<i8"),
            section(r.value_offsets, "<i8"),
            section(x, "<f4"),
        ]
    )


def main() -> int:
    out = ROOT / "fuzz" / "corpus"
    written = 0

    def put(target: str, name: str, data: bytes) -> None:
        nonlocal written
        d = out / target
        d.mkdir(parents=True, exist_ok=True)
        (d / f"golden-{name}").write_bytes(data)
        written += 1

    for d in sorted((ROOT / "tests" / "golden").glob("v*")):
        manifest = json.loads((d / "manifest.json").read_text())
        for c in manifest["cases"]:
            tag = f"{d.name}-{c['name']}"
            blob = (d / c["file"]).read_bytes()
            if c["kind"] == "rle":
                put("rle_from_bytes", tag, blob)
            elif c["kind"] == "pbtensor":
                put("pb_from_bytes", tag, blob)
                (res_len,) = struct.unpack_from("<Q", blob, 32)  # §7: the embedded RLE's length
                put("rle_from_bytes", tag + "-residual", blob[len(blob) - 4 - res_len : len(blob) - 4])
                x = np.load(d / c["int8_matvec"]["x"])[0] if "int8_matvec" in c else None
                put("pb_parts", tag, pb_parts_input(ref.PBTensor.from_bytes(blob), x))
            elif c["kind"] in ("safetensors", "pblinear_state_dict"):
                put("load_file", tag, blob)
    print(f"seeded {written} inputs under {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
