"""Coverage-guided fuzz target (atheris/libFuzzer): a ``pbcodec.PBTensor`` built with the
plain, unvalidated constructor from arbitrary parts, then ``matvec`` (float32 and int8),
``build_layout``, ``decompress`` and ``to_bytes``. See docs/fuzzing.md.

    python fuzz/fuzz_pb_parts.py fuzz/corpus/pb_parts -max_total_time=60

Its input format is the one of the Rust target ``pb_parts`` (``pbcodec_fuzz::pb_parts`` in
fuzz/src/lib.rs), so both share a corpus: this one covers the Python layer on the way (the
constructor, ``_parts``, the binding's argument conversion in rust/src/python.rs), the Rust
target the core behind it with coverage. A bug is any exception other than ``FormatError``,
``ValueError`` or ``TypeError`` (a crash ends the process), or a tensor that ``to_bytes``
accepts whose blob does not parse back to the same tensor.
"""

from __future__ import annotations

import struct
import sys

import atheris
import numpy as np
from _instrument import not_instrumented

with atheris.instrument_imports(include=["pbcodec"], exclude=not_instrumented()):
    import pbcodec

MAX_DENSE = 1 << 20
_HEAD = struct.Struct("<IIIBBBB")


class _Input:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, k: int) -> bytes:
        b = self.data[self.pos : self.pos + k]
        self.pos += len(b)
        return b

    def section(self, dtype: str) -> np.ndarray:
        raw = self.take(4).ljust(4, b"\0")
        (count,) = struct.unpack("<I", raw)
        size = np.dtype(dtype).itemsize
        k = min(count, (len(self.data) - self.pos) // size)
        return np.frombuffer(self.take(k * size), dtype=dtype).copy()


def test_one_input(data: bytes) -> None:
    d = _Input(data)
    m, n, group_size, scale, count_bits, value_bits, batch = _HEAD.unpack(d.take(_HEAD.size).ljust(_HEAD.size, b"\0"))
    batch %= 5
    sdt = np.float32 if scale % 2 else np.float16
    signs = d.section("u1")
    mu, alpha, sigma = (d.section("<f4").astype(sdt) for _ in range(3))
    counts, values = d.section("u1"), d.section("u1")
    code_offsets, value_offsets = d.section("<i8"), d.section("<i8")
    x0 = d.section("<f4")
    try:
        rle = pbcodec.RLE((m, n), count_bits, value_bits, counts, values, code_offsets, value_offsets)
        t = pbcodec.PBTensor((m, n), signs, mu, alpha, sigma, rle, group_size)
    except (ValueError, TypeError, OverflowError):  # parts that do not fit the shape: refused up front
        return
    if batch * n <= MAX_DENSE and batch * m <= MAX_DENSE:
        x = np.resize(x0 if x0.size else np.ones(1, np.float32), (batch, n)).astype(np.float32)
        for mode in ("float32", "int8"):
            try:
                t.matvec(x, activations=mode)
            except (ValueError, TypeError):  # FormatError is a ValueError
                pass
    try:
        t.build_layout()
    except (ValueError, TypeError):
        pass
    if m * n <= MAX_DENSE:
        try:
            t.decompress()
        except (ValueError, TypeError):
            pass
    try:
        blob = t.to_bytes()
    except (ValueError, TypeError):
        return
    assert pbcodec.PBTensor.from_bytes(blob) == t, "to_bytes accepted parts that do not parse back"


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
