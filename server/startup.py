"""Checks made before a node or a supervisor starts.

A problem the operator can fix (a taken port, a broker URL that cannot be
parsed, the redis extra not installed) is reported as one line that says what
to do, and the command exits with 2 (the usage-error code of argparse and of
most Unix tools), instead of a traceback from deep inside the event loop or from
every worker in turn.
"""

from __future__ import annotations

import errno
import socket

from wsfan.server.config import Settings
from wsfan.server.keys import KeyProblem, load_public_key

EXIT_USAGE = 2


class StartupError(Exception):
    """A one-line, operator-facing reason not to start; ``__main__`` prints it and exits with 2.

    ``detail`` (may be empty) is printed after the line: the traceback of an application module
    that raised while it was imported (its own frames; every frame at ``--log-level debug``).
    """

    def __init__(self, line: str, detail: str = "") -> None:
        super().__init__(line)
        self.detail = detail


def preflight(settings: Settings) -> None:
    """Raise ``StartupError`` for the first problem found, before anything is started or forked."""
    if settings.broker:
        check_broker(settings.broker)
    if settings.jwt_public_key:
        try:
            load_public_key(settings.jwt_public_key)
        except KeyProblem as exc:
            raise StartupError(str(exc)) from None
    if settings.app:
        from wsfan.server import application

        try:
            application.load(settings.app)
        except application.AppImportFailed as exc:
            raise StartupError(str(exc), exc.traceback(full=settings.log_level.lower() == "debug")) from None
        except ValueError as exc:
            raise StartupError(str(exc)) from None
    check_port(settings.host, settings.port, "--port")
    if settings.http_port:
        check_port(settings.host, settings.http_port, "--http-port")
    if settings.metrics_port:
        check_port(settings.metrics_host or settings.host, settings.metrics_port, "--metrics-port")


def check_broker(url: str) -> None:
    """The redis extra is installed and redis-py can parse the URL (it connects later, with retries)."""
    try:
        from redis.asyncio.connection import parse_url
    except ImportError:
        raise StartupError("--broker needs the redis extra: pip install 'wsfan[redis]'") from None
    for scheme in ("redis+cluster://", "redis+sentinel://"):
        if url.startswith(scheme):
            # Each seed or sentinel is a plain Redis address; config.validate has checked the list.
            url = "redis://" + url[len(scheme) :].split(",", 1)[0].split("/", 1)[0]
    try:
        parse_url(url)
    except ValueError as exc:
        # redis-py's own words about the URL (e.g. "Port could not be cast to integer value as 'x'").
        raise StartupError(
            f"--broker {redact(url)}: {exc}; expected redis://[:password@]host:port/db"
        ) from None


def check_port(host: str, port: int, flag: str) -> None:
    """Bind and release ``host:port`` as the server will (SO_REUSEADDR on), to report a taken port up front.

    The check is deliberately without SO_REUSEPORT: a second wsfan started on the port of a
    running one must be refused, not silently share its connections.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        raise StartupError(f"--host {host!r} is not a name or address of this machine") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as exc:
            raise StartupError(bind_problem(host, port, flag, exc)) from None


def bind_problem(host: str, port: int, flag: str, exc: OSError) -> str:
    """What to do about a failed bind, in one line."""
    if exc.errno == errno.EADDRINUSE:
        return f"{host}:{port} is already in use: stop the process that holds it or choose another {flag}"
    if exc.errno == errno.EACCES:
        return f"no permission to listen on {host}:{port}: ports below 1024 need privileges; choose another {flag}"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"--host {host!r} is not an address of this machine"
    return f"cannot listen on {host}:{port} ({exc.strerror or exc}); check --host and {flag}"


def redact(url: str) -> str:
    """A broker URL without its password, for messages and logs."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, where = rest.rpartition("@")
    user = creds.partition(":")[0]
    return f"{scheme}://{user}:***@{where}" if ":" in creds else f"{scheme}://***@{where}"
