"""The benchmark suite, run from a source checkout: ``python benches/run_all.py [--quick]``
(or ``pbcodec bench`` from the checkout). Benchmarks are not shipped in the wheel.

- ``bench_codec.py``: bit-packing, signs and the zero-run code against numpy, in and
  out of cache, with copy bandwidth and the entropy bound.
- ``bench_matvec.py``: the fused matvec against numpy float32, decompress-then-GEMV
  and torch's int8 dynamic Linear, cold and in cache, with the roofline.
- ``bench_kernels.py``: both activation modes against numpy float32 and torch's int8
  Linear (cold, in cache, batch scaling, decompress, PBLinear, MiniLM), with targets.
- ``bench_model.py``: all-MiniLM-L6-v2 with compressed Linear layers.
- ``bench_quality.py``: the quality report (plain / activation-aware / calibrated
  compression of all-MiniLM-L6-v2 at 2-5 bits/weight, with int2/3/4 references).

Each runs in a fresh interpreter (``_env.py`` sets the BLAS/OpenMP environment before
numpy loads) and prints tables of medians and ratios measured side by side in one run.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_all(quick: bool = False, extra: list[str] | None = None) -> int:
    """Run every benchmark script; returns the worst exit status."""
    status = 0
    for script in ("bench_kernels.py", "bench_codec.py", "bench_matvec.py", "bench_model.py", "bench_quality.py"):
        quick_flag = ["--repeats", "5"] if script == "bench_model.py" else ["--quick"]
        args = [sys.executable, str(HERE / script)] + (quick_flag if quick else []) + list(extra or [])
        print("$ python benches/" + " ".join(args[1:]).split("benches/")[-1], flush=True)
        status = max(status, subprocess.run(args).returncode)
    return status


if __name__ == "__main__":
    sys.exit(run_all(quick="--quick" in sys.argv[1:], extra=[a for a in sys.argv[1:] if a == "--lib-defaults"]))
