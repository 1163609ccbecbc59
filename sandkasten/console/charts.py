"""The numbers behind the metrics page and the shapes that draw them (SVG coordinates), computed
from journal rows. Pure: no I/O, no clock (callers pass `now`)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

# exec latency buckets, upper bounds in milliseconds (the last one is open)
BUCKETS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000, 30_000, 60_000)


@dataclass(frozen=True)
class Bar:
    label: str
    count: int
    x: float
    y: float
    width: float
    height: float


@dataclass(frozen=True)
class Histogram:
    bars: list[Bar]
    total: int
    p50: float | None
    p90: float | None
    p99: float | None
    peak: int


def _label(ms: float) -> str:
    return f"{ms / 1000:g}s" if ms >= 1000 else f"{ms:g}ms"


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def histogram(durations_ms: Iterable[float], width: float = 600, height: float = 160) -> Histogram:
    values = sorted(v for v in durations_ms if v is not None)
    counts = [0] * (len(BUCKETS_MS) + 1)
    for v in values:
        counts[next((i for i, bound in enumerate(BUCKETS_MS) if v <= bound), len(BUCKETS_MS))] += 1
    labels = [_label(b) for b in BUCKETS_MS] + [f">{_label(BUCKETS_MS[-1])}"]   # each bar: up to its label
    peak = max(counts) if values else 0
    slot = width / len(counts)
    bars = []
    for i, (label, count) in enumerate(zip(labels, counts, strict=True)):
        h = 0.0 if peak == 0 else (height - 4) * count / peak
        bars.append(Bar(label, count, x=i * slot + 2, y=height - h, width=slot - 4, height=h))
    return Histogram(bars, len(values), percentile(values, 50), percentile(values, 90), percentile(values, 99),
                     peak)


@dataclass(frozen=True)
class Series:
    points: str          # SVG polyline points
    start: datetime
    end: datetime
    peak: int
    last: int


def live_over_time(spans: Iterable[tuple[datetime, datetime | None]], now: datetime,
                   window: timedelta = timedelta(hours=24), steps: int = 96,
                   width: float = 600, height: float = 160) -> Series:
    """How many sessions were alive at each of `steps + 1` moments over the last `window` (or
    since the first session began, if later). A span is (created, ended or None)."""
    spans = list(spans)
    first = min((created for created, _ in spans), default=now)
    start = max(now - window, first)
    if start >= now:
        start = now - timedelta(minutes=1)
    step = (now - start) / steps
    counts = []
    for i in range(steps + 1):
        t = start + step * i
        counts.append(sum(1 for created, ended in spans if created <= t and (ended is None or ended > t)))
    peak = max(counts)
    scale = (height - 4) / peak if peak else 0
    points = " ".join(f"{width * i / steps:.1f},{height - c * scale:.1f}" for i, c in enumerate(counts))
    return Series(points, start, now, peak, counts[-1])


@dataclass(frozen=True)
class Fill:
    image: str
    target: int
    idle: int
    width: float   # of the filled part, out of `full`
    full: float


def pool_fill(targets: dict[str, int], idle_images: Iterable[str], full: float = 300) -> list[Fill]:
    """Idle warm sandboxes per pooled image against the configured count."""
    idle: dict[str, int] = {}
    for image in idle_images:
        idle[image] = idle.get(image, 0) + 1
    out = []
    for image in sorted(set(targets) | set(idle)):
        target = targets.get(image, 0)
        have = idle.get(image, 0)
        share = 1.0 if target == 0 and have else (min(have, target) / target if target else 0.0)
        out.append(Fill(image, target, have, width=full * share, full=full))
    return out
