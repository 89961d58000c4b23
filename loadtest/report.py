"""Reports: automatic results directory, counters that Locust stats cannot hold, CPU saturation.

Why this module exists:

* Locust only writes CSV/HTML when told to. Headless runs of this load
  generator always leave a record under ``results/locust/<timestamp>/`` (CSV
  with history, HTML, Locust's JSON and our ``summary.json``) unless ``--csv``
  or ``--no-results`` says otherwise.
* Some results are totals rather than timed events (messages recovered after a
  reconnect, messages lost, duplicates, storm summaries). They are kept in
  :data:`COUNTERS`, shipped from workers to the master with Locust's regular
  worker reports, and written to ``summary.json``.
* When the load generator itself runs out of CPU, every latency it measures is
  inflated and every rate it reaches is its own limit, not the server's. Locust
  only logs that once; here each 10-second sample above 90 % also becomes a row
  ``LOADGEN cpu>90%`` in the stats (so it is in the CSV and HTML report), with
  the CPU percentage as its "response time".
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from dataclasses import asdict
from typing import Any

import gevent
from locust import events, stats
from locust.env import Environment
from locust.runners import MasterRunner, WorkerRunner

from wsfan.loadtest.hdr import LATENCIES
from wsfan.loadtest.opts import Settings, settings

logger = logging.getLogger("loadtest")

LOADGEN = "LOADGEN"
CPU_ROW = "cpu>90%"


class Counters:
    """Process-local totals; keys ending in ``_max`` aggregate by max, the others by sum."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}
        self._unsent: dict[str, float] = {}

    def add(self, key: str, n: float = 1) -> None:
        """Add ``n`` to a sum counter."""
        self.values[key] = self.values.get(key, 0) + n
        self._unsent[key] = self._unsent.get(key, 0) + n

    def set_max(self, key: str, value: float) -> None:
        """Raise a ``*_max`` counter to ``value`` if it is larger."""
        if value > self.values.get(key, float("-inf")):
            self.values[key] = value
            self._unsent[key] = value

    def drain(self) -> dict[str, float]:
        """What changed since the last report (sums as deltas, maxima as values)."""
        out, self._unsent = self._unsent, {}
        return out

    def merge(self, delta: dict[str, float]) -> None:
        """Fold a worker's report into this (the master's) counters."""
        for key, value in delta.items():
            if key.endswith("_max"):
                self.set_max(key, value)
            else:
                self.add(key, value)

    def reset(self) -> None:
        """Forget everything (new test run)."""
        self.values.clear()
        self._unsent.clear()


COUNTERS = Counters()
#: Storm summaries appended by the ReconnectStorm shape (master or local node only).
STORMS: list[dict[str, Any]] = []


class _RunRecord:
    """Where this run's files go, and the CSV writer greenlet if we started one."""

    def __init__(self) -> None:
        self.directory: str | None = None
        self.csv_prefix: str | None = None
        self.summary_path: str | None = None
        self.writer: stats.StatsCSVFileWriter | None = None
        self.writer_greenlet: gevent.Greenlet | None = None
        self.started = time.time()
        self.written = False


RUN = _RunRecord()


def _new_results_dir(root: str) -> str:
    """``<root>/<YYYYmmdd-HHMMSS>``, with a suffix if two runs start in the same second."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = os.path.join(root, stamp)
    n = 1
    while os.path.exists(path):
        n += 1
        path = os.path.join(root, f"{stamp}-{n}")
    os.makedirs(path)
    return path


@events.init.add_listener
def _on_init(environment: Environment, runner: Any = None, **_kw: Any) -> None:
    """Decide where results go; workers never write reports (the master has the aggregate)."""
    RUN.__init__()
    COUNTERS.reset()
    LATENCIES.reset()
    STORMS.clear()
    if environment.web_ui is not None:
        _extend_web_ui(environment)
    opts = environment.parsed_options
    if opts is None or isinstance(runner, WorkerRunner):
        return
    s = settings(environment)
    if opts.csv_prefix:
        RUN.directory = os.path.dirname(opts.csv_prefix) or "."
        RUN.summary_path = f"{opts.csv_prefix}_summary.json"
        return
    if s.no_results or not (opts.headless or getattr(opts, "autostart", False)):
        return
    RUN.directory = _new_results_dir(s.results_root)
    RUN.csv_prefix = os.path.join(RUN.directory, "locust")
    RUN.summary_path = os.path.join(RUN.directory, "summary.json")
    if not opts.html_file:
        opts.html_file = os.path.join(RUN.directory, "report.html")
    # Locust creates its own CSV writer before `init` fires, so start one with its public class.
    RUN.writer = stats.StatsCSVFileWriter(environment, stats.PERCENTILES_TO_REPORT, RUN.csv_prefix, True)
    RUN.writer_greenlet = gevent.spawn(RUN.writer.stats_writer)
    logger.info("Writing reports to %s/", RUN.directory)


@events.report_to_master.add_listener
def _on_report_to_master(client_id: str, data: dict[str, Any], **_kw: Any) -> None:
    data["wsfan_counters"] = COUNTERS.drain()
    data["wsfan_hdr"] = LATENCIES.drain()


@events.worker_report.add_listener
def _on_worker_report(client_id: str, data: dict[str, Any], **_kw: Any) -> None:
    delta = data.get("wsfan_counters")
    if delta:
        COUNTERS.merge(delta)
    hdr = data.get("wsfan_hdr")
    if hdr:
        LATENCIES.merge(hdr)


@events.reset_stats.add_listener
def _on_reset_stats(**_kw: Any) -> None:
    LATENCIES.reset()


HDR_TAB = "wsfan-latency"


def _extend_web_ui(environment: Environment) -> None:
    """A "Latency (µs)" tab in Locust's web UI: the HDR table, sent with every stats refresh."""
    from flask import request

    web_ui = environment.web_ui
    web_ui.template_args["extended_tabs"] = [{"title": "Latency (HDR, microseconds)", "key": HDR_TAB}]
    web_ui.template_args["extended_tables"] = [
        {
            "key": HDR_TAB,
            "structure": [
                {"key": "name", "title": "Name"},
                {"key": "count", "title": "# samples"},
                {"key": "min_us", "title": "Min (µs)"},
                {"key": "p50_us", "title": "p50 (µs)"},
                {"key": "p90_us", "title": "p90 (µs)"},
                {"key": "p99_us", "title": "p99 (µs)"},
                {"key": "p999_us", "title": "p99.9 (µs)"},
                {"key": "max_us", "title": "Max (µs)"},
            ],
        }
    ]

    @web_ui.app.after_request
    def _add_hdr_rows(response: Any) -> Any:
        if request.path != "/stats/requests" or not response.is_json:
            return response
        body = response.get_json()
        rows = []
        for r in LATENCIES.rows():
            r["p999_us"] = r.pop("p99.9_us")  # no dot in a key the web UI reads
            rows.append(r)
        body["extended_stats"] = [{"key": HDR_TAB, "data": rows}]
        response.set_data(json.dumps(body))
        return response


def evaluate_checks(environment: Environment, s: Settings) -> list[dict[str, Any]]:
    """The --check-* thresholds: one entry per check asked for, with the figure and whether it passed."""
    checks: list[dict[str, Any]] = []
    if s.check_p99_delivery_ms > 0:
        p99 = LATENCIES.percentile_ms("delivery", 99.0)
        checks.append(
            {
                "check": "p99_delivery_ms",
                "limit": s.check_p99_delivery_ms,
                "value": p99,
                "passed": p99 is not None and p99 <= s.check_p99_delivery_ms,
            }
        )
    if s.check_fail_ratio >= 0:
        total = environment.stats.total
        ratio = total.num_failures / total.num_requests if total.num_requests else 0.0
        checks.append(
            {
                "check": "fail_ratio",
                "limit": s.check_fail_ratio,
                "value": round(ratio, 6),
                "passed": ratio <= s.check_fail_ratio,
            }
        )
    if s.check_gaps >= 0:
        missing = int(COUNTERS.values.get("messages_missing", 0))
        checks.append(
            {"check": "gaps", "limit": s.check_gaps, "value": missing, "passed": missing <= s.check_gaps}
        )
    return checks


@events.test_start.add_listener
def _on_test_start(environment: Environment, **_kw: Any) -> None:
    RUN.started = time.time()


@events.cpu_warning.add_listener
def _on_cpu_warning(environment: Environment, cpu_usage: float, **_kw: Any) -> None:
    """Record a saturated load generator in the stats themselves (see module docstring)."""
    s = settings(environment)
    COUNTERS.add("cpu_warning_samples")
    COUNTERS.set_max("cpu_percent_max", float(cpu_usage))
    environment.events.request.fire(
        request_type=LOADGEN,
        name=CPU_ROW,
        response_time=float(cpu_usage),
        response_length=0,
        exception="load generator CPU above 90%: figures are limited by the generator"
        if s.cpu_warning_fails
        else None,
        context={},
    )


def _entry_summary(e: stats.StatsEntry) -> dict[str, Any]:
    return {
        "type": e.method,
        "name": e.name,
        "count": e.num_requests,
        "failures": e.num_failures,
        "rps": round(e.total_rps, 3),
        "median_ms": e.median_response_time,
        "p95_ms": e.get_response_time_percentile(0.95),
        "p99_ms": e.get_response_time_percentile(0.99),
        "max_ms": e.max_response_time,
        "avg_ms": round(e.avg_response_time, 3),
        "avg_size": round(e.avg_content_length, 1),
    }


def build_summary(environment: Environment) -> dict[str, Any]:
    """Everything a reader of the run needs besides Locust's own tables."""
    st = environment.stats
    s = settings(environment)
    opts = environment.parsed_options
    runner = environment.runner
    cpu_samples = int(COUNTERS.values.get("cpu_warning_samples", 0))
    errors = [
        {"type": e.method, "name": e.name, "error": str(e.error), "occurrences": e.occurrences}
        for e in st.errors.values()
    ]
    return {
        "host": environment.host,
        "started": RUN.started,
        "ended": time.time(),
        "duration_s": round(time.time() - RUN.started, 3),
        "user_classes": [c.__name__ for c in environment.user_classes],
        "shape": type(environment.shape_class).__name__ if environment.shape_class else None,
        "num_users": getattr(opts, "num_users", None),
        # workers seen at test start (at quit time they have already disconnected)
        "workers": s.wsfan_workers if isinstance(runner, MasterRunner) else 0,
        "settings": {k: v for k, v in asdict(s).items() if "secret" not in k and k != "token"},
        "totals": {
            "requests": st.total.num_requests,
            "failures": st.total.num_failures,
            "rps": round(st.total.total_rps, 3),
        },
        "entries": [_entry_summary(e) for e in stats.sort_stats(st.entries)],
        "errors": errors,
        "counters": dict(sorted(COUNTERS.values.items())),
        "hdr_us": LATENCIES.rows(),
        "storms": STORMS,
        "loadgen_cpu": {
            "samples_over_90": cpu_samples,
            "max_percent": COUNTERS.values.get("cpu_percent_max"),
            "saturated": cpu_samples > 0,
            "note": "if saturated, rates and latencies are limits of the load generator, not of the server",
        },
    }


#: Exit code of a run whose --check-* threshold failed (locust-plugins uses the same).
CHECK_FAILED_EXIT = 3


@events.quitting.add_listener
def _on_quitting(environment: Environment, **_kw: Any) -> None:
    """Apply the --check-* thresholds, finish the CSV files, write HDR tables, summary.json and Locust's JSON."""
    if isinstance(environment.runner, WorkerRunner) or RUN.written:
        return
    RUN.written = True
    checks = evaluate_checks(environment, settings(environment))
    for c in checks:
        logger.log(
            logging.INFO if c["passed"] else logging.ERROR,
            "check %s: %s (limit %s) %s",
            c["check"],
            c["value"],
            c["limit"],
            "passed" if c["passed"] else "FAILED",
        )
    if any(not c["passed"] for c in checks):
        environment.process_exit_code = CHECK_FAILED_EXIT
    elif any(c["check"] == "fail_ratio" for c in checks):
        # The user said how many failures are acceptable: within it, the run passes even if
        # some requests failed (Locust alone exits 1 on any failure).
        environment.process_exit_code = 0
    if RUN.summary_path is None:
        return
    # The final tables, for --csv PREFIX runs too: Locust's own writer rewrites PREFIX_stats.csv only
    # every few seconds, and a short or loaded run can end before its last write (an empty table).
    prefix = RUN.csv_prefix or getattr(environment.parsed_options, "csv_prefix", None)
    if prefix:
        if RUN.writer is not None:
            if RUN.writer_greenlet is not None:
                RUN.writer_greenlet.kill(block=True, timeout=2)
            RUN.writer.close_files()
        final = stats.StatsCSV(environment, stats.PERCENTILES_TO_REPORT)
        for suffix, method in (
            ("_stats.csv", final.requests_csv),
            ("_failures.csv", final.failures_csv),
            ("_exceptions.csv", final.exceptions_csv),
        ):
            with open(prefix + suffix, "w", newline="") as fh:
                method(csv.writer(fh))
    if RUN.writer is not None:
        # Same content as --json-file, but without stats.save_stats_json(), which resets every entry
        # (it serialises with get_stripped_report) and would zero the summary and the console table.
        serialized = [
            e.serialize() for e in environment.stats.entries.values() if e.num_requests or e.num_failures
        ]
        with open(os.path.join(RUN.directory or ".", "locust.json"), "w") as fh:
            json.dump(serialized, fh, indent=2)
    # Beside the summary: <dir>/hdr.json (automatic results directory) or <PREFIX>_hdr.json (--csv PREFIX).
    LATENCIES.write(RUN.summary_path.removesuffix("summary.json"))
    summary = build_summary(environment)
    summary["checks"] = checks
    with open(RUN.summary_path, "w") as fh:
        json.dump(summary, fh, indent=2, default=str)
    if summary["loadgen_cpu"]["saturated"]:
        logger.warning(
            "Load generator CPU was above 90%% in %d samples (max %.0f%%): add --processes or workers",
            summary["loadgen_cpu"]["samples_over_90"],
            summary["loadgen_cpu"]["max_percent"] or 0,
        )
    logger.info("Summary written to %s", RUN.summary_path)
