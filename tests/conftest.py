"""Fixtures: a real server process on a free port. The tools themselves live in tests/helpers/."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

# tests/ on sys.path: test files import the helpers package as ``helpers``.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers.servers import ServerProcess  # noqa: E402

# No per-example deadline anywhere: on a loaded 2-core CI machine a slow example is not a bug, and
# Hypothesis's default 200 ms deadline turned load into flaky failures. Example counts stay per test.
settings.register_profile("wsfan", deadline=None)
settings.load_profile("wsfan")


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    """One server per test module, with the echo endpoint and no rate limit (rate tests start their own)."""
    srv = ServerProcess("--echo-endpoint", "--rate-limit", "0").start()
    yield srv
    srv.kill()


@pytest.fixture
def make_server() -> Iterator[type[ServerProcess]]:
    """Start servers with test-specific flags; all are killed at the end of the test."""
    started: list[ServerProcess] = []

    class _Tracked(ServerProcess):
        def start(self, timeout: float = 15.0) -> ServerProcess:
            started.append(self)
            return super().start(timeout)

    yield _Tracked
    for srv in started:
        srv.kill()


@pytest.fixture
def redis_server() -> Iterator[object]:
    """A private redis-server (``helpers.redis_server.RedisServer``) the test may kill and restart.

    Skips with an install hint where redis-server is missing (fails under WSFAN_REQUIRE_REDIS=1).
    """
    from helpers.redis_server import running_redis

    yield from running_redis()
