"""Repeated runs of one scenario: the median row, each figure's min/median/max, and the noise they show.

A scenario's ``measure`` returns ``{"rows": [...], "failures": [...], ...}``; run ``R``
times, its rows come back in the same order (the same variants and sizes are walked
in the same loops), so repetition ``k``'s row ``i`` is the same measurement as the
others' row ``i``. :func:`combine` keeps, for every numeric figure, the median of the
repetitions in the row (so every report section reads medians unchanged) and
``[min, median, max]`` in the row's ``spread``; :func:`noise` turns a spread into the
relative run-to-run noise that ``bench compare`` uses to flag real changes.
"""

from __future__ import annotations

import statistics
from typing import Any

#: Fields that name a row rather than measure it: they must agree across repetitions.
IDENTITY = ("variant", "size", "phase", "mode", "name", "label", "kind", "backoff", "trigger", "case")


def _median_of(values: list[Any]) -> Any:
    nums = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    if len(nums) != len(values) or not nums:
        return values[0]
    m = statistics.median(nums)
    return int(m) if all(isinstance(v, int) for v in nums) and m == int(m) else m


def _merge(values: list[Any], path: str, spread: dict[str, list[float]]) -> Any:
    first = values[0]
    if isinstance(first, dict) and all(isinstance(v, dict) for v in values):
        keys = [k for k in first if all(k in v for v in values)]
        out = dict(first)
        for k in keys:
            out[k] = _merge([v[k] for v in values], f"{path}.{k}" if path else k, spread)
        return out
    if isinstance(first, int | float) and not isinstance(first, bool):
        nums = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
        if len(nums) == len(values):
            med = _median_of(values)
            if min(nums) != max(nums):
                spread[path] = [min(nums), med, max(nums)]
            return med
    return first


def same_measurement(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a.get(k) == b.get(k) for k in IDENTITY)


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One scenario result out of ``len(runs)`` repetitions (rows as medians, spreads, every failure)."""
    if len(runs) == 1:
        return runs[0]
    base = dict(runs[0])
    rows: list[dict[str, Any]] = []
    for i, row in enumerate(runs[0].get("rows", [])):
        same = [
            r["rows"][i] for r in runs if i < len(r.get("rows", [])) and same_measurement(r["rows"][i], row)
        ]
        spread: dict[str, list[float]] = {}
        merged = _merge(same, "", spread)
        merged["repeats"] = len(same)
        merged["spread"] = spread
        rows.append(merged)
    base["rows"] = rows
    base["failures"] = list(dict.fromkeys(f for r in runs for f in r.get("failures", [])))
    base["repeats"] = len(runs)
    return base


def noise(row: dict[str, Any], path: str) -> float | None:
    """(max - min) / median of one figure over the repetitions; 0 when they agreed; None without repeats."""
    if row.get("repeats", 1) < 2:
        return None
    lo_med_hi = row.get("spread", {}).get(path)
    if lo_med_hi is None:
        return 0.0
    lo, med, hi = lo_med_hi
    return (hi - lo) / abs(med) if med else None
