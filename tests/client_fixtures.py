"""Helpers for tests/test_client.py: a real server process that can be paused, killed and restarted.

The client's reconnect behaviour is only worth testing against a server that
really goes away (SIGKILL), comes back on the same port with empty history, or
freezes (SIGSTOP) with its socket still open, so these helpers drive a
subprocess rather than an in-process server.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import free_port
from wsfan.client import Client, Message

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["ServerProcess", "free_port", "hold_reconnects", "run", "take", "until"]


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class ServerProcess:
    """``python -m wsfan`` on 127.0.0.1:<port>; ``start()`` returns once the port accepts connections."""

    def __init__(self, *flags: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.flags = flags
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tempfile.NamedTemporaryFile(prefix="wsfan-client-test-", suffix=".log", delete=False)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self, timeout: float = 15.0) -> ServerProcess:
        cmd = [sys.executable, "-m", "wsfan", "--host", "127.0.0.1", "--port", str(self.port), *self.flags]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not port_open(self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.output()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"server did not open port {self.port}: {self.output()}")
            time.sleep(0.05)
        return self

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")[-4000:]

    def _signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def pause(self) -> None:
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def kill(self) -> None:
        """Die like a crashed node: no close frames, history lost."""
        if self.proc is None:
            return
        self.resume()  # a stopped process cannot be reaped otherwise
        self._signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc = None

    def terminate(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        self._signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        self.proc = None
        return code

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.kill()
        self.log.close()
        os.unlink(self.log.name)


def run(coro: Any, timeout: float = 30.0) -> Any:
    """Run one async test body with a hard timeout, so a hung await fails instead of stalling the suite."""

    async def bounded() -> Any:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


async def until(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.01) -> None:
    """Poll ``predicate`` on the running loop until true, else ``TimeoutError``."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(interval)


async def take(stream: Any, n: int, timeout: float) -> list[Message]:
    """Up to ``n`` messages from ``stream``, fewer if it stays quiet ``timeout`` s: a failing test shows what came."""
    got: list[Message] = []
    try:
        while len(got) < n:
            got.append(await stream.get(timeout))
    except TimeoutError:
        pass
    return got


def hold_reconnects(client: Client, gate: asyncio.Event) -> None:
    """``client``'s reconnect attempts wait for ``gate``: the test decides when it comes back."""
    sleep = client.reconnector.sleep

    async def held(delay: float) -> None:
        await gate.wait()
        await sleep(delay)

    client.reconnector.sleep = held
