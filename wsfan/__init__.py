"""wsfan: a fast pub/sub WebSocket server (picows + uvloop + msgspec), its clients and its load tools.

One importable name over the repository's folders (``pyproject.toml`` maps them):

- ``wsfan.server``   the server (``wsfan`` / ``python -m wsfan``)
- ``wsfan.client``   the asyncio client (``from wsfan.client import connect``)
- ``wsfan.loadtest`` Locust users and scenarios (extra ``loadtest``)
- ``wsfan.bench``    the benchmark suite (extra ``bench``)

and the application API (docs/app-api.md), imported on first use of the name:
``wsfan.App``, ``wsfan.Message``, ``wsfan.Error``, ``wsfan.Conn``, ``wsfan.ConnectRequest``,
``wsfan.BrokerUnavailable``, and what ``before_join``/``before_publish`` hooks return:
``wsfan.Join``, ``wsfan.Publish`` (``wsfan.KEEP``: the payload unchanged).

Importing ``wsfan`` itself is cheap: nothing below is imported until it is used.
"""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("wsfan")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

from typing import Any

_APP_NAMES = frozenset(
    {"App", "Message", "Error", "Conn", "ConnectRequest", "BrokerUnavailable", "Join", "Publish", "KEEP"}
)


def __getattr__(name: str) -> Any:
    if name in _APP_NAMES:
        from wsfan.server import application

        return getattr(application, name)
    raise AttributeError(f"module 'wsfan' has no attribute {name!r}")


__all__ = [
    "KEEP",
    "App",
    "BrokerUnavailable",
    "Conn",
    "ConnectRequest",
    "Error",
    "Join",
    "Message",
    "Publish",
    "__version__",
]
