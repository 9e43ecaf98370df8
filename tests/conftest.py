"""Shared fixtures: every test that takes `simd` runs once per SIMD level the
CPU supports (scalar always), so each kernel path is compared to the reference."""

import os

import numpy as np
import pbcodec
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    max_examples=int(os.environ.get("PBCODEC_HYPOTHESIS_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("default")

LEVELS = pbcodec.available_simd_levels()


@pytest.fixture(params=LEVELS)
def simd(request):
    """Force one SIMD level for the test, restoring the previous one after."""
    before = pbcodec.simd_level()
    pbcodec.set_simd_level(request.param)
    yield request.param
    pbcodec.set_simd_level(before)


def sparse_int8(rng: np.random.Generator, shape, density: float, lo: int = -128, hi: int = 127) -> np.ndarray:
    """Random int8 array with roughly `density` nonzeros drawn from [lo, hi] \\ {0}."""
    vals = rng.integers(lo, hi + 1, size=shape)
    vals[vals == 0] = hi
    mask = rng.random(shape) < density
    return np.where(mask, vals, 0).astype(np.int8)
