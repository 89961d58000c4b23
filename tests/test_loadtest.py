"""The Locust load generator (loadtest/) against real server processes.

Every Locust run is a subprocess (``python -m locust --headless``): Locust
monkey-patches the whole process with gevent on import, which must not happen
inside pytest. Each run writes ``--csv``, and loadtest's report module adds
``<prefix>_summary.json`` with every stats row, the error table and counters;
the assertions read that file. Runs are a few seconds with a handful of
users, all traffic is on 127.0.0.1, and every wait has a timeout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from helpers.ports import free_port
from helpers.servers import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
SCEN = ROOT / "loadtest" / "scenarios"


class Run:
    """Result of one headless Locust run: exit code, output and the summary rows by name."""

    def __init__(self, rc: int, output: str, summary: dict[str, Any]) -> None:
        self.rc = rc
        self.output = output
        self.summary = summary
        self.rows = {e["name"]: e for e in summary.get("entries", [])}

    def count(self, name: str) -> int:
        return int(self.rows.get(name, {}).get("count", 0))

    def failures(self, name: str | None = None) -> int:
        if name is None:
            return int(self.summary["totals"]["failures"])
        return int(self.rows.get(name, {}).get("failures", 0))

    def explain(self) -> str:
        rows = {n: (e["count"], e["failures"]) for n, e in self.rows.items()}
        return f"rc={self.rc} rows={rows} errors={self.summary.get('errors')}\n{self.output[-2500:]}"


def locust(tmp: Path, scenario: str, host: str, *args: str, timeout: float = 60, tag: str = "run") -> Run:
    """One headless run writing CSV + summary under ``tmp``; bounded by ``timeout``."""
    prefix = tmp / tag
    cmd = [PY, "-m", "locust", "-f", str(SCEN / f"{scenario}.py"), "--headless", "--host", host,
           "--csv", str(prefix), "--loglevel", "INFO", *args]  # fmt: skip
    done = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    path = Path(f"{prefix}_summary.json")
    summary = json.loads(path.read_text()) if path.exists() else {"entries": [], "totals": {"failures": -1}}
    return Run(done.returncode, done.stdout + done.stderr, summary)


def side_by_side(*runs: Callable[[], Run]) -> list[Run]:
    """Independent Locust runs at the same time (each a subprocess that mostly waits), results in order."""
    with ThreadPoolExecutor(len(runs)) as pool:
        return [f.result() for f in [pool.submit(r) for r in runs]]


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    """A default server, with fast heartbeats so that the idle scenario sees pings within seconds."""
    s = ServerProcess("--heartbeat", "400", "--heartbeat-timeout", "3000", "--echo-endpoint").start()
    yield s
    s.kill()


def _assert_clean(run: Run, *names: str) -> None:
    assert run.rc == 0, run.explain()
    assert run.failures() == 0, run.explain()
    for name in names:
        assert run.count(name) > 0, f"no {name!r} row\n{run.explain()}"


# ------------------------------------------------------------------ scenarios


@pytest.mark.parametrize("variant", ["json", "msgpack", "no-ack"])
def test_chat_scenario(server: ServerProcess, tmp_path: Path, variant: str) -> None:
    extra = {"json": [], "msgpack": ["--msgpack"], "no-ack": ["--no-publish-ack"]}[variant]
    run = locust(tmp_path, "chat", server.host, "-u", "6", "-r", "6", "-t", "3s",
                 "--rooms", "2", "--publish-rate", "5", "--payload-size", "200", *extra)  # fmt: skip
    _assert_clean(run, "connect", "join", "publish", "delivery")
    assert run.count("connect") == 6 and run.count("join") == 6, run.explain()
    # 3 users per room: every publish reaches the 2 others, minus those still in flight at the end
    assert run.count("delivery") >= run.count("publish"), run.explain()
    assert run.rows["delivery"]["avg_size"] > 200, run.explain()  # payload padding reached the wire
    assert run.summary["counters"].get("messages_missing", 0) == 0


@pytest.mark.parametrize("path", ["", "/echo"])
def test_echo_scenario(server: ServerProcess, tmp_path: Path, path: str) -> None:
    extra = ["--echo-path", path] if path else []
    run = locust(tmp_path, "echo", server.host, "-u", "4", "-r", "4", "-t", "3s", "--echo-rate", "10", *extra)
    _assert_clean(run, "connect", "echo")
    # ~4 users x 10/s x ~2.5 s = 100 on a quiet machine; 36 seen with four test workers on 2 cores
    # (Locust's start-up eats into the 3 s). 20 still fails at the default rate of 1/s (~10).
    assert run.count("echo") >= 4 * 5, run.explain()


def test_idle_scenario_answers_heartbeats(server: ServerProcess, tmp_path: Path) -> None:
    run = locust(tmp_path, "idle", server.host, "-u", "4", "-r", "4", "-t", "3s")
    _assert_clean(run, "connect", "heartbeat")
    assert run.count("heartbeat") >= 4, run.explain()  # pings every ~0.4 s to each idle connection
    assert not any(n.startswith("close:") for n in run.rows), run.explain()  # nobody hit the 4000 timeout


@pytest.mark.parametrize("backoff", ["full-jitter", "none"])
def test_reconnection_storm(server: ServerProcess, tmp_path: Path, backoff: str) -> None:
    run = locust(tmp_path, "storm", server.host, "--storm-users", "8", "--storm-spawn-rate", "8",
                 "--storm-hold", "1.5", "--storm-after", "0.5", "--storm-timeout", "15",
                 "--storm-drop-ratio", "0.75", "--backoff", backoff, "--backoff-base", "0.5",
                 "--rooms", "2", "--publish-rate", "10")  # fmt: skip
    _assert_clean(run, "connect", "join", "rejoin", "storm1:reconnect")
    assert run.count("storm1:reconnect") == 6, run.explain()  # 75 % of 8 dropped, all came back
    (storm,) = run.summary["storms"]
    assert storm["complete"] and storm["rejoined"] == storm["expected"] == 6, storm
    assert storm["all_rejoined_ms"] is not None and storm["all_rejoined_ms"] < 10_000, storm
    c = run.summary["counters"]
    assert c.get("messages_missing", 0) == 0, c  # no gaps after rejoin with since
    if backoff == "full-jitter":
        # away for up to 0.5 s while 2 users keep publishing 10/s: something to recover
        assert run.count("storm1:recovered") > 0 and c.get("messages_recovered", 0) > 0, run.explain()
        assert c["messages_recovered"] == c["messages_missed_while_away"], c
        assert run.count("delivery:replayed") == c["messages_recovered"], run.explain()


def test_storm_by_server_restart(tmp_path: Path) -> None:
    """--storm-trigger none while the test restarts the server: 1001 closes, reconnects, history lost.

    A restarted single node has a new epoch, so the rejoin with since + epoch
    must be reported as not recovered instead of silently resuming.
    """
    srv = ServerProcess().start()
    prefix = tmp_path / "restart"
    proc = subprocess.Popen(
        [PY, "-m", "locust", "-f", str(SCEN / "storm.py"), "--headless", "--host", srv.host, "--csv", str(prefix),
         "--storm-users", "6", "--storm-spawn-rate", "6", "--storm-hold", "0.5", "--storm-timeout", "6",
         "--storm-after", "0.5", "--storm-trigger", "none", "--rooms", "2", "--publish-rate", "5",
         "--backoff-base", "0.2"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    srv2: ServerProcess | None = None
    try:
        deadline = time.monotonic() + 30
        while srv.metric("wsfan_connections") < 6 or srv.metric("wsfan_deliveries_total") < 6:
            # every user connected, and deliveries are flowing (each has a seq to rejoin from)
            assert time.monotonic() < deadline and proc.poll() is None, "users never connected and received"
            time.sleep(0.2)
        srv.stop()  # SIGTERM: graceful, 1001 to everybody
        srv2 = ServerProcess(port=srv.port).start()
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
        if srv2 is not None:
            srv2.stop()
    run = Run(proc.returncode, out, json.loads(Path(f"{prefix}_summary.json").read_text()))
    assert run.failures("close:1001") == 6, run.explain()
    assert run.count("reconnect") == 6 and run.failures("reconnect") == 0, run.explain()
    assert run.failures("recovered") == 6, run.explain()  # new epoch: nothing recoverable, and said so
    assert {r for r in run.rows if run.failures(r)} <= {"close:1001", "recovered", "connect"}, run.explain()


LT_SECRET = "loadtest-secret-of-at-least-32-bytes"


def test_token_secret_mints_jwts(tmp_path: Path) -> None:
    srv = ServerProcess("--jwt-secret", LT_SECRET).start()
    try:
        # the two runs are independent users of one server: side by side
        ok, bad = side_by_side(
            lambda: locust(tmp_path, "chat", srv.host, "-u", "2", "-r", "2", "-t", "2s", "--token-secret",
                           LT_SECRET, "--token-rooms", "lt-*", tag="good"),
            lambda: locust(tmp_path, "chat", srv.host, "-u", "2", "-r", "2", "-t", "2s", "--token-secret",
                           "wrong", "--backoff-base", "0.5", tag="bad"),
        )  # fmt: skip
        _assert_clean(ok, "connect", "join")
        assert bad.count("connect") >= 2 and bad.failures("connect") == bad.count("connect"), bad.explain()
        assert any("HTTP 401" in e["error"] for e in bad.summary["errors"]), bad.explain()
    finally:
        srv.stop()


# -------------------------------------------------------- failures with codes


def test_rate_limit_shows_error_and_close_codes(tmp_path: Path) -> None:
    srv = ServerProcess("--rate-limit", "1", "--rate-burst", "1", "--rate-abuse-strikes", "5").start()
    try:
        run = locust(tmp_path, "chat", srv.host, "-u", "3", "-r", "3", "-t", "3s",
                     "--rooms", "1", "--publish-rate", "10", "--backoff-base", "0.2")  # fmt: skip
    finally:
        srv.stop()
    assert run.rc == 1, run.explain()  # Locust exits 1 when anything failed
    # a refused publish fails the publish row itself, with the code as the reason
    assert run.failures("publish") > 0 and "error:RATE_LIMITED" not in run.rows, run.explain()
    assert any(e["name"] == "publish" and e["error"] == "error:RATE_LIMITED" for e in run.summary["errors"])
    assert run.failures("close:4029") > 0, run.explain()
    assert run.count("join") > 0 and run.count("connect") > 3, run.explain()  # kicked users came back


def test_slow_consumer_is_closed_with_4008(tmp_path: Path) -> None:
    """Two fast publishers, one listener that reads 60 KB messages every 12 ms (slower than they arrive).

    The listener must be slow, but fast enough to read through the kernel
    buffers to the server's close frame within its 2 s close grace: a reader
    that stalls completely is aborted after the grace and only sees 1006.
    """
    srv = ServerProcess("--slow-consumer-limit", "1024").start()
    try:
        run = locust(tmp_path, "chat", srv.host, "-u", "3", "-r", "3", "-t", "8s", "--rooms", "1",
                     "--publish-rate", "80", "--payload-size", "60000", "--publisher-ratio", "0.67",
                     "--recv-delay-ms", "12", "--no-reconnect")  # fmt: skip
        closes = srv.metric('wsfan_closes_total{code="4008",reason="slow_consumer"}')
    finally:
        srv.stop()
    assert closes >= 1, run.explain()
    assert run.failures("close:4008") >= 1, run.explain()
    assert run.failures("close:4008") == run.failures(), run.explain()  # nothing else failed


def test_cpu_warning_is_surfaced_in_the_report(server: ServerProcess, tmp_path: Path) -> None:
    """Locust's cpu_warning event (fired by its CPU monitor above 90 %) becomes a LOADGEN stats row."""
    lf = tmp_path / "cpu_locustfile.py"
    lf.write_text(
        "from locust import events\n"
        "from wsfan.loadtest.users import EchoUser\n"
        "@events.test_start.add_listener\n"
        "def _saturated(environment, **_kw):\n"
        "    environment.events.cpu_warning.fire(environment=environment, cpu_usage=97.0)\n"
    )
    prefix = tmp_path / "cpu"
    done = subprocess.run(
        [PY, "-m", "locust", "-f", str(lf), "--headless", "--host", server.host, "-u", "1", "-r", "1", "-t", "2s",
         "--csv", str(prefix)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    summary = json.loads(Path(f"{prefix}_summary.json").read_text())
    run = Run(done.returncode, done.stdout + done.stderr, summary)
    row = run.rows.get("cpu>90%")
    assert row is not None and row["type"] == "LOADGEN" and row["max_ms"] == 97.0, run.explain()
    assert row["failures"] == 0 and run.rc == 0, run.explain()  # recorded, not failed (--cpu-warning-fails)
    assert summary["loadgen_cpu"]["saturated"] and summary["loadgen_cpu"]["max_percent"] == 97.0
    assert "cpu>90%" in Path(f"{prefix}_stats.csv").read_text()


# ----------------------------------------------------------------- distributed


def test_master_and_worker(server: ServerProcess, tmp_path: Path) -> None:
    port = free_port()
    prefix = tmp_path / "dist"
    common = ["-f", str(SCEN / "chat.py")]
    master = subprocess.Popen(
        [
            PY,
            "-m",
            "locust",
            *common,
            "--master",
            "--master-bind-host",
            "127.0.0.1",
            "--master-bind-port",
            str(port),
            "--expect-workers",
            "1",
            "--expect-workers-max-wait",
            "30",
            "--headless",
            "-u",
            "4",
            "-r",
            "4",
            "-t",
            "4s",
            "--host",
            server.host,
            "--csv",
            str(prefix),
            "--rooms",
            "2",
            "--publish-rate",
            "5",
        ],  # fmt: skip
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        worker = subprocess.run(
            [PY, "-m", "locust", *common, "--worker", "--master-host", "127.0.0.1", "--master-port", str(port)],
            cwd=ROOT, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        out, _ = master.communicate(timeout=30)
    finally:
        if master.poll() is None:
            master.kill()
            master.wait(timeout=5)
    summary = json.loads(Path(f"{prefix}_summary.json").read_text())
    run = Run(master.returncode, out + worker.stdout[-1500:] + worker.stderr[-1500:], summary)
    _assert_clean(run, "connect", "join", "publish", "delivery")
    assert worker.returncode == 0, run.explain()
    assert summary["workers"] == 1 and run.count("connect") == 4, run.explain()


# ----------------------------------------------------------------- swarm


def test_swarm_script(tmp_path: Path) -> None:
    done = subprocess.run(
        [PY, "-m", "wsfan.loadtest.swarm", "--users", "4", "--run-time", "3s", "--results-root", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=90, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (out,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    for name in (
        "report.html",
        "locust_stats.csv",
        "locust_stats_history.csv",
        "locust_summary.json",
        "server.log",
    ):
        assert (out / name).stat().st_size > 0, name


# ----------------------------------------------------------------- units (no server)


def test_settings_rooms_publishers_backoff_and_token() -> None:
    code = r"""
import random, jwt
from wsfan.loadtest.opts import Settings
s = Settings(rooms=3, rooms_per_user=2, room_prefix="r", publisher_ratio=0.25)
assert s.rooms_for(0) == ["r-0", "r-1"] and s.rooms_for(4) == ["r-1", "r-2"]
assert sum(s.is_publisher(i) for i in range(100)) == 25
s2 = Settings(room_size=10)  # default: rooms of 10 filled in order, whatever the user count
assert [s2.rooms_for(i) for i in (0, 9, 10, 25)] == [["lt-0"], ["lt-0"], ["lt-1"], ["lt-2"]]
rng = random.Random(1)
fj = Settings(backoff="full-jitter", backoff_base=0.1, backoff_cap=1.0)
assert all(0 <= fj.backoff_delay(n, rng) <= min(1.0, 0.1 * 2 ** n) for n in range(12))
no = Settings(backoff="none", backoff_base=0.3)
assert no.backoff_delay(0, rng) == 0 and no.backoff_delay(5, rng) == 0.3
ex = Settings(backoff="exponential", backoff_base=0.1, backoff_cap=1.0)
assert ex.backoff_delay(2, rng) == 0.4 and ex.backoff_delay(9, rng) == 1.0
tok = Settings(token_secret="k", token_rooms="a-*, b").bearer("u1")
claims = jwt.decode(tok, "k", algorithms=["HS256"])
assert claims["sub"] == "u1" and claims["rooms"] == ["a-*", "b"] and claims["exp"] > 0
assert Settings(token="static").bearer("x") == "static"
print("ok")
"""
    done = subprocess.run([PY, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "ok", done.stderr


def test_options_are_listed() -> None:
    """``locust --help`` cannot show locustfile options, so ``python -m wsfan.loadtest.opts`` does."""
    done = subprocess.run(
        [PY, "-m", "wsfan.loadtest.opts"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    for opt in (
        "--rooms",
        "--publish-rate",
        "--token-secret",
        "--storm-users",
        "--backoff",
        "--results-root",
    ):
        assert opt in done.stdout, opt


def test_wsclient_masks_and_frames() -> None:
    code = r"""
from wsfan.loadtest import wsclient as w
key = b"\x01\x02\x03\x04"
data = bytes(range(256)) * 3 + b"xyz"
assert w._mask(key, w._mask(key, data)) == data
assert w._mask(key, b"abcd") == bytes(a ^ b for a, b in zip(b"abcd", key))
assert w._frame_header(w.OP_TEXT, 5) == b"\x81\x85"
assert w._frame_header(w.OP_BINARY, 300)[:2] == b"\x82\xfe"
assert w._frame_header(w.OP_TEXT, 70000)[:2] == b"\x81\xff"
assert w.parse_close_payload(b"\x0f\xa8slow") == (4008, "slow")
assert w.parse_close_payload(b"") == (1005, "")
t = w.parse_url("ws://127.0.0.1:9000/ws?x=1")
assert (t.secure, t.host, t.port, t.resource, t.host_header) == (False, "127.0.0.1", 9000, "/ws?x=1", "127.0.0.1:9000")
assert w.parse_url("https://h").port == 443 and w.parse_url("https://h").secure
print("ok")
"""
    done = subprocess.run([PY, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "ok", done.stderr


# ----------------------------------------------------------------- precision, aggregation, thresholds


def _hdr(run: Run) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in run.summary["hdr_us"]}


def test_default_mixed_run_has_deliveries(server: ServerProcess, tmp_path: Path) -> None:
    """``locust -f locustfile.py -u 20``: chat users share rooms, so the delivery row is not empty."""
    prefix = tmp_path / "mixed"
    done = subprocess.run(
        [PY, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"), "--headless", "--host", server.host,
         "-u", "20", "-r", "20", "-t", "4s", "--csv", str(prefix)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    run = Run(
        done.returncode, done.stdout + done.stderr, json.loads(Path(f"{prefix}_summary.json").read_text())
    )
    _assert_clean(run, "connect", "join", "publish", "delivery", "echo", "heartbeat")
    # Heartbeat intervals are not request latencies: their row stays, the Aggregated row leaves them out.
    request_rows = sum(e["count"] for n, e in run.rows.items() if n != "heartbeat")
    assert run.rows["heartbeat"]["count"] > 0 and run.summary["totals"]["requests"] == request_rows, (
        run.explain()
    )
    assert (tmp_path / "mixed_hdr.json").exists() and (tmp_path / "mixed_hdr" / "delivery.hgrm").exists()


def test_hdr_histograms_merge_across_workers(server: ServerProcess, tmp_path: Path) -> None:
    """Master + 2 workers: the master's µs histograms hold every worker's samples, and resolve below 1 ms."""
    port = free_port()
    prefix = tmp_path / "dist2"
    common = ["-f", str(SCEN / "chat.py")]
    master = subprocess.Popen(
        [PY, "-m", "locust", *common, "--master", "--master-bind-host", "127.0.0.1", "--master-bind-port",
         str(port), "--expect-workers", "2", "--expect-workers-max-wait", "30", "--headless", "-u", "8",
         "-r", "8", "-t", "5s", "--host", server.host, "--csv", str(prefix), "--room-size", "4",
         "--publish-rate", "10"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    workers = [
        subprocess.Popen(
            [
                PY,
                "-m",
                "locust",
                *common,
                "--worker",
                "--master-host",
                "127.0.0.1",
                "--master-port",
                str(port),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
        )  # fmt: skip
        for _ in range(2)
    ]
    try:
        out, _ = master.communicate(timeout=60)
        for w in workers:
            w.communicate(timeout=30)
    finally:
        for p in (master, *workers):
            if p.poll() is None:
                p.kill()
                p.wait(timeout=5)
    run = Run(master.returncode, out, json.loads(Path(f"{prefix}_summary.json").read_text()))
    _assert_clean(run, "connect", "join", "publish", "delivery")
    assert run.summary["workers"] == 2, run.explain()
    hdr = _hdr(run)
    for name in ("connect", "join", "publish", "delivery"):
        # Locust's own count is the sum of the workers' reports; the merged HDR count must equal it
        assert hdr[name]["count"] == run.count(name) - run.failures(name), (name, hdr[name], run.explain())
    d = hdr["delivery"]
    assert d["min_us"] <= d["p50_us"] <= d["p90_us"] <= d["p99_us"] <= d["max_us"], d
    # microsecond resolution: percentiles are distinct values, not Locust's whole milliseconds
    assert len({d["min_us"], d["p50_us"], d["p99_us"], d["max_us"]}) >= 3, d
    assert any(v % 1000 for v in (d["p50_us"], d["p90_us"], d["p99_us"])), d


@pytest.mark.parametrize(
    ("checks", "expected_rc", "failed"),
    [
        (["--check-p99-delivery-ms", "60000", "--check-fail-ratio", "0", "--check-gaps", "0"], 0, set()),
        (["--check-p99-delivery-ms", "0.001"], 3, {"p99_delivery_ms"}),
        (["--check-gaps", "0", "--check-p99-delivery-ms", "60000", "--check-fail-ratio", "-0.5"], 0, set()),
    ],
    ids=["all-pass", "p99-fails", "negative-ratio-is-off"],
)
def test_check_thresholds_set_the_exit_code(
    server: ServerProcess, tmp_path: Path, checks: list[str], expected_rc: int, failed: set[str]
) -> None:
    run = locust(tmp_path, "chat", server.host, "-u", "4", "-r", "4", "-t", "3s", "--room-size", "4",
                 "--publish-rate", "10", *checks)  # fmt: skip
    assert run.rc == expected_rc, run.explain()
    assert {c["check"] for c in run.summary["checks"] if not c["passed"]} == failed, run.summary["checks"]


def test_fail_ratio_check_judges_failures_both_ways(tmp_path: Path) -> None:
    """Refused publishes (rate limit): within --check-fail-ratio the run passes (0), above it fails (3)."""
    srv = ServerProcess("--rate-limit", "2", "--rate-burst", "2", "--rate-abuse-strikes", "100000").start()
    try:
        args = ("-u", "2", "-r", "2", "-t", "3s", "--room-size", "2", "--publish-rate", "10")
        # the rate limit is per connection (PROTOCOL.md), so the two runs do not share a budget: side by side
        tolerant, strict = side_by_side(
            lambda: locust(tmp_path, "chat", srv.host, *args, "--check-fail-ratio", "1", tag="tolerant"),
            lambda: locust(tmp_path, "chat", srv.host, *args, "--check-fail-ratio", "0.01", tag="strict"),
        )
    finally:
        srv.stop()
    assert tolerant.failures("publish") > 0 and tolerant.rc == 0, tolerant.explain()
    assert strict.failures("publish") > 0 and strict.rc == 3, strict.explain()


def test_web_ui_has_the_hdr_tab(server: ServerProcess, tmp_path: Path) -> None:
    """The web UI's stats feed carries the µs table its "Latency (HDR)" tab renders."""
    web = free_port()
    proc = subprocess.Popen(
        [PY, "-m", "locust", "-f", str(SCEN / "chat.py"), "--host", server.host, "-u", "4", "-r", "4",
         "--autostart", "-t", "20s", "--web-host", "127.0.0.1", "--web-port", str(web), "--room-size", "4",
         "--publish-rate", "10", "--no-results"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        rows: list[dict[str, Any]] = []
        while time.monotonic() < deadline and not any(r["name"] == "delivery" for r in rows):
            time.sleep(0.5)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{web}/stats/requests", timeout=5) as r:
                    body = json.loads(r.read())
            except OSError:
                continue
            (tab,) = body["extended_stats"]
            assert tab["key"] == "wsfan-latency"
            rows = tab["data"]
        with urllib.request.urlopen(f"http://127.0.0.1:{web}/", timeout=5) as r:
            page = r.read().decode()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    delivery = next((r for r in rows if r["name"] == "delivery"), None)
    assert delivery is not None and delivery["count"] > 0, out[-2000:]
    assert set(delivery) >= {"p50_us", "p90_us", "p99_us", "p999_us", "max_us"}, delivery
    assert "Latency (HDR, microseconds)" in page  # the tab is declared in the page's template args


def test_chat_scenario_with_presence_reports_join_leave_event_latency(tmp_path: Path) -> None:
    srv = ServerProcess("--namespaces", "pr:presence=true,join_leave=true", "--rate-limit", "0").start()
    try:
        run = locust(tmp_path, "chat", srv.host, "-u", "6", "-r", "6", "-t", "4s", "--rooms", "2",
                     "--presence-namespace", "pr", "--churn-interval", "0.5")  # fmt: skip
    finally:
        srv.stop()
    _assert_clean(run, "join", "joined", "left", "presence_stats", "delivery")
    # every churn is seen by the 2 others of its room (minus those still in flight at the end)
    assert run.count("joined") >= run.count("leave"), run.explain()
    assert 0 < run.rows["joined"]["avg_ms"] < 1000, run.explain()
    assert run.summary["counters"].get("messages_missing", 0) == 0


def test_chat_with_compression_inflates_compressed_deliveries(tmp_path: Path) -> None:
    """--compression: the users offer permessage-deflate; the server's compressed frames arrive intact."""
    srv = ServerProcess("--compression", "--compression-threshold", "64").start()
    try:
        run = locust(tmp_path, "chat", srv.host, "-u", "4", "-r", "4", "-t", "3s", "--room-size", "4",
                     "--publish-rate", "10", "--payload-size", "400", "--compression")  # fmt: skip
        compressed = srv.metric("wsfan_compressed_deliveries_total")
    finally:
        srv.kill()
    _assert_clean(run, "connect", "join", "publish", "delivery")
    assert compressed >= run.count("delivery") > 0, (compressed, run.explain())
    assert run.summary["counters"].get("messages_missing", 0) == 0


def test_broadcasts_are_received_and_timed(tmp_path: Path) -> None:
    """Room-less ``broadcast`` pushes (POST /broadcast without rooms) are a ``broadcast`` row, not a failure."""
    http_port = free_port()
    key = "loadtest-admin-key-0123456789abcdef"
    srv = ServerProcess("--admin-key", key, "--http-port", str(http_port)).start()
    stop = threading.Event()

    def broadcaster() -> None:
        while not stop.wait(0.2):
            body = json.dumps({"payload": {"ts": time.time(), "pub": "test"}}).encode()
            req = urllib.request.Request(
                f"http://127.0.0.1:{http_port}/broadcast", data=body, method="POST",
                headers={"Authorization": f"Bearer {key}"},
            )  # fmt: skip
            urllib.request.urlopen(req, timeout=5).close()

    thread = threading.Thread(target=broadcaster, daemon=True)
    thread.start()
    try:
        run = locust(tmp_path, "idle", srv.host, "-u", "4", "-r", "4", "-t", "6s")
    finally:
        stop.set()
        thread.join(10)
        srv.stop()
    _assert_clean(run, "connect", "broadcast")
    assert not any(n.startswith("unexpected") for n in run.rows), run.explain()


def test_server_side_pushes_are_rows_of_their_own(tmp_path: Path) -> None:
    """A ``subscribed`` push and an application's own push type (``conn.send``) are the rows
    ``subscribed`` and ``push:<type>``, untimed, not failures (were ``unexpected:<type>`` failures)."""
    tests = str(Path(__file__).resolve().parent)
    srv = ServerProcess("--app", "apps.greeter:app", env={"PYTHONPATH": os.pathsep.join([tests, str(ROOT)])})
    srv.start()
    try:
        run = locust(tmp_path, "idle", srv.host, "-u", "3", "-r", "3", "-t", "3s")
    finally:
        srv.stop()
    _assert_clean(run, "connect", "subscribed", "push:notice")
    assert run.count("subscribed") == run.count("push:notice") == run.count("connect") == 3, run.explain()
    assert not any(n.startswith("unexpected") for n in run.rows), run.explain()
