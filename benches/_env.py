"""Imported first by every benchmark script, before numpy or torch load.

Idle OpenBLAS / OpenMP worker threads must sleep instead of spin-waiting: on a
2-core machine each library's spinning threads otherwise slow whatever runs next
by 3-8x, and every ratio against numpy/torch would be wrong. Pass
``--lib-defaults`` to a script to measure with the libraries' own defaults.
"""

import os
import sys

LIB_ENV = {"OPENBLAS_THREAD_TIMEOUT": "4", "OMP_WAIT_POLICY": "PASSIVE"}

if "--lib-defaults" not in sys.argv:
    for _k, _v in LIB_ENV.items():
        os.environ.setdefault(_k, _v)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
