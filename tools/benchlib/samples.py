"""Timing samples and their summary (min / median / p99), in milliseconds.

Who runs this: the bench process only. Clocks are `time.perf_counter()`; a sample is one
complete operation measured from the outside, warm-up runs are thrown away.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Summary:
    n: int
    min: float
    median: float
    p99: float
    mean: float
    max: float

    @classmethod
    def of(cls, values: list[float]) -> Summary:
        if not values:
            raise ValueError("no samples")
        s = sorted(values)
        p99 = s[min(len(s) - 1, max(0, round(0.99 * (len(s) - 1))))]
        return cls(len(s), s[0], statistics.median(s), p99, statistics.fmean(s), s[-1])

    def to_json(self) -> dict:
        return asdict(self)


def time_ms(op: Callable[[], object], n: int, warmup: int = 3) -> Summary:
    """Run `op` warmup + n times; the summary of the last n, in ms."""
    for _ in range(warmup):
        op()
    values = []
    for _ in range(n):
        t0 = time.perf_counter()
        op()
        values.append((time.perf_counter() - t0) * 1000)
    return Summary.of(values)
