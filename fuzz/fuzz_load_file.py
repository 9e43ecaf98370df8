"""Coverage-guided fuzz target (atheris/libFuzzer) for safetensors loading: ``pbcodec.load_file``
on arbitrary file contents (docs/format.md §8). See docs/fuzzing.md.

    python fuzz/fuzz_load_file.py fuzz/corpus/load_file -max_total_time=60

The safetensors layer (header, JSON, offsets, component dtypes/shapes, metadata) is Python
(pbcodec/files.py), so atheris instruments pbcodec's Python code for coverage; the
component contents go on to the Rust core's validation (covered by the cargo-fuzz target
``pb_parts``). A bug is anything other than ``FormatError`` for a rejected file, or, for an
accepted one: a tensor whose blob does not round-trip, a kernel failing on a validated
tensor, a save/load round trip that changes a tensor, or the pure-Python reference
rejecting or reading differently what the core accepted.
"""

from __future__ import annotations

import os
import sys
import tempfile

import atheris
import numpy as np
from _instrument import not_instrumented

with atheris.instrument_imports(include=["pbcodec"], exclude=not_instrumented()):
    import pbcodec
    from pbcodec import reference as ref

#: Largest dense size an accepted tensor is decompressed to (elements).
MAX_DENSE = 1 << 20

_DIR = tempfile.mkdtemp(prefix="pbcodec-fuzz-")
_PATH = os.path.join(_DIR, "input.safetensors")
_RESAVED = os.path.join(_DIR, "resaved.safetensors")


def _same(a, b) -> bool:
    if isinstance(a, pbcodec.PBTensor):
        return isinstance(b, (pbcodec.PBTensor, ref.PBTensor)) and a.to_bytes() == b.to_bytes()
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_one_input(data: bytes) -> None:
    with open(_PATH, "wb") as f:
        f.write(data)
    try:
        got = pbcodec.load_file(_PATH)
    except pbcodec.FormatError:
        return
    meta = {k: v for k, v in pbcodec.load_metadata(_PATH).items() if k != "pbcodec"}
    for name, v in got.items():
        if isinstance(v, pbcodec.PBTensor):
            blob = v.to_bytes()
            assert pbcodec.PBTensor.from_bytes(blob) == v, name
            m, n = v.shape
            if m * n <= MAX_DENSE:
                v.decompress()
            if n <= MAX_DENSE and m <= MAX_DENSE:
                v.matvec(np.linspace(-1, 1, n, dtype=np.float32))
                if v.group_size >= n or v.group_size % 64 == 0:
                    v.matvec(np.linspace(-1, 1, n, dtype=np.float32), activations="int8")
    # What the core accepted, the spec's twin accepts and reads the same way.
    twin = ref.load_file(_PATH)
    assert sorted(twin) == sorted(got), "reference reads other tensor names"
    for k, v in got.items():
        assert _same(v, twin[k]), f"reference reads {k!r} differently"
    # Saving what was loaded and loading it again changes nothing.
    try:
        pbcodec.save_file(got, _RESAVED, metadata=meta)
    except ValueError as e:  # a name the writer refuses (e.g. colliding components) is fine
        assert not isinstance(e, pbcodec.FormatError), e
        return
    again = pbcodec.load_file(_RESAVED)
    assert sorted(again) == sorted(got)
    for k, v in got.items():
        assert _same(v, again[k]), f"save/load changed {k!r}"


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
