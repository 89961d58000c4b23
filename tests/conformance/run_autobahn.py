#!/usr/bin/env python3
"""RFC 6455 conformance run: Autobahn|Testsuite fuzzingclient against the server's /echo endpoint.

Why this script exists: the echo endpoint is the one place where the server's WebSocket layer
(framing, fragmentation/reassembly, UTF-8 validation, control frames, close handshake) can be
checked against the reference test suite without the pub/sub protocol in the way. The script is
self-contained so that `make conformance`, CI and a pytest wrapper all run exactly the same thing:

1. start the server on a free 127.0.0.1 port with ``--echo-endpoint`` (rate limiting and the
   application heartbeat off, because both would inject behaviour the fuzzer does not expect);
2. wait until the port accepts TCP connections (the server's documented readiness signal);
3. write a fuzzingclient spec and run ``wstest -m fuzzingclient`` under a hard timeout;
4. stop the server with SIGTERM and require exit status 0 (graceful shutdown is part of the
   contract, and a crash during fuzzing would otherwise go unnoticed);
5. parse the report's ``index.json`` and fail unless every case is acceptable.

Acceptance: ``behavior`` must be OK, NON-STRICT or INFORMATIONAL (Autobahn's own notion of
"passed"; NON-STRICT means allowed-but-not-ideal, e.g. failing a connection late), and
``behaviorClose`` must be OK or INFORMATIONAL. Close behaviours FAILED, WRONG CODE and UNCLEAN
are real defects (wrong endpoint failed the connection, close code not allowed by the RFC,
TCP dropped without a close handshake), so they fail the run too.

Known failures: tests/conformance/known_failures.txt lists cases whose defect is upstream (in
picows, not in this repository), each with its reason. They are still printed on every run but do
not fail it; a listed case that passes is reported so the entry can be removed. ``--strict``
ignores the list.

Excluded by default: 9.* (throughput with messages up to 16 MiB: a benchmark, not conformance).
12.*/13.* (permessage-deflate, RFC 7692) run with the server's ``--compression``: all 216 of
them take about half an hour, because Autobahn's Python 2 side compresses 1,000 messages of up
to 128 KiB per case; the CI test runs two sizes of every one of their 12 groups
(``CI_CASES``: 16 B, and 8 KiB fragmented into 256-byte frames).

Exit status: 0 all cases acceptable; 1 conformance failures; 2 the run itself broke (wstest
missing, server did not start, timeout, server exit status non-zero on SIGTERM).
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the helpers package
from helpers.ports import free_port, wait_for_port  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
INSTALLER = Path(__file__).resolve().with_name("install_autobahn.sh")
KNOWN_FAILURES = Path(__file__).resolve().with_name("known_failures.txt")

OK_BEHAVIOR = frozenset({"OK", "NON-STRICT", "INFORMATIONAL"})
OK_CLOSE = frozenset({"OK", "INFORMATIONAL"})
DEFAULT_EXCLUDES = ["9.*"]
#: What CI runs: every category but 9.*, and of 12.*/13.* (permessage-deflate) the cases .1 and .11
#: of each group (16 B, and 8 KiB auto-fragmented to 256 B): every offer, a compressed request in one
#: frame and in fragments, a reply below the compression threshold (plain) and one above it
#: (compressed), in minutes instead of half an hour. The .4 cases (1 KiB, one frame, compressed both
#: ways) left CI for the suite's time; the same exchange is tests/test_compression.py's
#: test_a_compressed_request_is_inflated (and the websockets library and Python client round trips
#: there), and ``make conformance`` runs them with the rest of the 216.
CI_CASES = [
    *(f"{n}.*" for n in (1, 2, 3, 4, 5, 6, 7, 10)),
    # explicit ids: Autobahn's patterns are prefix matches (12.*.1 would take 12.1.10-18 too)
    *(f"{g}.{k}.{i}" for g, groups in ((12, 5), (13, 7)) for k in range(1, groups + 1) for i in (1, 11)),
]
AGENT = "wsfan"

EXIT_OK = 0
EXIT_NONCONFORMANT = 1
EXIT_BROKEN = 2


class RunError(Exception):
    """The harness could not produce a trustworthy result (distinct from a failing case)."""


@dataclass
class CaseResult:
    """One Autobahn case as seen in index.json plus the details from its per-case report."""

    case_id: str
    behavior: str
    behavior_close: str
    remote_close_code: int | None
    description: str = ""
    expectation: str = ""
    result: str = ""
    result_close: str = ""
    expected_close_codes: list[int] = field(default_factory=list)
    known_reason: str | None = None

    @property
    def passed(self) -> bool:
        """True when Autobahn counts the case as passed both for data and for closing."""
        return self.behavior in OK_BEHAVIOR and self.behavior_close in OK_CLOSE


def log(msg: str) -> None:
    """Progress goes to stderr so stdout stays the human-readable summary."""
    print(f"[run_autobahn] {msg}", file=sys.stderr, flush=True)


def case_sort_key(case_id: str) -> tuple[int, ...]:
    """Sort "6.10.2" after "6.9.1": Autobahn ids are dotted integers, not strings."""
    return tuple(int(p) if p.isdigit() else 0 for p in case_id.split("."))


def plain_text(fragment: str) -> str:
    """Autobahn descriptions are HTML snippets; strip tags and collapse whitespace for a terminal."""
    text = re.sub(r"<br\s*/?>", " ", fragment or "", flags=re.IGNORECASE)
    text = re.sub(r"<[^>]+>", "", text)
    return re.sub(r"\s+", " ", html.unescape(text)).strip()


def default_wstest() -> Path:
    """Where install_autobahn.sh puts wstest; kept in sync with that script's defaults."""
    venv = os.environ.get("WSFAN_AUTOBAHN_VENV")
    if venv:
        return Path(venv) / "bin" / "wstest"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "wsfan" / "autobahn-venv" / "bin" / "wstest"


def resolve_wstest(explicit: str | None, install: bool) -> Path:
    """Use --wstest / $WSFAN_WSTEST if given, else run the idempotent installer (fast when cached)."""
    chosen = explicit or os.environ.get("WSFAN_WSTEST")
    if chosen:
        path = Path(chosen)
        if not os.access(path, os.X_OK):
            raise RunError(f"wstest not executable: {path}")
        return path
    if not install:
        path = default_wstest()
        if not os.access(path, os.X_OK):
            raise RunError(f"wstest not found at {path}; run {INSTALLER}")
        return path
    log(f"ensuring Autobahn venv via {INSTALLER.name}")
    proc = subprocess.run(["bash", str(INSTALLER)], stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:
        raise RunError(f"{INSTALLER.name} failed with exit status {proc.returncode}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if not lines:
        raise RunError(f"{INSTALLER.name} printed no wstest path")
    return Path(lines[-1].strip())


def default_server_python() -> str:
    """The project venv's interpreter: the server's deps (picows, uvloop, msgspec) live there."""
    venv_python = REPO_ROOT / ".venv" / "bin" / "python"
    return str(venv_python) if venv_python.exists() else sys.executable


def clean_env_for_py2() -> dict[str, str]:
    """wstest is Python 2.7: a python3 PYTHONPATH/PYTHONHOME leaking in would break its imports."""
    env = dict(os.environ)
    for var in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONSAFEPATH"):
        env.pop(var, None)
    return env


def start_server(python: str, port: int, extra_args: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Launch the server in its own session so a stuck server can be killed with its children."""
    cmd = [
        python,
        "-m",
        "wsfan",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--echo-endpoint",
        "--rate-limit",
        "0",
        "--heartbeat",
        "0",
        # permessage-deflate on: cases 12.* and 13.* negotiate it, the others offer nothing
        "--compression",
        # 12.*/13.* send messages of up to 128 KiB (9.*, up to 16 MiB, stays excluded)
        "--max-message-size",
        "262144",
        *extra_args,
    ]
    log("starting server: " + " ".join(cmd))
    log_file = log_path.open("wb")
    try:
        return subprocess.Popen(
            cmd, cwd=REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    finally:
        log_file.close()  # the child holds its own descriptor


def wait_for_server(proc: subprocess.Popen[bytes], port: int, timeout: float) -> None:
    """Readiness = the TCP port accepts connections (per the dev contract); fail fast if it died."""
    try:
        wait_for_port(port, timeout=timeout, proc=proc)
    except (RuntimeError, TimeoutError) as exc:
        raise RunError(f"server did not accept connections on 127.0.0.1:{port}: {exc}") from None


def stop_server(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    """SIGTERM and wait; returns the exit status, or None if it had to be SIGKILLed."""
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        log(f"server ignored SIGTERM for {timeout:.0f}s; killing it")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None


def write_spec(path: Path, report_dir: Path, url: str, cases: list[str], excludes: list[str]) -> None:
    """Fuzzingclient spec: one server under test, all selected cases, Autobahn's default (strict) options."""
    spec = {
        "outdir": str(report_dir),
        "servers": [{"agent": AGENT, "url": url}],
        "cases": cases,
        "exclude-cases": excludes,
        "exclude-agent-cases": {},
    }
    path.write_text(json.dumps(spec, indent=2) + "\n")


def run_wstest(wstest: Path, spec: Path, cwd: Path, log_path: Path, timeout: float) -> None:
    """Run the fuzzer; its own exit status is 0 even when cases fail, so only crashes matter here."""
    cmd = [str(wstest), "-m", "fuzzingclient", "-s", str(spec)]
    log("running: " + " ".join(cmd))
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=clean_env_for_py2(),
            start_new_session=True,
        )
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise RunError(f"wstest did not finish within {timeout:.0f}s (see {log_path})") from None
    if rc != 0:
        raise RunError(f"wstest exited with status {rc} (see {log_path})")


def load_results(report_dir: Path) -> list[CaseResult]:
    """Read index.json and enrich every non-passing case from its per-case JSON report."""
    index_path = report_dir / "index.json"
    if not index_path.exists():
        raise RunError(f"no report index at {index_path}")
    index: dict[str, dict[str, Any]] = json.loads(index_path.read_text())
    if AGENT not in index or not index[AGENT]:
        raise RunError(f"report index has no cases for agent {AGENT!r}")
    results: list[CaseResult] = []
    for case_id in sorted(index[AGENT], key=case_sort_key):
        entry = index[AGENT][case_id]
        res = CaseResult(
            case_id=case_id,
            behavior=str(entry.get("behavior")),
            behavior_close=str(entry.get("behaviorClose")),
            remote_close_code=entry.get("remoteCloseCode"),
        )
        report_file = entry.get("reportfile")
        if report_file and (report_dir / report_file).exists():
            detail = json.loads((report_dir / report_file).read_text())
            res.description = plain_text(detail.get("description", ""))
            res.expectation = plain_text(detail.get("expectation", ""))
            res.result = plain_text(detail.get("result", ""))
            res.result_close = plain_text(detail.get("resultClose", ""))
            res.expected_close_codes = list((detail.get("expectedClose") or {}).get("closeCode") or [])
        results.append(res)
    return results


def tail(path: Path, lines: int = 25) -> str:
    """Last lines of a log, so a CI failure is explainable without fetching artifacts."""
    try:
        content = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"    ({path} not readable)"
    return "\n".join("    " + ln for ln in content[-lines:]) or f"    ({path} is empty)"


def load_known_failures(path: Path | None) -> dict[str, str]:
    """Parse `CASE_ID  reason` lines; an allowlist only makes sense with a reason for each entry."""
    if path is None:
        return {}
    known: dict[str, str] = {}
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        case_id, _, reason = line.partition(" ")
        if not reason.strip():
            raise RunError(f"{path}:{lineno}: known failure {case_id} has no reason")
        known[case_id] = reason.strip()
    return known


def shorten(text: str, width: int) -> str:
    """Keep table rows on one line."""
    return text if len(text) <= width else text[: width - 1] + "…"


def print_failure_table(title: str, cases: list[CaseResult]) -> None:
    """One line per case: id, both behaviours, close code received (and wanted), description."""
    print(f"\n{title}")
    print(f"  {'case':<9} {'behavior':<13} {'close':<13} {'code (want)':<18} description")
    for r in cases:
        want = ",".join(str(c) for c in r.expected_close_codes) or "-"
        code = f"{r.remote_close_code} ({want})"
        print(
            f"  {r.case_id:<9} {r.behavior:<13} {r.behavior_close:<13} {code:<18} {shorten(r.description, 90)}"
        )
    print("  details:")
    for r in cases:
        print(f"  {r.case_id}: {r.description}")
        print(f"      expected: {r.expectation}")
        print(f"      result:   {r.result} / {r.result_close}")
        if r.known_reason:
            print(f"      known:    {r.known_reason}")


def print_summary(results: list[CaseResult], report_dir: Path, known: dict[str, str]) -> list[CaseResult]:
    """Print counts per behavior and tables of failing cases; return the failures that count."""
    behaviors = Counter(r.behavior for r in results)
    closes = Counter(r.behavior_close for r in results)
    failing = [r for r in results if not r.passed]
    for r in failing:
        r.known_reason = known.get(r.case_id)
    tolerated = [r for r in failing if r.known_reason]
    failures = [r for r in failing if not r.known_reason]
    ran = {r.case_id for r in results}
    now_passing = sorted(
        (c for c in known if c in ran and c not in {r.case_id for r in failing}), key=case_sort_key
    )
    print(f"Autobahn fuzzingclient: {len(results)} cases, report {report_dir / 'index.html'}")
    print("  behavior:      " + ", ".join(f"{k}={v}" for k, v in sorted(behaviors.items())))
    print("  behaviorClose: " + ", ".join(f"{k}={v}" for k, v in sorted(closes.items())))
    if tolerated:
        print_failure_table(
            f"{len(tolerated)} known upstream failure(s), tolerated (see {KNOWN_FAILURES.name}):", tolerated
        )
    if failures:
        print_failure_table(f"{len(failures)} failing case(s):", failures)
    for case_id in now_passing:
        print(f"\nnote: known failure {case_id} now passes; delete it from {KNOWN_FAILURES}")
    passed = len(results) - len(failing)
    extra = f", {len(tolerated)} skipped" if tolerated else ""
    # "N passed, N failed[, N skipped]" is the conventional closing line that CI summaries read.
    print(f"\nconformance: {passed} passed, {len(failures)} failed{extra}")
    return failures


def write_summary(path: Path, results: list[CaseResult], server_rc: int | None) -> None:
    """Machine-readable summary next to the HTML report, for CI artifacts and later diffing."""
    data = {
        "cases": len(results),
        "behavior": dict(Counter(r.behavior for r in results)),
        "behaviorClose": dict(Counter(r.behavior_close for r in results)),
        "server_exit_status": server_rc,
        "failures": [r.__dict__ for r in results if not r.passed and not r.known_reason],
        "known_failures": [r.__dict__ for r in results if not r.passed and r.known_reason],
    }
    path.write_text(json.dumps(data, indent=2) + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """CLI; defaults are what `make conformance` and CI use."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument(
        "--outdir",
        type=Path,
        default=None,
        help="where spec, logs and report go (default: a new /tmp/wsfan-autobahn-* dir)",
    )
    p.add_argument(
        "--wstest",
        default=None,
        help="wstest binary (default: $WSFAN_WSTEST, else install_autobahn.sh's cached venv)",
    )
    p.add_argument(
        "--no-install",
        action="store_true",
        help="do not run install_autobahn.sh; fail if wstest is not already cached",
    )
    p.add_argument(
        "--server-python",
        default=default_server_python(),
        help="interpreter that runs `-m wsfan` (default: the repo's .venv)",
    )
    p.add_argument(
        "--max-message-size",
        type=int,
        default=None,
        help="pass --max-message-size to the server (default: the server's own default)",
    )
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra server argument, repeatable (e.g. --server-arg=--log-level=debug)",
    )
    p.add_argument("--cases", nargs="+", default=["*"], help="Autobahn case patterns (default: *)")
    p.add_argument(
        "--exclude-cases",
        nargs="*",
        default=DEFAULT_EXCLUDES,
        help=f"case patterns to skip (default: {' '.join(DEFAULT_EXCLUDES)})",
    )
    p.add_argument(
        "--known-failures",
        type=Path,
        default=KNOWN_FAILURES,
        help=f"allowlist of upstream failures with reasons (default: {KNOWN_FAILURES.name} next to this script)",
    )
    p.add_argument(
        "--strict", action="store_true", help="ignore the known-failures list: every case must pass"
    )
    p.add_argument("--timeout", type=float, default=600.0, help="wstest wall-clock limit, seconds")
    p.add_argument("--startup-timeout", type=float, default=30.0, help="server readiness limit, seconds")
    p.add_argument("--shutdown-timeout", type=float, default=20.0, help="SIGTERM-to-exit limit, seconds")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the whole pipeline; always stops the server, even when the fuzzer breaks."""
    args = parse_args(argv)
    outdir: Path = args.outdir or Path(tempfile.mkdtemp(prefix="wsfan-autobahn-", dir="/tmp"))
    outdir = outdir.resolve()
    outdir.mkdir(parents=True, exist_ok=True)
    report_dir = outdir / "report"
    log(f"output directory: {outdir}")

    try:
        known = {} if args.strict else load_known_failures(args.known_failures)
        wstest = resolve_wstest(args.wstest, install=not args.no_install)
    except (RunError, OSError) as exc:
        log(f"ERROR: {exc}")
        return EXIT_BROKEN

    server_args = list(args.server_arg)
    if args.max_message_size is not None:
        server_args += ["--max-message-size", str(args.max_message_size)]
    port = free_port()
    url = f"ws://127.0.0.1:{port}/echo"
    spec_path = outdir / "fuzzingclient.json"
    write_spec(spec_path, report_dir, url, args.cases, args.exclude_cases)

    started = time.monotonic()
    broken: str | None = None
    server_rc: int | None = None
    proc = start_server(args.server_python, port, server_args, outdir / "server.log")
    try:
        wait_for_server(proc, port, args.startup_timeout)
        log(f"server ready on {url}")
        run_wstest(wstest, spec_path, outdir, outdir / "wstest.log", args.timeout)
        if proc.poll() is not None:
            broken = f"server died during the run with status {proc.returncode} (see {outdir / 'server.log'})"
    except RunError as exc:
        broken = str(exc)
    except KeyboardInterrupt:
        broken = "interrupted"
    finally:
        alive_before_stop = proc.poll() is None
        server_rc = stop_server(proc, args.shutdown_timeout)
        if broken is None and alive_before_stop and server_rc != 0:
            broken = (
                f"server exit status after SIGTERM was {server_rc} (expected 0; see {outdir / 'server.log'})"
            )
    log(f"fuzzing + shutdown took {time.monotonic() - started:.1f}s")

    if broken is not None:
        log(f"ERROR: {broken}")
        for name in ("server.log", "wstest.log"):
            if (outdir / name).exists():
                log(f"tail of {outdir / name}:\n{tail(outdir / name)}")
        # Partial reports can still explain a crash, so show them if present.
        try:
            print_summary(load_results(report_dir), report_dir, known)
        except (RunError, ValueError, OSError):
            pass
        return EXIT_BROKEN

    try:
        results = load_results(report_dir)
    except (RunError, ValueError, OSError) as exc:
        log(f"ERROR: {exc}")
        return EXIT_BROKEN
    failures = print_summary(results, report_dir, known)
    write_summary(outdir / "summary.json", results, server_rc)
    return EXIT_NONCONFORMANT if failures else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
