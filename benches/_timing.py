"""Timing and table helpers shared by the benchmarks in this folder.

`measure` runs several candidates *interleaved* (round robin, one sample of
each per round) and reports medians: on a shared, noisy machine drift then
hits every candidate alike, so ratios taken from one `measure` call are
side-by-side comparisons. A sample times `inner` back-to-back calls, with
`inner` calibrated so one sample lasts about `sample_s` (timer resolution and
the loop's own overhead become negligible); out-of-cache work uses inner=1.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass
class Stat:
    """Per-call seconds over all samples of one candidate."""

    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> float:
        """Interquartile range over the median: a noise indicator (0.05 = 5%)."""
        s = sorted(self.samples)
        if len(s) < 4:
            return (s[-1] - s[0]) / self.median
        q = statistics.quantiles(s, n=4)
        return (q[2] - q[0]) / self.median


def _time_calls(fn: Callable[[], object], inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return time.perf_counter() - t0


def _calibrate(fn: Callable[[], object], sample_s: float) -> int:
    """Calls per sample so that one sample lasts at least `sample_s`."""
    inner = 1
    while True:
        t = _time_calls(fn, inner)
        if t >= sample_s or inner >= 1 << 22:
            return inner
        # Aim a bit past the target from the measured rate, at most x16 per step.
        inner = min(inner * 16, max(inner + 1, int(inner * 1.2 * sample_s / max(t, 1e-9))))


def measure(
    fns: dict[str, Callable[[], object]],
    *,
    repeats: int | None = None,
    budget_s: float = 0.2,
    sample_s: float = 2e-3,
    min_repeats: int = 5,
    max_repeats: int = 400,
    calibrate: bool = True,
    warmup: bool = True,
) -> dict[str, Stat]:
    """Time every candidate, interleaved; return per-call `Stat`s.

    calibrate=True (in-cache work): each candidate gets its own `inner`, and
    `repeats` (if not given) is chosen so each candidate runs about `budget_s`.
    calibrate=False (out-of-cache work): one call per sample, `repeats` samples.
    With warmup=True every candidate is first called once, untimed (code paths,
    first-touch page faults of memory the allocator has not handed out before);
    pass False when the caller has just called them all anyway.
    """
    names = list(fns)
    if warmup:
        for name in names:
            fns[name]()
    inner = {name: (_calibrate(fns[name], sample_s) if calibrate else 1) for name in names}
    if repeats is None:
        if calibrate:
            per_sample = max(_time_calls(fns[n], inner[n]) for n in names)
            repeats = int(budget_s / max(per_sample, 1e-9))
        else:
            repeats = min_repeats
        repeats = max(min_repeats, min(max_repeats, repeats))
    samples: dict[str, list[float]] = {name: [] for name in names}
    gc_was_on = gc.isenabled()
    gc.disable()  # a collection inside a sample would be charged to whoever ran
    try:
        for _ in range(repeats):
            for name in names:
                k = inner[name]
                samples[name].append(_time_calls(fns[name], k) / k)
    finally:
        if gc_was_on:
            gc.enable()
    return {name: Stat(s) for name, s in samples.items()}


def fmt_time(s: float) -> str:
    if s < 1e-6:
        return f"{s * 1e9:.0f} ns"
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1.0:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.3f} s"


def fmt_ratio(r: float) -> str:
    return f"{r:.2f}x" if r < 100 else f"{r:.0f}x"


def fmt_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            v = n / size
            return f"{v:.0f} {unit}" if abs(v - round(v)) < 0.005 else f"{v:.2f} {unit}"
    return f"{n} B"


def print_table(
    title: str, header: Sequence[str], rows: Sequence[Sequence[str]], notes: Sequence[str] = (), left: int = 1
) -> None:
    """Plain-text table: the first `left` columns left-aligned, the rest right-aligned."""
    cols = [list(map(str, header))] + [list(map(str, r)) for r in rows]
    widths = [max(len(r[i]) for r in cols) for i in range(len(header))]

    def line(r: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=False))
        )

    print()
    print(title)
    print("=" * len(title))
    print(line(cols[0]))
    print("  ".join("-" * w for w in widths))
    for r in cols[1:]:
        print(line(r))
    for n in notes:
        print(f"  {n}")
    print(flush=True)
