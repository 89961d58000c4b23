"""Microsecond latency histograms (HDR) beside Locust's millisecond stats.

Why: Locust rounds every response time below 100 ms to a whole millisecond, and
wsfan answers in 0.06-1 ms, so Locust's median and p95 of ``delivery`` or
``echo`` collapse onto 0 or 1. Every timed measurement is therefore also
recorded here, in **microseconds**, into one ``HdrHistogram`` per name (1 µs to
1 hour at 3 significant digits: every value within 0.1 %).

Distributed runs: each worker sends what it recorded since its last report
(HDR's compressed encoding) with Locust's own worker report; the master adds it
to its histograms, so the master's counts are the sum of the workers'.

Outputs (master or local runner), in the run's results directory:

- ``hdr.json`` and ``hdr.csv``: per name count, min, mean, p50, p90, p99, p99.9, max (µs);
- ``hdr/<name>.hgrm``: HDR's percentile spectrum (values in ms), for HdrHistogram plotters;
- a web-UI tab "Latency (µs)" with the same table, refreshed with Locust's stats.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from typing import Any

from hdrh.histogram import HdrHistogram

#: Range and precision of every histogram: 1 µs .. 1 hour, 3 significant digits.
LOWEST_US = 1
HIGHEST_US = 3_600_000_000
SIGNIFICANT_DIGITS = 3
PERCENTILES = (50.0, 90.0, 99.0, 99.9)
COLUMNS = ("name", "count", "min_us", "mean_us", "p50_us", "p90_us", "p99_us", "p99.9_us", "max_us")


def _new() -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS)


class Latencies:
    """One HDR histogram per measurement name, plus the not-yet-reported delta for a worker."""

    def __init__(self) -> None:
        self.histograms: dict[str, HdrHistogram] = {}
        self._unsent: dict[str, HdrHistogram] = {}

    def record(self, name: str, milliseconds: float) -> None:
        """Record one value given in ms (Locust's unit), kept in µs; values under 1 µs count as 1 µs."""
        us = min(HIGHEST_US, max(LOWEST_US, round(milliseconds * 1000.0)))
        for table in (self.histograms, self._unsent):
            h = table.get(name)
            if h is None:
                h = table[name] = _new()
            h.record_value(us)

    def drain(self) -> dict[str, str]:
        """What was recorded since the last call, encoded (HDR's compressed base64) for the master."""
        out = {name: h.encode().decode("ascii") for name, h in self._unsent.items() if h.get_total_count()}
        self._unsent = {}
        return out

    def merge(self, encoded: dict[str, str]) -> None:
        """Add a worker's delta (from :meth:`drain`) into these histograms."""
        for name, blob in encoded.items():
            h = self.histograms.get(name)
            if h is None:
                h = self.histograms[name] = _new()
            h.decode_and_add(blob)

    def reset(self) -> None:
        """Forget everything (new test run, or the web UI's reset button)."""
        self.histograms.clear()
        self._unsent.clear()

    def count(self, name: str) -> int:
        h = self.histograms.get(name)
        return h.get_total_count() if h is not None else 0

    def percentile_ms(self, name: str, percentile: float) -> float | None:
        """The value at ``percentile`` (0-100) in ms, or None when nothing was recorded under ``name``."""
        h = self.histograms.get(name)
        if h is None or not h.get_total_count():
            return None
        return h.get_value_at_percentile(percentile) / 1000.0

    def rows(self) -> list[dict[str, Any]]:
        """One row per name, sorted by name, every figure in µs."""
        out = []
        for name in sorted(self.histograms):
            h = self.histograms[name]
            n = h.get_total_count()
            if not n:
                continue
            row: dict[str, Any] = {
                "name": name,
                "count": n,
                "min_us": h.get_min_value(),
                "mean_us": round(h.get_mean_value(), 1),
            }
            for p in PERCENTILES:
                row[f"p{p:g}_us"] = h.get_value_at_percentile(p)
            row["max_us"] = h.get_max_value()
            out.append(row)
        return out

    def write(self, prefix: str) -> None:
        """``<prefix>hdr.json``, ``<prefix>hdr.csv`` and ``<prefix>hdr/<name>.hgrm``.

        ``prefix`` is a directory with its trailing slash, or a ``--csv`` prefix plus ``_``.
        """
        rows = self.rows()
        with open(f"{prefix}hdr.json", "w") as fh:
            json.dump({"unit": "us", "rows": rows}, fh, indent=2)
        with open(f"{prefix}hdr.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows(rows)
        spectra = f"{prefix}hdr"
        os.makedirs(spectra, exist_ok=True)
        for name, h in self.histograms.items():
            if not h.get_total_count():
                continue
            buf = io.BytesIO()
            h.output_percentile_distribution(buf, 1000.0)  # µs -> ms in the spectrum
            with open(os.path.join(spectra, f"{_file_name(name)}.hgrm"), "wb") as fh:
                fh.write(buf.getvalue())


def _file_name(name: str) -> str:
    """A measurement name as a file name (``storm1:reconnect`` -> ``storm1_reconnect``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "unnamed"


LATENCIES = Latencies()
