"""``ServerProcess``: a real ``python -m wsfan`` child process on a free 127.0.0.1 port.

Tests drive a subprocess rather than an in-process server because what they check
is what a client sees: a server that really goes away (SIGKILL), drains (SIGTERM),
freezes with its socket open (SIGSTOP) or comes back on the same port with empty
history. The log is kept so a failing test can show it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from helpers.ports import free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[2]


class ServerProcess:
    """``python -m wsfan --host 127.0.0.1 --port <port> *args``; ``start()`` returns once the port accepts
    (and the ``--http-port`` and ``--metrics-port`` ones, when given)."""

    def __init__(
        self,
        *args: str,
        port: int | None = None,
        env: dict[str, str] | None = None,
        nofile: int | tuple[int, int] | None = None,
    ) -> None:
        self.nofile = nofile  # RLIMIT_NOFILE of the server process, when given: both limits, or (soft, hard)
        self.port = port or free_port()
        self.args = ["--host", "127.0.0.1", "--port", str(self.port), *args]
        self.env = {**os.environ, **(env or {})}
        self.log = tempfile.NamedTemporaryFile(prefix="wsfan-server-", suffix=".log", delete=False)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The pub/sub endpoint, ``ws://127.0.0.1:<port>/ws``."""
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def host(self) -> str:
        """``ws://127.0.0.1:<port>``, the form Locust's ``--host`` takes."""
        return f"ws://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> ServerProcess:
        """Spawn (again, on the same port, after a kill or stop) and wait until it listens."""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wsfan", *self.args],
            cwd=ROOT,
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=None if self.nofile is None else self._limit_fds,
        )
        try:
            wait_for_port(self.port, timeout=timeout, proc=self.proc)
            for flag in ("--http-port", "--metrics-port"):  # they listen a moment after the WebSocket port
                if flag in self.args:
                    wait_for_port(int(self.args[self.args.index(flag) + 1]), timeout=timeout, proc=self.proc)
        except (RuntimeError, TimeoutError) as exc:
            self.kill()
            raise RuntimeError(f"server did not start: {exc}\n{self.output()[-4000:]}") from None
        return self

    def _limit_fds(self) -> None:
        import resource

        limits = self.nofile if isinstance(self.nofile, tuple) else (self.nofile, self.nofile)
        assert limits[0] is not None
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)

    def _signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait: the exit code of a graceful shutdown (``TimeoutExpired`` if it hangs)."""
        assert self.proc is not None, "server was never started"
        self.resume()  # a stopped process cannot act on SIGTERM
        self._signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        """Die like a crashed node: no close frames, history lost."""
        if self.proc is not None and self.proc.poll() is None:
            self.resume()  # a stopped process cannot be reaped otherwise
            self.proc.kill()
            self.proc.wait(10)

    def pause(self) -> None:
        """SIGSTOP: the socket stays open and nothing answers."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        self._signal(signal.SIGCONT)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        """Everything the server logged so far (stdout and stderr)."""
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def metric(self, name: str, http_port: int | None = None) -> float:
        """One unlabelled value from ``GET /metrics`` (0.0 if absent)."""
        url = f"http://127.0.0.1:{http_port or self.port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(name + " ") or line.startswith(name + "{"):
                    return float(line.rsplit(" ", 1)[1])
        return 0.0

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.kill()
        self.log.close()
        os.unlink(self.log.name)
