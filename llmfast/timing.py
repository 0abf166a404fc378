"""Timing helpers for the benchmark scripts under scripts/ (never used by tests: timings do not go in tests)."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable


def timed(fn: Callable[[], Any], seconds: float, warmup: int = 3) -> float:
    """Median seconds per call over about `seconds` of calls (at least 5), after `warmup` calls not counted."""
    for _ in range(warmup):
        fn()
    samples = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(samples) < 5:
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def alternate(sides: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """Median over rounds of each side's measurement, the order reversed every other round (so a machine that
    slows down or warms up during a run weighs on every side alike)."""
    got: dict[str, list[float]] = {s: [] for s in sides}
    for r in range(rounds):
        for s in (list(sides) if r % 2 == 0 else list(reversed(sides))):
            got[s].append(sides[s]())
    return {s: statistics.median(v) for s, v in got.items()}
