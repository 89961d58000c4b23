"""Smoke-size load test against a throwaway local server: ``python -m wsfan.loadtest.swarm`` (``make swarm``).

Why it exists: one command that proves the whole chain (server starts, users
connect, join, publish, receive; reports are written) and leaves a report to
look at, without anyone having to pick ports or remember Locust flags. It is
bounded in every way: a free port on 127.0.0.1, a few users, ``--run-time``,
and timeouts around every wait. Arguments after ``--`` go to Locust verbatim.

    python -m wsfan.loadtest.swarm                       # 20 chat users, 15 s
    python -m wsfan.loadtest.swarm --users 50 --run-time 30s --scenario echo
    python -m wsfan.loadtest.swarm --server-arg=--rate-limit=0 -- --payload-size 512
    python -m wsfan.loadtest.swarm --conf storm        # loadtest/conf/storm.conf as written

Scenario and conf files are found next to this module (``wsfan/loadtest/scenarios``,
``wsfan/loadtest/conf``), so the same command works from a source tree and from an
installed wheel; reports go under ``./results/locust/`` of the current directory.

Exit status: Locust's (non-zero if any request failed), or 3 if the server
did not start or did not exit cleanly on SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCENARIO_DIR = HERE / "scenarios"
CONF_DIR = HERE / "conf"
SCENARIOS = ("chat", "echo", "idle", "storm")


def scenario_file(name: str) -> Path:
    """``wsfan/loadtest/scenarios/<name>.py``, wherever the package is installed."""
    return SCENARIO_DIR / f"{name}.py"


def conf_names() -> list[str]:
    """The Locust config files shipped in ``wsfan/loadtest/conf`` (without ``.conf``)."""
    return sorted(p.stem for p in CONF_DIR.glob("*.conf"))


def conf_locustfile(conf: Path) -> Path:
    """The scenario file a conf names (``locustfile = loadtest/scenarios/chat.py``), found in this package.

    The conf files spell the path from the repository root so that ``locust --config`` works from a
    checkout; this resolves it by file name instead, which works from a wheel too.
    Raises ``ValueError`` if the conf has no ``locustfile`` line.
    """
    for line in conf.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == "locustfile":
            return SCENARIO_DIR / Path(value.strip()).name
    raise ValueError(f"{conf} has no locustfile line")


def free_port() -> int:
    """A port the OS says is free on 127.0.0.1 (tiny race, fine for a smoke run)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """True once the port accepts TCP connections; False if the process died or time ran out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def stop_server(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int | None:
    """SIGTERM (the server's graceful shutdown), then SIGKILL if it hangs; return its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
            return None
    return proc.returncode


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    else:
        extra = []
    p = argparse.ArgumentParser(prog="python -m wsfan.loadtest.swarm", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--scenario", choices=SCENARIOS, default="chat", help="scenario file in loadtest/scenarios"
    )
    p.add_argument(
        "--conf",
        choices=conf_names(),
        help="run loadtest/conf/NAME.conf as written (its users, rates and run time) instead of --scenario",
    )
    p.add_argument("--users", type=int, default=20, help="users (storm: --storm-users)")
    p.add_argument("--spawn-rate", type=float, default=20.0)
    p.add_argument("--run-time", default="15s", help="Locust --run-time (ignored by the storm shape)")
    p.add_argument("--rooms", type=int, default=4)
    p.add_argument("--publish-rate", type=float, default=2.0)
    p.add_argument("--results-root", default="results/locust", help="reports go to a new folder under it")
    p.add_argument("--python", default=sys.executable, help="interpreter for the server and Locust")
    p.add_argument("--server-arg", action="append", default=[], help="extra server flag (repeatable)")
    p.add_argument("--timeout", type=float, default=180.0, help="hard limit for the Locust process, seconds")
    return p.parse_args(argv), extra


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    port = free_port()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    label = f"conf-{args.conf}" if args.conf else args.scenario
    out = Path(args.results_root) / f"{stamp}-swarm-{label}"
    out.mkdir(parents=True, exist_ok=True)
    server_log = open(out / "server.log", "wb")
    server_cmd = [args.python, "-m", "wsfan", "--host", "127.0.0.1", "--port", str(port), *args.server_arg]
    if args.scenario == "echo" and "--echo-endpoint" not in args.server_arg:
        server_cmd.append("--echo-endpoint")
    print("server:", " ".join(server_cmd), flush=True)
    server = subprocess.Popen(
        server_cmd, stdout=server_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )
    try:
        if not wait_for_port(port, server, timeout=20):
            print(f"server did not start; see {out / 'server.log'}", file=sys.stderr)
            return 3
        host = f"ws://127.0.0.1:{port}"
        cmd = [args.python, "-m", "locust", "--headless", "--host", host, "--loglevel", "INFO",
               "--csv", str(out / "locust"), "--csv-full-history", "--html", str(out / "report.html")]  # fmt: skip
        if args.conf:
            conf = CONF_DIR / f"{args.conf}.conf"
            cmd += ["--config", str(conf), "-f", str(conf_locustfile(conf))]
        else:
            cmd += ["-f", str(scenario_file(args.scenario)),
                    "--rooms", str(args.rooms), "--publish-rate", str(args.publish_rate)]  # fmt: skip
            if args.scenario == "storm":
                cmd += ["--storm-users", str(args.users), "--storm-spawn-rate", str(args.spawn_rate),
                        "--storm-hold", "3", "--storm-after", "2", "--storm-drop-ratio", "0.9"]  # fmt: skip
            else:
                cmd += ["-u", str(args.users), "-r", str(args.spawn_rate), "-t", args.run_time]
        cmd += extra
        print("locust:", " ".join(cmd), flush=True)
        try:
            rc = subprocess.run(cmd, timeout=args.timeout, stdin=subprocess.DEVNULL).returncode
        except subprocess.TimeoutExpired:
            print(f"locust did not finish within {args.timeout:g}s", file=sys.stderr)
            rc = 4
    finally:
        code = stop_server(server)
        server_log.close()
    summary_path = out / "locust_summary.json"
    if summary_path.exists():
        s = json.loads(summary_path.read_text())
        t = s["totals"]
        print(f"\n{t['requests']} measurements, {t['failures']} failures, {t['rps']:.1f}/s")
        for e in s["entries"]:
            print(f"  {e['name']:<24} n={e['count']:<8} fail={e['failures']:<5} p50={e['median_ms']}ms "
                  f"p95={e['p95_ms']}ms p99={e['p99_ms']}ms")  # fmt: skip
        if s["loadgen_cpu"]["saturated"]:
            print("  WARNING: load generator CPU > 90%: these are the generator's limits")
    print(f"\nreports: {out}/ (report.html, locust_stats.csv, locust_summary.json, server.log)")
    if code != 0:
        print(f"server exit code on SIGTERM: {code} (expected 0)", file=sys.stderr)
        return rc or 3
    return rc


if __name__ == "__main__":
    sys.exit(main())
