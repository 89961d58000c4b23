"""No token, key or credential in the server's log, whatever path a request takes (README: log
lines name the reason and the peer, "never the token or key").

A real server process at ``--log-level debug`` (every line the server can write), serving
tests/apps/leaky.py, whose exceptions quote the request and the token; every path that can see a
request target, a header, a query or a body is driven with a token in it: refused and failing
upgrades (``?token=``, ``Authorization``, ``Sec-WebSocket-Protocol``), a malformed head on both
ports, HTTP refusals (SSE, presence, the server API), application hooks and handlers that fail
with the token in their text. The log is then searched for every part of every token.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import jwt
import pytest
from test_app_api import ENV

from helpers.ports import free_port, wait_for_port
from helpers.rawws import RawWS, http_request, send_head, upgrade_head
from helpers.servers import ServerProcess

SECRET = "log-secrets-test-secret-0123456789abcdef"
ADMIN = "admin-key-never-in-the-log-0123456789"
HOST = "127.0.0.1"


def token(sub: str = "ann", secret: str = SECRET, **claims: Any) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time()) + 600, **claims}, secret, algorithm="HS256")


def secret_parts(tok: str) -> list[str]:
    """What of a token must not be logged: the whole, its claims part and its signature."""
    _, claims, signature = tok.split(".")
    return [tok, claims, signature]


def raw_http(port: int, head: bytes) -> bytes:
    """Send a request head as given; whatever comes back (the server closes after an error)."""
    with socket.create_connection((HOST, port), timeout=5) as sock:
        sock.sendall(head)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_no_token_reaches_the_log_on_any_path(make_server: type[ServerProcess], log_format: str) -> None:
    http_port = free_port()
    srv = make_server(
        "--app", "apps.leaky:app", "--jwt-secret", SECRET, "--admin-key", ADMIN,
        "--http-port", str(http_port), "--log-level", "debug", "--log-format", log_format,
        "--presence", env=ENV,
    ).start()  # fmt: skip
    wait_for_port(http_port)
    good = token(rooms=["r*", "crash"])
    forged = token(secret="not-the-servers-secret-0123456789abcdef")
    narrow = token("bob", rooms=["mine"])

    # Upgrades: an on_connect hook that fails quoting the query, Authorization and subprotocol.
    for path, extra in (
        (f"/ws?token={good}&crash=1", []),
        ("/ws?crash=1", [("Authorization", f"Bearer {good}")]),
        (f"/ws?crash=1&token={good}", [("Sec-WebSocket-Protocol", f"msgpack, {good}")]),
    ):
        status, _, body = send_head(HOST, srv.port, upgrade_head(path, extra=extra))
        assert status == 500 and body == b"internal server error\n"
        assert good.encode() not in body
    # Refused upgrades: a forged token in each place a token can ride.
    for path, extra in (
        (f"/ws?token={forged}", []),
        ("/ws", [("Authorization", f"Bearer {forged}")]),
        (f"/ws?token={forged}&token={good}", []),
    ):
        status, _, body = send_head(HOST, srv.port, upgrade_head(path, extra=extra))
        assert status in (400, 401), (status, body)
    # A malformed head with the token in its request line, on both ports.
    raw_http(srv.port, f"GET /ws?token={good} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
    raw_http(http_port, f"GET /sse?room=r&token={good} HTTP/1.1\r\nHost: x\r\nBad\x01: y\r\n\r\n".encode())
    raw_http(http_port, f"GET /sse?room=r&token={good} HTTP/1.1\nHost: x\n\n".encode())
    # HTTP refusals: SSE and presence with a bad or too narrow token, the server API with a wrong key.
    assert http_request(HOST, http_port, f"/sse?room=r&token={forged}")[0] == 401
    assert http_request(HOST, http_port, f"/presence?room=r1&token={narrow}")[0] == 403
    assert (
        http_request(HOST, http_port, "/presence?room=r1", headers={"Authorization": f"Bearer {forged}"})[0]
        == 401
    )
    assert (
        http_request(
            HOST, http_port, f"/history?room=r1&token={good}", headers={"Authorization": "Bearer " + good}
        )[0]
        == 401
    )
    # A connected client whose application code fails with the token in its text.
    ws = RawWS.connect(HOST, srv.port, path=f"/ws?token={good}")
    ws.recv_message()  # welcome
    ws.send_text(b'{"type":"leak","id":"1"}')
    assert b"INTERNAL" in ws.recv_message()[1]
    ws.send_text(b'{"type":"join","id":"2","room":"crash"}')
    assert b"INTERNAL" in ws.recv_message()[1]
    ws.send_close()
    ws.close()

    assert srv.stop() == 0
    out = srv.output()
    for tok in (good, forged, narrow):
        for part in secret_parts(tok):
            assert part not in out, f"a token reached the log:\n{out[-3000:]}"
    for secret in (ADMIN, SECRET):
        assert secret not in out
    # The paths were taken (and logged, without the secret):
    assert "on_connect hook failed on /ws?token=<redacted>&crash=<redacted>" in out, out[-3000:]
    assert "handler failed for ?token=<redacted>" in out or "handler failed for ?token=\\u003credacted" in out
    assert "join refused for token <redacted>" in out


def test_a_failing_on_connect_is_a_fixed_500_logged_once_a_second(make_server: type[ServerProcess]) -> None:
    """An on_connect hook that raises (not ``wsfan.Error``) answers 500 ``internal server error``
    (never the exception's text) and logs its traceback at most once a second: a client that can
    make it fail cannot flood the log (hostile finding 01: one ERROR traceback per request)."""
    srv = make_server("--app", "apps.leaky:app", env=ENV).start()
    for _ in range(20):
        status, _, body = send_head(HOST, srv.port, upgrade_head("/ws?crash=1"))
        assert (status, body) == (500, b"internal server error\n")
    assert srv.stop() == 0
    out = srv.output()
    assert 1 <= out.count("Traceback") <= 2, out[-3000:]
    assert "cannot serve" in out  # the application's own text is for the operator, in the log


def test_failing_application_code_is_logged_once_a_second_per_kind(make_server: type[ServerProcess]) -> None:
    """A handler or before_join hook that raises on a client's message answers INTERNAL every time,
    and its traceback is logged at most once a second per kind (``logs.APP_FAILURES``): a client
    sending such messages cannot flood the log (before: one ERROR traceback per message)."""
    srv = make_server("--app", "apps.leaky:app", "--rate-limit", "0", env=ENV).start()
    ws = RawWS.connect(HOST, srv.port, path="/ws?token=t")
    ws.recv_message()  # welcome
    for i in range(20):
        ws.send_text(b'{"type":"leak","id":"%d"}' % i)
        ws.send_text(b'{"type":"join","id":"j%d","room":"crash"}' % i)
    replies = [ws.recv_message()[1] for _ in range(40)]
    assert all(b'"code":"INTERNAL"' in r for r in replies), replies[:2]
    ws.send_close()
    ws.close()
    assert srv.stop() == 0
    out = srv.output()
    assert out.count("handler for Leak failed") <= 2 and out.count("before_join hook") <= 2, out[-3000:]
    assert 2 <= out.count("Traceback") <= 4, out[-3000:]
