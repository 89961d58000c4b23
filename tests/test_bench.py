"""The benchmark suite in smoke size: every scenario runs, writes its files, and its numbers add up.

One smoke run of the whole suite (``python -m wsfan.bench all --smoke``: ``--quick`` with the fewest
clients, rooms and seconds that still go through every scenario's code path, variant, phase and
table) into a temporary folder, shared by the tests below; each test checks one property of what it
wrote. ``make bench-quick`` is the larger CI size, for figures worth a glance.
The figures themselves are not judged (a CI machine is noisy); their internal
consistency is: deliveries = publishes × subscribers with no seq gap, percentiles
in order, fractions between 0 and 1, every plot a real PNG. Bun is left out here
(``--bun off``) to keep the run short and offline; ``test_bun_baseline_speaks_the_protocol``
covers it where a full run installed it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ("fanout", "echo", "heartbeat", "storm", "connect", "cluster", "compression", "rooms")
PLOTS = (
    "fanout_cpu.png",
    "fanout_latency.png",
    "echo_latency.png",
    "heartbeat_cpu.png",
    "storm_recovery.png",
)
PERCENTILES = ("p50", "p90", "p99", "p99_9", "max")
BUDGET_S = 60.0


def _bench(*args: str, timeout: float, grace: float = 30.0) -> subprocess.CompletedProcess[str]:
    """``python -m wsfan.bench *args``; past ``timeout`` it is stopped with everything it started.

    On timeout: SIGTERM (the CLI unwinds and each scenario stops its servers and load generators),
    ``grace`` seconds, then SIGKILL to its process group (its children die with it:
    ``harness.spawn``), and ``subprocess.TimeoutExpired`` is raised. ``subprocess.run(timeout=)``
    killed the CLI alone, and its servers, workers and load generators outlived the test.
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "wsfan.bench", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # not reaped yet: the group id is still its own
            proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench-quick")
    started = time.monotonic()
    proc = _bench("all", "--smoke", "--bun", "off", "--out", str(out), timeout=240)
    seconds = time.monotonic() - started
    docs = {n: json.loads((out / f"{n}.json").read_text()) for n in SCENARIOS if (out / f"{n}.json").exists()}
    return {"out": out, "proc": proc, "seconds": seconds, "docs": docs}


def _rows(run: dict[str, Any], name: str) -> list[dict[str, Any]]:
    doc = run["docs"][name]["data"]
    return doc.get("rows") or doc.get("results") or []


@pytest.mark.timeout(250)
def test_quick_run_passes_its_own_checks(run):
    proc = run["proc"]
    assert proc.returncode == 0, f"bench all --smoke failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    # Its duration is reported, not asserted: timing belongs to the benchmarks, and a loaded CI
    # machine must not turn a slow run into a red build (the subprocess timeout still bounds it).
    print(f"bench all --smoke took {run['seconds']:.0f} s (aim: under {BUDGET_S:.0f} s)")
    # every step is announced with a counter and a time estimate
    steps = [line for line in proc.stdout.splitlines() if line.startswith("[") and line.endswith(" left")]
    assert (
        steps
        and steps[0].startswith("[1/")
        and steps[-1].startswith("[" + steps[0].split("/")[1].split("]")[0] + "/")
    ), steps


def test_compression_saves_bytes_on_the_wire_and_counts_every_delivery(run):
    rows = {(r["variant"], r["phase"]): r for r in _rows(run, "compression")}
    plain, deflate = rows[("wsfan", "throughput")], rows[("wsfan-deflate", "throughput")]
    assert plain["count_ok"] and deflate["count_ok"]
    assert deflate["wire_bytes_per_delivery"] < 0.8 * plain["wire_bytes_per_delivery"], (plain, deflate)


def test_every_scenario_wrote_its_json_report_and_plots(run):
    out = run["out"]
    assert set(run["docs"]) == set(SCENARIOS)
    machine = json.loads((out / "machine.json").read_text())
    assert machine["cpu_model"] and machine["logical_cpus"] and machine["versions"]["picows"]
    for name, doc in run["docs"].items():
        assert doc["quick"] is True and doc["loadavg_before"] and doc["settings"], name
        assert not doc["data"]["errors"], f"{name}: {doc['data']['errors']}"
        assert not doc["data"]["failures"], f"{name}: {doc['data']['failures']}"
    for png in PLOTS:
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, png
    report = (out / "report.md").read_text()
    for heading in (
        "## Headline",
        "## Fan-out",
        "## Echo",
        "## Heartbeat",
        "## Reconnection storm",
        "## Reconnection storm cost",
        "## Rooms that come and go",
    ):
        assert heading in report
    if _rows(run, "cluster"):
        assert "## Cluster" in report and "Redis overhead, cluster ÷ single node" in report
    assert "naive picows" in report and "websockets lib" in report


def test_fanout_deliveries_are_publishes_times_subscribers_without_gaps(run):
    rows = _rows(run, "fanout")
    variants = {r["variant"] for r in rows}
    assert {"wsfan", "wsfan-cork1", "wsfan-afn", "naive", "websockets"} <= variants
    for r in rows:
        tag = f"{r['variant']} {r['size']} {r['phase']}"
        assert r["publishes"] > 0, tag
        assert r["deliveries"] == r["expected_deliveries"] == r["publishes"] * r["size"], tag
        assert r["gaps"] == 0 and r["errors"] == 0 and r["disconnected"] == 0, tag
        assert r["seq_range"][1] - r["seq_range"][0] + 1 == r["publishes"], tag
        assert r["server_us_per_delivery"] > 0 and r["deliveries_per_s"] > 0, tag
        assert r["interval"]["bottleneck"], tag


def _assert_latency(lat: dict[str, Any], count: int, tag: str) -> None:
    assert lat["count"] == count, tag
    values = [lat[p] for p in PERCENTILES]
    assert values == sorted(values) and lat["min"] <= values[0], f"{tag}: {values}"
    assert lat["negative"] == 0, tag
    hist = lat["histogram"]
    assert sum(hist["count"]) == count and hist["index"] == sorted(hist["index"]), tag


def test_latency_percentiles_are_monotonic_and_histograms_hold_every_sample(run):
    latency_rows = [r for r in _rows(run, "fanout") if r["phase"] == "latency"]
    assert latency_rows and _rows(run, "echo"), "no latency rows to check"
    for r in latency_rows:
        _assert_latency(r["latency"], r["deliveries"], f"fanout {r['variant']} {r['size']}")
    for r in _rows(run, "echo"):
        assert r["received"] == r["sent"] > 0
        _assert_latency(r["latency"], r["received"], f"echo {r['variant']} {r['load']}")


def test_heartbeat_pings_only_when_on_and_every_connection_survives(run):
    rows = _rows(run, "heartbeat")
    assert {r["variant"] for r in rows} == {"wsfan", "websockets"}
    assert {r["heartbeat_ms"] > 0 for r in rows} == {True, False}, "both heartbeat on and off were measured"
    for r in rows:
        tag = f"{r['variant']} {r['heartbeat_ms']}"
        assert r["open_at_end"] == r["connections"], tag
        assert (r["pings"] > 0) == (r["heartbeat_ms"] > 0), tag
        assert 0 <= r["server_cpu_pct"] <= 105, tag
        assert 0 < r["bytes_per_connection"] < 1_000_000, tag


def test_storm_fractions_times_and_message_accounting_add_up(run):
    results = _rows(run, "storm")
    assert {r["event"] for r in results} == {"restart", "drop", "reload-abrupt", "reload-spread"}
    for r in results:
        c, m = r["crowd"], r["messages"]
        tag = f"{r['event']} jitter={r['jitter']} admission={r['admission']}"
        assert c["fraction_back"] == 1.0, f"{tag}: stragglers {c.get('stragglers')}"
        times = [c["t50_s"], c["t90_s"], c["t99_s"], c["t100_s"]]
        assert None not in times and times == sorted(times) and times[0] >= 0, tag
        assert c["back_offsets_s"] == sorted(c["back_offsets_s"]) and len(c["back_offsets_s"]) == c["back"], (
            tag
        )
        assert m["delivered"] + m["lost"] == m["expected_deliveries"], tag
        assert 0 <= m["recovered"] <= m["published_while_away"] and m["duplicates"] == 0, tag
        if r["admission"]:
            assert c["rejected_503"] > 0, f"{tag}: admission control never refused anyone"
    drop = next(r for r in results if r["event"] == "drop")
    assert drop["messages"]["lost"] == 0, "a drop keeps history: everything missed is recovered"
    # SIGHUP handover behind Redis: history survives, and the spread one returns over its window.
    abrupt, spread = (next(r for r in results if r["event"] == e) for e in ("reload-abrupt", "reload-spread"))
    assert abrupt["messages"]["lost"] == spread["messages"]["lost"] == 0
    assert abrupt["server_cpu_s"] > 0 and spread["server_cpu_s"] > 0

    def span(r: dict) -> float:
        return r["crowd"]["back_offsets_s"][-1] - r["crowd"]["back_offsets_s"][0]

    assert (
        span(spread) > span(abrupt)
        and span(spread) >= 0.5 * run["docs"]["storm"]["settings"]["reload_spread"]
    )


def test_connect_storm_rejoins_every_client_and_reports_cpu_time_and_memory(run):
    """Both waves of each crowd (one process, and --workers 2 behind Redis): every client rejoined, figures add up."""
    rows = _rows(run, "connect")
    waves = {(r["variant"], r["phase"]) for r in rows}
    assert {
        ("wsfan", "connect"),
        ("wsfan", "reconnect"),
        ("wsfan-w2", "connect"),
        ("wsfan-w2", "reconnect"),
    } <= waves
    for r in rows:
        tag = f"connect {r['variant']} {r['size']} {r['phase']}"
        assert r["rejoined"] == r["size"] and r["errors"] == 0 and r["attempts"] >= r["size"], tag
        assert 0 < r["t50_s"] <= r["t99_s"] <= r["t100_s"], tag
        assert r["connects_per_s"] == pytest.approx(r["size"] / r["t100_s"]), tag
        # CPU comes in 10 ms ticks: a quick crowd may cost less than one, so only the sum must be positive.
        assert r["server_us_per_connect"] >= 0 and r["rss_after"] > 0 and r["rss_before"] > 0, tag
        assert r["kb_per_connection"] == pytest.approx(
            (r["rss_after"] - r["rss_before"]) / r["size"] / 1024
        ), tag
        assert r["workers"] == (2 if r["variant"].endswith("-w2") else 1), tag
    assert all(r["quiet_wait_s"] is not None for r in rows if r["phase"] == "reconnect")
    assert sum(r["server_us_per_connect"] for r in rows if r["variant"].startswith("wsfan")) > 0


@pytest.mark.timeout(120)
def test_connect_storm_runs_a_baseline_commit_beside_todays_server(tmp_path):
    """--baseline REF: wsfan exported from that commit (git archive) runs in the same run; the report divides by it."""
    proc = _bench(
        "connect",
        "--quick",
        "--variants",
        "wsfan",
        "--sizes",
        "50",
        "--workers-sizes",
        "",
        "--baseline",
        "HEAD",
        "--bun",
        "off",
        "--out",
        str(tmp_path),
        timeout=110,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = json.loads((tmp_path / "connect.json").read_text())
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    variants = {r["variant"] for r in doc["data"]["rows"]}
    assert variants == {"wsfan", f"wsfan@{head[:7]}"}
    assert doc["data"]["baseline"] == f"wsfan at commit {head}"
    assert all(r["rejoined"] == 50 for r in doc["data"]["rows"])
    report = (tmp_path / "report.md").read_text()
    assert f"÷ wsfan@{head[:7]} (same run)" in report and f"wsfan@{head[:7]} " in report
    lines = [line for line in report.splitlines() if line.startswith("| 50 |")]
    assert len(lines) == 4, lines
    # Which side fills its core first, where both CPU figures are known (a 50-client wave can cost
    # under one 10 ms tick: then the cell says "—").
    for r, line in zip(doc["data"]["rows"], lines, strict=True):
        measured = r["server_us_per_connect"] and r["loadgen_us_per_connect"]
        assert (" first |" in line) == bool(measured), (r, line)


@pytest.mark.timeout(120)
def test_connect_storm_runs_the_naive_picows_floor_by_default(tmp_path):
    """Without --variants the crowd also meets the naive picows server (the floor of picows on uvloop),
    which joins the same way, and every wsfan row is divided by it in the report."""
    proc = _bench(
        "connect", "--quick", "--sizes", "50", "--workers-sizes", "", "--bun", "off", "--out", str(tmp_path),
        timeout=110,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = json.loads((tmp_path / "connect.json").read_text())
    assert {r["variant"] for r in doc["data"]["rows"]} == {"wsfan", "naive"}
    assert all(r["rejoined"] == 50 and r["errors"] == 0 for r in doc["data"]["rows"])
    report = (tmp_path / "report.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| clients |"))
    column = [c.strip() for c in header.split("|")].index(
        "÷ naive picows: the floor of picows on uvloop (same run)"
    )
    rows = [[c.strip() for c in line.split("|")] for line in report.splitlines() if line.startswith("| 50 |")]
    ours = [r for r in rows if r[3] == "wsfan"]
    assert len(ours) == 2 and all(r[column].startswith("CPU ") for r in ours), ours


def test_baseline_tree_imports_the_old_commit_not_the_editable_install(tmp_path, monkeypatch):
    from wsfan.bench.baselines import commit

    monkeypatch.setattr(commit, "CACHE", tmp_path)
    folder, sha = commit.tree("HEAD")
    assert len(sha) == 40 and (tmp_path / sha / "complete").read_text().strip() == sha
    assert commit.tree("HEAD") == (folder, sha)  # exported once, then reused
    where = subprocess.run(
        [
            sys.executable,
            "-c",
            "import wsfan.server.app as a, wsfan.client as c; print(a.__file__); print(c.__file__)",
        ],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert where.returncode == 0, where.stderr
    assert all(line.startswith(str(folder)) for line in where.stdout.split()), where.stdout
    with pytest.raises(commit.BaselineError):
        commit.tree("no-such-ref-anywhere")


def test_cluster_counts_every_delivery_across_two_nodes_and_splits_cpu_per_process(run):
    """Publisher on node A, the room split over A and B through one redis-server, against one node."""
    rows = _rows(run, "cluster")
    if not rows:
        pytest.skip(run["docs"]["cluster"]["data"].get("skipped") or "cluster scenario wrote no rows")
    assert {r["variant"] for r in rows} == {"single", "cluster", "shards"}
    for r in rows:
        tag = f"cluster {r['variant']} {r['size']} {r['phase']}"
        assert r["count_ok"] and r["gaps"] == 0 and r["errors"] == 0, tag
        assert r["deliveries"] == r["publishes"] * r["size"] > 0, tag
        expected = {
            "single": {"A"},
            "cluster": {"A", "B", "redis"},
            "shards": {"A", "B", "redis-1", "redis-2", "redis-3"},  # 3-master Redis Cluster
        }[r["variant"]]
        assert set(r["processes"]) == expected, tag
        nodes = (p for n, p in r["processes"].items() if not n.startswith("redis"))
        assert sum(p["deliveries"] for p in nodes) == r["deliveries"], tag
        assert all(code == 0 for code in r["exit_codes"].values()), f"{tag}: {r['exit_codes']}"
        if r["phase"] == "latency":
            _assert_latency(r["latency"], r["deliveries"], tag)


@pytest.mark.timeout(90)
def test_bun_baseline_speaks_the_protocol(tmp_path):
    """The Bun server under the same load generators (fan-out counts checked), where Bun is installed."""
    from wsfan.bench.baselines.bun import find_bun

    if find_bun() is None:
        pytest.skip("Bun not installed (a full `make bench` installs it with npm into ~/.cache/wsfan/bun)")
    proc = _bench(
        "fanout",
        "--quick",
        "--variants",
        "bun",
        "--sizes",
        "10",
        "--bun",
        "auto",
        "--out",
        str(tmp_path),
        timeout=80,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads((tmp_path / "fanout.json").read_text())["data"]["rows"]
    assert rows and all(r["variant"] == "bun" and r["count_ok"] for r in rows)


# ---------------------------------------------------------------- where runs write


def _tracked_results_state() -> str:
    done = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all", "--ignored=no", "results"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    if done.returncode != 0:
        pytest.skip("not a git checkout")
    return done.stdout


def test_only_a_published_run_writes_into_the_committed_results(tmp_path):
    from wsfan.bench.results import LOCAL_RESULTS, QUICK_RESULTS, RESULTS, results_dir

    assert results_dir(quick=True, publish=False) == QUICK_RESULTS == RESULTS / "tmp"
    assert results_dir(quick=False, publish=False) == LOCAL_RESULTS == RESULTS / "local"
    assert results_dir(quick=False, publish=True) == RESULTS
    with pytest.raises(ValueError):
        results_dir(quick=True, publish=True)
    paths = ["results/tmp/x.json", "results/local/x.json", "results/local/micro/x.json"]
    ignored = subprocess.run(
        ["git", "check-ignore", *paths], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert ignored.stdout.split() == paths, "results/tmp/ and results/local/ must be git-ignored"


def test_quick_core_run_leaves_the_committed_results_alone():
    before = _tracked_results_state()
    latest = (ROOT / "results" / "core-latest.md").read_bytes()
    proc = _bench("core", "--quick", "--only", "memory", timeout=90)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "results/tmp/core-latest.md" in proc.stdout
    assert (ROOT / "results" / "core-latest.md").read_bytes() == latest
    assert _tracked_results_state() == before


def test_quick_runs_refuse_to_publish():
    for args in (("core", "--quick", "--publish"), ("all", "--quick", "--publish", "--only", "connect")):
        proc = _bench(*args, timeout=30)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr and "--publish needs a full run" in proc.stderr


def test_rooms_memory_comes_back_and_churn_announces_every_join_and_leave(run):
    data, s = run["docs"]["rooms"]["data"], run["docs"]["rooms"]["settings"]
    m = data["memory"]
    assert m["rooms"] == s["rooms"] and m["errors"] == 0
    # issue 14: back within 10 % of the server before any room (cold), not of a warmed-up one
    assert m["rss_peak"] > m["rss_cold"] and m["within_10pct_of_cold"] and m["after_over_cold"] <= 1.10, m
    off, on = data["churn"]
    assert (off["presence"], on["presence"]) == (False, True)
    assert off["events"] == 0 and on["events"] == 2 * on["joins"] * s["churn_listeners"]
    assert data["ratios"]["cpu_per_join_on_over_off"] > 0 and data["ratios"]["joins_per_s_on_over_off"] > 0


def test_core_summary_has_one_cell_per_column_however_many_runs():
    """core --repeat 15: each cell holds the median and the range once, not fifteen copies."""
    from wsfan.bench.scenarios.core_report import summarize

    def run(i: int) -> dict[str, Any]:
        return {
            "variant": "wsfan",
            "server_us_per_delivery": 1.5 + i / 100,
            "loadgen_us_per_delivery": 2.0,
            "deliveries_per_s": 400_000.0,
            "deliveries_per_write": 3.0,
            "count_ok": True,
            "deliveries": 1000 + i,
            "expected_deliveries": 1000 + i,
            "gaps": 0,
            "server_exit_code": 0,
            "interval": {
                "server_util": 0.6 + i / 100,
                "loadgen_util": 1.0,
                "other_load_server_core": 0.04,
                "other_load_client_core": 0.0,
                "bottleneck": "load generator" if i < 12 else "server",
                "server_user_s": 1.0,
                "server_cpu_s": 3.0,
            },
        }

    _, rows = summarize({"fanout": [run(i) for i in range(15)]}, 1000, ("wsfan",))
    (row,) = rows
    assert row[1].startswith("1.57 µs (median of 15 runs, 1.50–1.64)")
    assert row[3] == "67% (+4%) [60%–74%]" and row[4] == "100% (+0%)"
    assert row[5] == "load generator (12 of 15 runs); server (3 of 15 runs)"
    assert "15,105/15,105 over 15 runs" in row[6]
    _, (one,) = summarize({"fanout": [run(0)]}, 1000, ("wsfan",))
    assert one[3] == "60% (+4%)" and one[5] == "load generator" and "1,000/1,000 (" in one[6]


def test_the_time_left_follows_the_steps_actually_taken() -> None:
    """bench all --quick said 'about 0 min left' at 1.3 min of 2.8 (shared machine): the estimates
    (10 s a step here) are scaled by how long the finished steps took (20 s each), and a time under
    1.5 min is in seconds, never '0 min' while steps remain."""
    from wsfan.bench.scenarios.everything import TimeLeft

    now = [0.0]
    eta = TimeLeft([10.0] * 6, clock=lambda: now[0])
    eta.next_step()
    assert eta.left() == 60.0 and eta.text() == "0.0 min elapsed, about 60 s left"
    for _ in range(3):
        now[0] += 20.0
        eta.next_step()
    assert eta.left() == 60.0  # 3 steps left of 10 s each, taking twice as long
    assert eta.text() == "1.0 min elapsed, about 60 s left"
    now[0] += 20.0
    eta.next_step()
    now[0] += 20.0
    eta.next_step()  # the last step starts
    assert eta.text().endswith("about 20 s left")
    slow = TimeLeft([1.0] * 10, clock=lambda: now[0])
    slow.next_step()
    now[0] += 600.0
    slow.next_step()
    assert "about 1.5 min left" not in slow.text() and slow.text().endswith("min left")  # scale capped at 10
    fast = TimeLeft([30.0, 30.0], clock=lambda: 0.0)
    fast.next_step()
    fast.next_step()
    assert fast.text().endswith("about 10 s left")  # never 0 while a step remains
