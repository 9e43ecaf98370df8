"""Run the codec benchmark from a checkout: ``python benches/bench_codec.py [--quick] ...``
(the code lives in ``pbcodec.benchmarks.codec`` so ``pbcodec bench`` works from a wheel)."""

import os
import sys

if "--lib-defaults" not in sys.argv:
    # Before numpy/torch load: idle BLAS/OpenMP threads sleep (pbcodec.benchmarks.LIB_ENV).
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pbcodec.benchmarks.codec import main

sys.exit(main(sys.argv[1:]))
