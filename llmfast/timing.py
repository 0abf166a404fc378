"""Timing helpers for the benchmark scripts under scripts/ (never used by tests: timings do not go in tests)."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Sequence, TypeVar

T = TypeVar("T")


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


def order(sides: Sequence[T], r: int) -> list[T]:
    """The sides' order in round `r`: reversed every other round (so a machine that slows down or warms up during a
    run weighs on every side alike)."""
    return list(sides) if r % 2 == 0 else list(reversed(sides))


def rounds(sides: dict[str, Callable[[], Any]], n: int) -> tuple[dict[str, list[Any]], list[str]]:
    """Each side's measurements (what a call returns: seconds, or a dict of phases) over `n` rounds taken in `order`,
    and the order they were taken in."""
    got: dict[str, list[Any]] = {s: [] for s in sides}
    taken: list[str] = []
    for r in range(n):
        for s in order(list(sides), r):
            got[s].append(sides[s]())
            taken.append(s)
    return got, taken
