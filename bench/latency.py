"""Latency distributions: exact percentiles from raw samples, and a fine histogram that keeps the whole shape.

Load generators write raw samples (seconds, float64) to ``.npy`` files; the
harness merges them here. Percentiles are computed exactly with numpy from the
raw samples; the JSON keeps a log-bucketed histogram (1 % relative bucket width,
1 µs to 100 s, like HdrHistogram with two significant digits) so the full
distribution survives in a few kilobytes and plots can be redrawn from the JSON
alone, without the raw files.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

PERCENTILES = (50.0, 90.0, 99.0, 99.9)
LOWEST_US = 1.0
GROWTH = 1.01  # each bucket is 1 % wider than the previous one
_LOG_GROWTH = math.log(GROWTH)
# Percentiles drawn on the latency curves ("nines" axis).
CURVE_POINTS = (0.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99, 100.0)


def load_samples(paths: Iterable[str | Path]) -> np.ndarray:
    """Concatenate the raw sample files of every load generator of one phase (seconds)."""
    arrays = [np.load(p) for p in paths if p and Path(p).exists()]
    arrays = [a for a in arrays if a.size]
    return np.concatenate(arrays) if arrays else np.empty(0)


def summarize(samples_s: np.ndarray) -> dict[str, Any]:
    """Exact percentiles (µs) plus the histogram; ``negative`` counts impossible samples (a clock bug)."""
    us = np.asarray(samples_s, dtype=np.float64) * 1e6
    n = int(us.size)
    if n == 0:
        return {"count": 0}
    negative = int(np.count_nonzero(us < 0))
    us = np.maximum(us, 0.0)
    pct = np.percentile(us, PERCENTILES, method="higher")
    out: dict[str, Any] = {
        "count": n,
        "unit": "us",
        "mean": float(us.mean()),
        "min": float(us.min()),
        "max": float(us.max()),
        "negative": negative,
    }
    for p, v in zip(PERCENTILES, pct, strict=True):
        out[_key(p)] = float(v)
    out["histogram"] = histogram(us)
    return out


def _key(p: float) -> str:
    return "p" + (f"{p:g}".replace(".", "_"))


def bucket_of(us: np.ndarray) -> np.ndarray:
    """Bucket index per value: 0 holds everything below 1 µs."""
    clipped = np.maximum(us, LOWEST_US)
    return np.floor(np.log(clipped / LOWEST_US) / _LOG_GROWTH).astype(np.int64)


def bucket_upper(index: int) -> float:
    return LOWEST_US * GROWTH ** (index + 1)


def histogram(us: np.ndarray) -> dict[str, Any]:
    """Sparse histogram: bucket indices and counts (bucket i covers [1.01^i, 1.01^(i+1)) µs)."""
    idx, counts = np.unique(bucket_of(us), return_counts=True)
    return {
        "lowest_us": LOWEST_US,
        "growth": GROWTH,
        "index": idx.tolist(),
        "count": counts.tolist(),
    }


def percentile_from_histogram(hist: dict[str, Any], p: float) -> float:
    """A percentile (µs) read back from a stored histogram: the upper edge of its bucket (≤ 1 % high)."""
    counts = np.asarray(hist["count"], dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        return math.nan
    rank = max(1, math.ceil(p / 100.0 * total))
    pos = int(np.searchsorted(np.cumsum(counts), rank))
    idx = int(hist["index"][min(pos, len(counts) - 1)])
    return hist["lowest_us"] * hist["growth"] ** (idx + 1)


def curve(hist: dict[str, Any], points: Sequence[float] = CURVE_POINTS) -> list[tuple[float, float]]:
    """(percentile, µs) pairs for a percentile plot, from the histogram alone."""
    return [(p, percentile_from_histogram(hist, p)) for p in points]


def monotonic(summary: dict[str, Any]) -> bool:
    """p50 ≤ p90 ≤ p99 ≤ p99.9 ≤ max: what every stored summary must satisfy."""
    if not summary.get("count"):
        return True
    values = [summary[_key(p)] for p in PERCENTILES] + [summary["max"]]
    return all(a <= b for a, b in zip(values, values[1:], strict=False))


def fmt_us(v: float | None) -> str:
    """Human units: µs below 1 ms, ms below 10 s."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if v < 1000:
        return f"{v:.0f} µs"
    if v < 10_000_000:
        return f"{v / 1000:.2f} ms" if v < 100_000 else f"{v / 1000:.0f} ms"
    return f"{v / 1e6:.1f} s"
