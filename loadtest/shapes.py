"""Load shapes. Import a shape into a locustfile only when you want it: Locust uses
the first shape class it finds in a locustfile for every headless run.

:class:`ReconnectStorm` holds ``--storm-users`` users, then makes all of them
(``--storm-drop-ratio``) lose their connection at the same moment, and waits
until every one of them has reconnected and rejoined its rooms. The users
themselves measure it: each fires ``storm<N>:reconnect`` with the time from
its loss to its last join ack, so the Max column of that row is the time
until everybody was back, and ``storm<N>:recovered`` counts the messages
replayed by rejoining with ``since`` = the last seq seen. Compare
``--backoff full-jitter`` with ``--backoff none`` to see the herd.

Triggers (``--storm-trigger``):

* ``drop`` (default): every process aborts its users' TCP connections at once
  (what a network blip or a load-balancer restart looks like to the server);
  in a distributed run the master tells every worker with a custom message.
* ``command``: run ``--storm-command`` on the master (e.g. restart the
  server: ``systemctl restart wsfan``); users see 1001 or a reset.
* ``none``: hold the users for hold + timeout + after and let someone else
  break things (restart the server by hand); ``reconnect`` rows still measure it.

:class:`StepLoad` climbs in steps of ``--users`` / ``--step-count`` every
``--step-time``, to find where latency bends.
"""

from __future__ import annotations

import logging
import subprocess
from typing import Any

import gevent
from locust import LoadTestShape, events
from locust.env import Environment
from locust.runners import MasterRunner, WorkerRunner
from locust.stats import StatsEntry

from wsfan.loadtest.opts import settings
from wsfan.loadtest.report import COUNTERS, STORMS
from wsfan.loadtest.users import REQUEST_TYPE, drop_all

logger = logging.getLogger("loadtest")

STORM_MESSAGE = "wsfan_storm_drop"


@events.init.add_listener
def _register_storm_message(environment: Environment, runner: Any = None, **_kw: Any) -> None:
    """Workers drop their users when the master says so."""
    if isinstance(runner, WorkerRunner):

        def on_drop(environment: Environment, msg: Any, **_kw: Any) -> None:
            data = msg.data or {}
            n = drop_all(int(data.get("storm", 1)), float(data.get("ratio", 1.0)))
            logger.info("storm %s: dropped %d connections on this worker", data.get("storm"), n)

        runner.register_message(STORM_MESSAGE, on_drop)


class ReconnectStorm(LoadTestShape):
    """Ramp to N users, hold, drop them all at once, wait for everybody to rejoin; repeat."""

    def __init__(self) -> None:
        super().__init__()
        self._reset()

    def _reset(self) -> None:
        self.phase = "ramp"
        self.storm = 0
        self.until = 0.0
        self.storm_started = 0.0
        self.expected = 0
        self.baseline = 0

    def reset_time(self) -> None:
        """Locust calls this when a test (re)starts: start over from the ramp."""
        super().reset_time()
        self._reset()

    def _stats_row(self, name: str) -> Any:
        """The stats entry, or an empty one; stats.get() would add an empty row to the report."""
        assert self.runner is not None
        env = self.runner.environment
        entry = env.stats.entries.get((name, REQUEST_TYPE))
        return entry if entry is not None else StatsEntry(env.stats, name, REQUEST_TYPE)

    def _trigger(self, s: Any) -> int:
        """Start storm number ``self.storm``; return how many rejoins to wait for."""
        assert self.runner is not None
        users = self.runner.user_count
        if s.storm_trigger == "drop":
            if isinstance(self.runner, MasterRunner):
                self.runner.send_message(STORM_MESSAGE, {"storm": self.storm, "ratio": s.storm_drop_ratio})
                return round(users * s.storm_drop_ratio)
            return drop_all(self.storm, s.storm_drop_ratio)
        if s.storm_trigger == "command" and s.storm_command:
            logger.info("storm %d: running %r", self.storm, s.storm_command)
            gevent.spawn(self._run_command, s.storm_command, s.storm_timeout)
        return users

    @staticmethod
    def _run_command(command: str, timeout: float) -> None:
        try:
            done = subprocess.run(command, shell=True, timeout=timeout, capture_output=True, text=True)
            logger.info("storm command exited %d %s", done.returncode, (done.stderr or "").strip()[:200])
        except subprocess.TimeoutExpired:
            logger.warning("storm command still running after %ss", timeout)

    def _finish(self, now: float) -> None:
        row = self._stats_row(f"storm{self.storm}:reconnect")
        rec = self._stats_row(f"storm{self.storm}:recovered")
        rejoined = row.num_requests
        summary = {
            "storm": self.storm,
            "expected": self.expected,
            "rejoined": rejoined,
            "complete": rejoined >= self.expected,
            "observed_s": round(now - self.storm_started, 3),
            "all_rejoined_ms": row.max_response_time if rejoined else None,
            "median_ms": row.median_response_time if rejoined else None,
            "p95_ms": row.get_response_time_percentile(0.95) if rejoined else None,
            "rejoins_recovering": rec.num_requests,
            "messages_recovered": int(rec.total_content_length),
            "recover_failures": rec.num_failures,
            "backoff": settings(self.runner.environment).backoff if self.runner else None,
        }
        STORMS.append(summary)
        COUNTERS.set_max(f"storm{self.storm}_all_rejoined_ms_max", float(row.max_response_time or 0))
        logger.info(
            "storm %d: %d/%d users rejoined; last after %s ms (median %s, p95 %s); %d messages recovered",
            self.storm,
            rejoined,
            self.expected,
            summary["all_rejoined_ms"],
            summary["median_ms"],
            summary["p95_ms"],
            summary["messages_recovered"],
        )

    def tick(self) -> tuple[int, float] | None:
        assert self.runner is not None
        s = settings(self.runner.environment)
        n, rate = s.storm_users, s.storm_spawn_rate
        now = self.get_run_time()
        if self.phase == "ramp":
            if self.runner.user_count >= n:
                self.phase, self.until = "hold", now + s.storm_hold
        elif self.phase == "hold":
            if now >= self.until:
                self.storm += 1
                self.storm_started = now
                self.phase = "storm"
                self.until = now + s.storm_timeout
                if s.storm_trigger == "none":
                    self.expected = 0
                else:
                    self.expected = self._trigger(s)
                logger.info(
                    "storm %d: %d connections dropped (trigger %s)",
                    self.storm,
                    self.expected,
                    s.storm_trigger,
                )
        elif self.phase == "storm":
            done = (
                self.expected > 0
                and self._stats_row(f"storm{self.storm}:reconnect").num_requests >= self.expected
            )
            if done or now >= self.until:
                self._finish(now)
                self.phase, self.until = "after", now + s.storm_after
        elif self.phase == "after":
            if now >= self.until:
                if self.storm >= s.storm_drops:
                    return None
                self.phase, self.until = "hold", now + s.storm_hold
        return n, rate


class StepLoad(LoadTestShape):
    """Climb to --users in --step-count equal steps of --step-time seconds each, then stop.

    Reads --users and --spawn-rate (``use_common_options``) so it composes
    with the usual command line; one stats-history row per second makes the
    knee visible in the CSV and the HTML charts.
    """

    use_common_options = True

    def tick(self) -> tuple[int, float] | None:
        assert self.runner is not None
        opts = self.runner.environment.parsed_options
        users = int(getattr(opts, "num_users", 0) or 10)
        steps = max(1, int(getattr(opts, "step_count", 5)))
        step_time = float(getattr(opts, "step_time", 10.0))
        rate = float(getattr(opts, "spawn_rate", 0) or users)
        step = int(self.get_run_time() // step_time) + 1
        if step > steps:
            return None
        return max(1, round(users * step / steps)), rate
