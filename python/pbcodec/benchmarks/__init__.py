"""The benchmark suite (``pbcodec bench``; also ``benches/*.py`` in a checkout).

- :mod:`pbcodec.benchmarks.codec`: bit-packing, signs and the zero-run code against
  numpy, in and out of cache, with copy bandwidth and the entropy bound.
- :mod:`pbcodec.benchmarks.matvec`: the fused matvec against numpy float32/float16,
  decompress-then-GEMV and torch int8 dynamic Linear, cold and hot, with the roofline.

Each prints tables of medians and ratios measured side by side in one run.
"""

from __future__ import annotations

import os
import subprocess
import sys

# Idle OpenBLAS / OpenMP worker threads must sleep instead of spinning, or on a small
# machine each library's spinning threads slow down whatever runs next (see
# matvec.py). Only effective if set before numpy / torch load, hence the subprocesses.
LIB_ENV = {"OPENBLAS_THREAD_TIMEOUT": "4", "OMP_WAIT_POLICY": "PASSIVE"}


def run_all(quick: bool = False, lib_defaults: bool = False) -> int:
    """Run the codec and matvec benchmarks, each in a fresh interpreter with
    :data:`LIB_ENV` applied (unless ``lib_defaults``); returns the worst exit status."""
    env = dict(os.environ)
    if not lib_defaults:
        for k, v in LIB_ENV.items():
            env.setdefault(k, v)
    status = 0
    for mod in ("pbcodec.benchmarks.codec", "pbcodec.benchmarks.matvec", "pbcodec.benchmarks.model"):
        quick_flag = ["--repeats", "5"] if mod.endswith("model") else ["--quick"]
        args = [sys.executable, "-m", mod] + (quick_flag if quick else [])
        print("$ python -m " + " ".join(args[2:]), flush=True)
        status = max(status, subprocess.run(args, env=env).returncode)
    return status
