"""Command-line options of the load generator and the settings object users read.

Options are registered on Locust's own parser (``init_command_line_parser``),
so they work on the command line, in ``--config`` files, as ``LOCUST_*``
environment variables and in the web UI, and Locust forwards them from the
master to workers with every spawn message. Because they arrive on workers
only with that message, :func:`settings` is evaluated lazily and refreshed on
``test_start`` rather than read once at import time.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, fields
from typing import Any

from locust import events
from locust.env import Environment

BACKOFF_POLICIES = ("full-jitter", "exponential", "none")
STORM_TRIGGERS = ("drop", "command", "none")


@events.init_command_line_parser.add_listener
def _add_options(parser: Any, **_kw: Any) -> None:
    """Register every ``--ws-*``-style option (one place, so --help documents them all)."""
    a = parser.add_argument
    # connection
    a(
        "--ws-path",
        default="/ws",
        help="WebSocket path appended to --host unless the host has a path (default /ws)",
    )
    a(
        "--token",
        default="",
        is_secret=True,
        help="Static bearer token sent by every user (Authorization: Bearer)",
    )
    a(
        "--token-secret",
        default="",
        is_secret=True,
        help="HS256 secret: each user mints its own JWT (sub, exp, optional rooms claim)",
    )
    a("--token-ttl", type=float, default=3600.0, help="Lifetime of minted tokens in seconds (default 3600)")
    a(
        "--token-rooms",
        default="",
        help="Comma-separated glob patterns for the rooms claim of minted tokens (empty: no claim)",
    )
    a("--token-sub-prefix", default="lt", help="Prefix of the sub claim of minted tokens (default lt)")
    a("--msgpack", action="store_true", default=False, help="Offer the msgpack subprotocol (binary frames)")
    a(
        "--compression",
        action="store_true",
        default=False,
        help="Offer permessage-deflate (RFC 7692); what the server compresses is inflated (costs generator CPU)",
    )
    a(
        "--connect-timeout",
        type=float,
        default=10.0,
        help="TCP connect + handshake timeout in seconds (default 10)",
    )
    a(
        "--request-timeout",
        type=float,
        default=10.0,
        help="Seconds to wait for an ack/echo/pong before counting a timeout failure (default 10)",
    )
    a(
        "--insecure",
        action="store_true",
        default=False,
        help="Do not verify TLS certificates (wss:// test deployments)",
    )
    a(
        "--no-reconnect",
        action="store_true",
        default=False,
        help="Do not reconnect after the server closes a connection (default: reconnect and rejoin with since)",
    )
    a(
        "--backoff",
        choices=BACKOFF_POLICIES,
        default="full-jitter",
        help="Reconnect backoff: full-jitter = uniform(0, min(cap, base*2^n)); exponential = no jitter; "
        "none = first retry at once, then every base seconds in lockstep (default full-jitter)",
    )
    a("--backoff-base", type=float, default=0.1, help="Backoff base delay in seconds (default 0.1)")
    a("--backoff-cap", type=float, default=5.0, help="Backoff cap in seconds (default 5)")
    # chat
    a(
        "--rooms",
        type=int,
        default=0,
        help="Spread chat users round-robin over exactly N rooms (default 0: rooms of --room-size, filled in order)",
    )
    a(
        "--room-size",
        type=int,
        default=10,
        help="Chat users per room when --rooms is 0: users 0..S-1 share the first room, and so on, so rooms "
        "have S members at any user count (default 10)",
    )
    a("--rooms-per-user", type=int, default=1, help="Rooms each chat user joins (default 1)")
    a("--room-prefix", default="lt", help="Room name prefix (default lt -> lt-0, lt-1, ...)")
    a(
        "--presence-namespace",
        default="",
        help="Put the chat rooms in this server namespace (rooms NS:lt-0, ...); start the server with "
        "--namespaces NS:presence=true,join_leave=true so that joined/left events and presence are on",
    )
    a(
        "--churn-interval",
        type=float,
        default=0.0,
        help="Every N seconds each chat user leaves and rejoins its first room (and asks presence_stats "
        "with --presence-namespace): the others' joined/left event latency is reported (default 0: off)",
    )
    a(
        "--publish-rate",
        type=float,
        default=1.0,
        help="Publishes per second per publishing chat user (default 1)",
    )
    a(
        "--publisher-ratio",
        type=float,
        default=1.0,
        help="Fraction of chat users that publish; the others only listen (default 1.0)",
    )
    a("--payload-size", type=int, default=64, help="Approximate encoded payload size in bytes (default 64)")
    a(
        "--no-publish-ack",
        action="store_true",
        default=False,
        help="Publish without an id: no ack round trip is measured, the server sends nothing back unless on error",
    )
    # echo
    a("--echo-rate", type=float, default=1.0, help="Echo requests per second per echo user (default 1)")
    a(
        "--echo-path",
        default="",
        help="Use this path (e.g. /echo, the raw echo endpoint) instead of an echo message on --ws-path",
    )
    # idle
    a(
        "--app-ping-interval",
        type=float,
        default=0.0,
        help="Idle users send an app-level ping every N seconds and measure the pong (default 0: never)",
    )
    # slow consumer simulation
    a(
        "--recv-delay-ms",
        type=float,
        default=0.0,
        help="Sleep this long after each received message: simulates a slow consumer; chat publishers "
        "are exempt, so combine with --publisher-ratio (default 0)",
    )
    a(
        "--recv-buffer",
        type=int,
        default=0,
        help="SO_RCVBUF in bytes for user sockets (default 0: OS default)",
    )
    # reconnection storm shape
    a("--storm-users", type=int, default=20, help="ReconnectStorm shape: users to hold (default 20)")
    a("--storm-spawn-rate", type=float, default=50.0, help="ReconnectStorm shape: spawn rate (default 50/s)")
    a(
        "--storm-hold",
        type=float,
        default=5.0,
        help="ReconnectStorm shape: seconds to hold before each drop (default 5)",
    )
    a("--storm-drops", type=int, default=1, help="ReconnectStorm shape: number of storms (default 1)")
    a(
        "--storm-drop-ratio",
        type=float,
        default=1.0,
        help="ReconnectStorm shape: fraction of connections dropped; the rest keep publishing (default 1.0)",
    )
    a(
        "--storm-timeout",
        type=float,
        default=30.0,
        help="ReconnectStorm shape: max seconds to wait for everybody to rejoin (default 30)",
    )
    a(
        "--storm-after",
        type=float,
        default=3.0,
        help="ReconnectStorm shape: seconds to hold after a storm (default 3)",
    )
    a(
        "--storm-trigger",
        choices=STORM_TRIGGERS,
        default="drop",
        help="drop: abort every TCP connection on the load generator; command: run --storm-command "
        "(e.g. restart the server); none: wait for an external event (default drop)",
    )
    a("--storm-command", default="", help="Shell command run on the master/local node when a storm starts")
    a("--step-count", type=int, default=5, help="StepLoad shape: number of steps up to --users (default 5)")
    a("--step-time", type=float, default=10.0, help="StepLoad shape: seconds per step (default 10)")
    # reporting
    a(
        "--results-root",
        default="results/locust",
        help="Headless runs without --csv write CSV, HTML, JSON and summary.json to <root>/<timestamp>/ "
        "(default results/locust)",
    )
    a("--no-results", action="store_true", default=False, help="Do not write the automatic results directory")
    # pass/fail thresholds (locust-plugins' --check-* habit): a failed check sets exit code 3
    a(
        "--check-p99-delivery-ms",
        type=float,
        default=0.0,
        help="Fail the run (exit 3) if the HDR p99 of live deliveries is above this many ms, or if there "
        "were no deliveries (default 0: no check)",
    )
    a(
        "--check-fail-ratio",
        type=float,
        default=-1.0,
        help="Fail the run (exit 3) if failures / requests is above this ratio, e.g. 0.01 (default -1: no check)",
    )
    a(
        "--check-gaps",
        type=int,
        default=-1,
        help="Fail the run (exit 3) if more than this many room messages never arrived (default -1: no check)",
    )
    a(
        "--cpu-warning-fails",
        action="store_true",
        default=False,
        help="Count load-generator CPU > 90%% samples as failures (default: recorded as a LOADGEN stats row)",
    )


@dataclass(slots=True)
class Settings:
    """Typed view of the options, with defaults usable when Locust has no parsed options (library use)."""

    ws_path: str = "/ws"
    token: str = ""
    token_secret: str = ""
    token_ttl: float = 3600.0
    token_rooms: str = ""
    token_sub_prefix: str = "lt"
    msgpack: bool = False
    compression: bool = False
    connect_timeout: float = 10.0
    request_timeout: float = 10.0
    insecure: bool = False
    no_reconnect: bool = False
    backoff: str = "full-jitter"
    backoff_base: float = 0.1
    backoff_cap: float = 5.0
    rooms: int = 0
    room_size: int = 10
    rooms_per_user: int = 1
    room_prefix: str = "lt"
    presence_namespace: str = ""
    churn_interval: float = 0.0
    publish_rate: float = 1.0
    publisher_ratio: float = 1.0
    payload_size: int = 64
    no_publish_ack: bool = False
    echo_rate: float = 1.0
    echo_path: str = ""
    app_ping_interval: float = 0.0
    recv_delay_ms: float = 0.0
    recv_buffer: int = 0
    storm_users: int = 20
    storm_spawn_rate: float = 50.0
    storm_hold: float = 5.0
    storm_drops: int = 1
    storm_drop_ratio: float = 1.0
    storm_timeout: float = 30.0
    storm_after: float = 3.0
    storm_trigger: str = "drop"
    storm_command: str = ""
    step_count: int = 5
    step_time: float = 10.0
    results_root: str = "results/locust"
    no_results: bool = False
    cpu_warning_fails: bool = False
    check_p99_delivery_ms: float = 0.0
    check_fail_ratio: float = -1.0
    check_gaps: int = -1
    # filled in by the master (or local runner) at test start and forwarded to workers
    wsfan_workers: int = 1

    @classmethod
    def from_options(cls, options: argparse.Namespace | None) -> Settings:
        """Copy every known field from Locust's parsed options, keeping defaults for the missing ones."""
        s = cls()
        if options is not None:
            for f in fields(cls):
                if hasattr(options, f.name):
                    value = getattr(options, f.name)
                    if value is not None:
                        setattr(s, f.name, value)
        return s

    # ---------------------------------------------------------------- derived
    def rooms_for(self, chat_index: int) -> list[str]:
        """Rooms of the ``chat_index``-th chat user (counted over every worker).

        With --rooms N: round-robin over N rooms. Otherwise rooms of --room-size are filled
        in order, which needs no total user count and gives every room several members
        whatever -u is (round-robin over a fixed 10 rooms left 7 chat users alone in 7 rooms).
        """
        k = max(1, self.rooms_per_user)
        prefix = (
            f"{self.presence_namespace}:{self.room_prefix}" if self.presence_namespace else self.room_prefix
        )
        if self.rooms > 0:
            count = self.rooms
            k = min(k, count)
            base = chat_index % count
            return [f"{prefix}-{(base + j) % count}" for j in range(k)]
        base = chat_index // max(1, self.room_size)
        return [f"{prefix}-{base + j}" for j in range(k)]

    def is_publisher(self, global_index: int) -> bool:
        """Spread publishers evenly (Bresenham) instead of randomly, so small runs are predictable."""
        r = min(1.0, max(0.0, self.publisher_ratio))
        return math.floor((global_index + 1) * r) > math.floor(global_index * r)

    def backoff_delay(self, attempt: int, rng: Any) -> float:
        """Delay before reconnect attempt ``attempt`` (0 = first retry after a loss)."""
        if self.backoff == "none":
            return 0.0 if attempt == 0 else self.backoff_base
        ceiling = min(self.backoff_cap, self.backoff_base * (2.0 ** min(attempt, 30)))
        if self.backoff == "exponential":
            return ceiling
        return rng.uniform(0.0, ceiling)

    def bearer(self, sub: str) -> str:
        """The token for one user: minted when a secret is set, else the static one (may be empty)."""
        if self.token_secret:
            import jwt  # PyJWT; imported lazily so runs without auth do not need it

            claims: dict[str, Any] = {"sub": sub, "exp": int(time.time() + self.token_ttl)}
            if self.token_rooms:
                claims["rooms"] = [p.strip() for p in self.token_rooms.split(",") if p.strip()]
            return jwt.encode(claims, self.token_secret, algorithm="HS256")
        return self.token


_cache: dict[int, Settings] = {}


def settings(environment: Environment) -> Settings:
    """Settings of this environment, built on first use and refreshed at each test start."""
    s = _cache.get(id(environment))
    if s is None:
        s = _cache[id(environment)] = Settings.from_options(environment.parsed_options)
    return s


@events.test_start.add_listener
def _refresh(environment: Environment, **_kw: Any) -> None:
    """Rebuild settings at test start: workers receive the master's options only with the spawn message.

    On the master (or a local runner) also record the number of workers, so that
    workers can compute a global user index; Locust forwards this extra attribute
    with the spawn message.
    """
    opts = environment.parsed_options
    runner = environment.runner
    if opts is not None and runner is not None and type(runner).__name__ in ("MasterRunner", "LocalRunner"):
        opts.wsfan_workers = max(1, int(getattr(runner, "worker_count", 1) or 1))
    _cache[id(environment)] = Settings.from_options(opts)


def main() -> None:
    """Print the load generator's options: ``python -m wsfan.loadtest.opts``.

    Locust prints ``--help`` before it imports the locustfile, so options added
    by a locustfile never appear there; this is the place to read them.
    """
    from locust.argument_parser import LocustArgumentParser

    parser = LocustArgumentParser(
        prog="locust -f loadtest/scenarios/<scenario>.py [Locust options]",
        description="Options of the wsfan load generator (besides Locust's own: locust --help).",
    )
    _add_options(parser)
    parser.print_help()


if __name__ == "__main__":
    main()
