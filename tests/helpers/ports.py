"""Loopback ports: ask the kernel for a free one, and wait until something listens on one."""

from __future__ import annotations

import socket
import subprocess
import time


def free_port() -> int:
    """An unused TCP port on 127.0.0.1 (tiny race until the caller binds it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """True if a TCP connect to ``host:port`` succeeds within 0.2 s."""
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def wait_for_port(port: int, timeout: float = 10.0, proc: subprocess.Popen | None = None) -> None:
    """Return once ``127.0.0.1:port`` accepts TCP connections (the server's readiness signal).

    Raises ``RuntimeError`` if ``proc`` exits first, ``TimeoutError`` after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while not port_open(port):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")
        time.sleep(0.02)
