"""An App that is careless with credentials, for tests/test_log_secrets.py: its exceptions quote
the request (query, Authorization, Sec-WebSocket-Protocol) and the token, as application code
written in a hurry does. The server's log must still never show a token."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

import wsfan

app = wsfan.App()


class Leak(wsfan.Message, tag="leak"):
    pass


@app.on_connect
def remember(request: wsfan.ConnectRequest) -> dict[str, Any]:
    query = request.query.decode("latin-1")
    if "crash" in parse_qs(query):
        raise ValueError(
            f"cannot serve {request.path!r}?{query} with {request.headers.get('Authorization')} "
            f"and {request.headers.get('Sec-WebSocket-Protocol')}"
        )
    return {"token": parse_qs(query).get("token", [""])[0]}


@app.before_join
def careless_join(conn: wsfan.Conn, room: str) -> bool:
    if room == "crash":
        raise RuntimeError(f"join refused for token {conn.data['token']}")
    return True


@app.message(Leak)
def leak(conn: wsfan.Conn, msg: Leak) -> None:
    raise RuntimeError(f"handler failed for ?token={conn.data['token']}")
