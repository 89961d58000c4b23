"""Repetitions and ``bench compare``: medians, spreads, measured noise, and changes flagged beyond it.

Pure functions on result documents shaped like the scenarios' (no servers): the
scenarios themselves run in test_bench.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from wsfan.bench.compare import compare, figures, load
from wsfan.bench.repeats import combine, noise


def _rows(us: float, rate: float, p99: float) -> dict:
    return {
        "rows": [
            {
                "variant": "wsfan",
                "size": 1000,
                "phase": "throughput",
                "server_us_per_delivery": us,
                "deliveries_per_s": rate,
                "latency": {"p99": p99, "histogram": {"lowest_us": 1}},
                "first_seq": 1,
                "count_ok": True,
            }
        ],
        "failures": [],
    }


def test_combine_keeps_the_median_and_each_figures_spread() -> None:
    data = combine([_rows(1.0, 100.0, 50.0), _rows(1.2, 90.0, 70.0), _rows(0.9, 110.0, 60.0)])
    (row,) = data["rows"]
    assert data["repeats"] == 3 and row["repeats"] == 3
    assert (
        row["server_us_per_delivery"] == 1.0
        and row["deliveries_per_s"] == 100.0
        and row["latency"]["p99"] == 60.0
    )
    assert row["spread"]["server_us_per_delivery"] == [0.9, 1.0, 1.2]
    assert row["spread"]["latency.p99"] == [50.0, 60.0, 70.0]
    assert abs(noise(row, "server_us_per_delivery") - 0.3) < 1e-9
    assert noise(row, "first_seq") == 0.0  # agreed across repetitions
    assert noise(_rows(1, 1, 1)["rows"][0], "server_us_per_delivery") is None  # one run: noise unknown


def test_combine_unions_failures_and_keeps_a_single_run_as_is() -> None:
    a, b = _rows(1, 1, 1), _rows(1, 1, 1)
    a["failures"], b["failures"] = ["x"], ["y", "x"]
    assert combine([a, b])["failures"] == ["x", "y"]
    assert combine([a]) is a


def test_figures_are_measurements_not_bookkeeping() -> None:
    paths = dict(figures(_rows(1.0, 2.0, 3.0)["rows"][0]))
    assert paths == {"server_us_per_delivery": 1.0, "deliveries_per_s": 2.0, "latency.p99": 3.0}


def _doc(data: dict) -> dict:
    return {"scenario": "fanout", "data": data}


def test_a_change_is_flagged_only_beyond_the_measured_noise() -> None:
    a = _doc(combine([_rows(1.0, 100.0, 50.0), _rows(1.2, 95.0, 52.0), _rows(0.9, 105.0, 51.0)]))
    same = _doc(combine([_rows(1.1, 101.0, 51.0), _rows(1.0, 99.0, 50.0), _rows(1.05, 100.0, 50.5)]))
    worse = _doc(combine([_rows(2.0, 50.0, 51.0), _rows(2.1, 49.0, 50.0), _rows(1.9, 51.0, 50.5)]))
    unchanged = {e["figure"]: e for e in compare({"fanout": a}, {"fanout": same}, 0.05, 0.10)}
    assert not any(e["changed"] for e in unchanged.values()), unchanged
    changed = {e["figure"]: e for e in compare({"fanout": a}, {"fanout": worse}, 0.05, 0.10)}
    assert changed["server_us_per_delivery"]["changed"] and changed["deliveries_per_s"]["changed"]
    assert changed["server_us_per_delivery"]["ratio"] == 2.0
    assert not changed["latency.p99"]["changed"]  # 50.5 vs 51: within noise
    assert changed["server_us_per_delivery"]["noise_measured"]


def test_without_repeats_the_assumed_noise_applies() -> None:
    a, b = _doc(_rows(1.0, 100.0, 50.0)), _doc(_rows(1.08, 100.0, 50.0))
    (e,) = [
        e
        for e in compare({"fanout": a}, {"fanout": b}, 0.05, 0.10)
        if e["figure"] == "server_us_per_delivery"
    ]
    assert not e["changed"] and not e["noise_measured"] and e["noise"] == 0.10
    (e,) = [
        e
        for e in compare({"fanout": a}, {"fanout": b}, 0.05, 0.05)
        if e["figure"] == "server_us_per_delivery"
    ]
    assert e["changed"]


def test_compare_command_exit_code(tmp_path: Path) -> None:
    for name, us in (("a", 1.0), ("b", 3.0), ("c", 1.0)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "machine.json").write_text("{}")
        (folder / "fanout.json").write_text(json.dumps(_doc(_rows(us, 100.0, 50.0))))
    assert set(load(tmp_path / "a")) == {"fanout"}

    def cmp(x: str, y: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "wsfan.bench", "compare", str(tmp_path / x), str(tmp_path / y)],
            capture_output=True,
            text=True,
            timeout=60,
        )

    changed = cmp("a", "b")
    assert changed.returncode == 1 and "CHANGED" in changed.stdout and "3.00×" in changed.stdout
    same = cmp("a", "c")
    assert same.returncode == 0 and "0 changed" in same.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cmp("a", "empty").returncode == 2
