"""Logs an operator can use, and nothing internal or secret in them or in any reply.

- ``--log-format json``: every line is one JSON object with the documented fields (conn, user,
  room, code, remote, worker/pid, reason, event), not only a message.
- Refused upgrades and requests (401/403/503) and bad admin keys are logged with the reason and
  the peer's address, never the token or the key (the tests grep for them).
- Client-caused closes (1002, 1007, 1009, 4029) are INFO, not ERROR.
- Replies never carry an exception's text, a library's error text or the Redis address:
  UNAVAILABLE over WebSocket, the admin publish 503, schema errors, token errors.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

import aiohttp
import jwt
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers.peers import PicowsPeer
from helpers.ports import free_port, wait_for_port
from helpers.rawws import CLOSE, RSV1, HandshakeFailed, RawWS, build_frame, close_payload
from helpers.redis_server import RedisServer, require_redis
from helpers.servers import ServerProcess
from helpers.waiting import wait_until
from wsfan.server.broker import UNAVAILABLE_TEXT
from wsfan.server.protocol import FIELD_RULES, Codec, DecodeFailure, Encoding

SECRET = "log-test-secret-that-is-long-enough-for-hs256"
ADMIN = "admin-key-that-must-never-be-logged"
WRONG_ADMIN = "wrong-admin-key-also-never-logged"
HOST = "127.0.0.1"


def token(sub: str = "alice", secret: str = SECRET, ttl: float = 600) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time() + ttl)}, secret, algorithm="HS256")


def json_lines(output: str) -> list[dict[str, Any]]:
    """Every line of the server's log as JSON; a line that is not one fails the test."""
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines, "the server logged nothing"
    return [json.loads(line) for line in lines]


def find(records: list[dict[str, Any]], **want: Any) -> dict[str, Any]:
    for r in records:
        if all(r.get(k) == v for k, v in want.items()):
            return r
    raise AssertionError(f"no log record with {want}; got:\n" + "\n".join(map(json.dumps, records)))


@pytest.fixture
def json_server(make_server: type[ServerProcess]) -> ServerProcess:
    http_port = free_port()
    srv = make_server(
        "--log-format", "json", "--jwt-secret", SECRET, "--admin-key", ADMIN, "--http-port", str(http_port),
        "--max-message-size", "1024", "--rate-limit", "5", "--rate-burst", "1", "--rate-abuse-strikes", "2",
    )  # fmt: skip
    srv.http = f"http://{HOST}:{http_port}"
    srv.start()
    wait_for_port(http_port)
    return srv


def closed_by_server(ws: RawWS) -> int | None:
    code, _ = ws.expect_close()
    ws.close()
    return code


async def test_json_logs_have_fields_and_no_secret(json_server: ServerProcess) -> None:
    srv = json_server
    good, forged = token(), token(secret="not-the-servers-secret-but-long-enough")

    # A refused upgrade: 401 with the reason, logged with the peer's address.
    with pytest.raises(HandshakeFailed) as refused:
        RawWS.connect(HOST, srv.port, headers={"Authorization": f"Bearer {forged}"})
    assert refused.value.status == 401

    # Client-caused closes, each on a connection of user alice.
    local_ports = {}
    for code, frame in (
        (1009, build_frame(0x1, b"x" * 1000, fin=False) + build_frame(0x0, b"x" * 1000)),
        (1007, build_frame(0x1, b"\xff\xfe")),
        (1002, build_frame(0x1, b"{}", rsv=RSV1)),
    ):
        ws = RawWS.connect(HOST, srv.port, headers={"Authorization": f"Bearer {good}"})
        ws.recv_message()  # welcome
        local_ports[code] = ws.sock.getsockname()[1]
        ws.send_raw(frame)
        assert closed_by_server(ws) == code
    # Frames picows refuses itself (one over the limit, an unmasked one): logged by us, INFO, with
    # the connection's fields (picows' own line had neither conn nor remote).
    picows_ports = {}
    for code, frame in ((1009, build_frame(0x1, b"x" * 2000)), (1002, build_frame(0x1, b"{}", mask=False))):
        ws = RawWS.connect(HOST, srv.port, headers={"Authorization": f"Bearer {good}"})
        ws.recv_message()
        picows_ports[code] = ws.sock.getsockname()[1]
        ws.send_raw(frame)
        assert closed_by_server(ws) == code
    # 4029: still over the rate limit after the refusals allowed.
    ws = RawWS.connect(HOST, srv.port, path=f"/ws?token={good}")
    ws.recv_message()
    local_ports[4029] = ws.sock.getsockname()[1]
    for _ in range(10):
        ws.send_raw(build_frame(0x1, b'{"type":"ping"}'))
    while (frame := ws.recv_frame()).opcode != CLOSE:
        pass
    assert frame.close_info()[0] == 4029
    ws.send_raw(build_frame(CLOSE, close_payload(4029)))
    ws.close()

    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{srv.http}/publish",
            json={"room": "r", "payload": 1},
            headers={"Authorization": f"Bearer {WRONG_ADMIN}"},
        ) as r:
            assert r.status == 401
        async with http.post(
            f"{srv.http}/publish",
            json={"room": "r", "payload": 1},
            headers={"Authorization": f"Bearer {ADMIN}"},
        ) as r:
            assert r.status == 200
        async with http.get(f"{srv.http}/sse", params={"room": "r", "token": forged}) as r:
            assert r.status == 401

    assert srv.stop() == 0
    out = srv.output()
    for secret in (good, forged, ADMIN, WRONG_ADMIN, SECRET):
        assert secret not in out, "a token, key or secret reached the log"
    records = json_lines(out)
    for r in records:
        assert {"ts", "level", "logger", "msg", "pid"} <= r.keys(), r
        assert r["level"] != "error", f"nothing here is the server's fault: {r}"

    upgrade = find(records, event="upgrade_refused", code=401)
    assert upgrade["level"] == "info" and upgrade["reason"] == "unauthorized: bad token signature"
    assert re.fullmatch(r"127\.0\.0\.1:\d+", upgrade["remote"]), upgrade
    for code, port in local_ports.items():
        close = find(records, code=code, remote=f"{HOST}:{port}")
        assert close["level"] == "info" and close["user"] == "alice" and close["conn"], close
    for code, port in picows_ports.items():
        fault = find(records, code=code, remote=f"{HOST}:{port}")
        assert fault["level"] == "info" and fault["conn"] and fault["user"] == "alice" and fault["reason"], (
            fault
        )
        assert fault["conn"] in fault["msg"] and "WSCloseCode" not in fault["msg"], fault
    unmasked = find(records, event="peer_protocol_error", code=1002)
    assert unmasked["remote"] == f"{HOST}:{picows_ports[1002]}", unmasked
    assert unmasked["reason"] == "client frames must be masked", unmasked
    assert not [r for r in records if "WS parser error" in r["msg"]], "picows' line without conn and remote"
    admin = find(records, event="http_refused", path="/publish")
    assert admin["level"] == "warning" and admin["code"] == 401 and admin["remote"].startswith(f"{HOST}:")
    assert admin["reason"] == "missing or wrong admin key"
    sse = find(records, event="http_refused", path="/sse")
    assert sse["level"] == "info" and sse["room"] == "r" and sse["reason"] == "bad token signature"


async def test_a_flood_of_refusals_is_one_line_a_second(json_server: ServerProcess) -> None:
    srv = json_server
    forged = token(secret="not-the-servers-secret-but-long-enough")
    for _ in range(5):
        with pytest.raises(HandshakeFailed):
            RawWS.connect(HOST, srv.port, path=f"/ws?token={forged}")
    await asyncio.sleep(1.05)  # the throttle's window is a second of real time
    with pytest.raises(HandshakeFailed):
        RawWS.connect(HOST, srv.port, path=f"/ws?token={forged}")
    assert srv.stop() == 0
    refused = [r for r in json_lines(srv.output()) if r.get("event") == "upgrade_refused"]
    assert len(refused) == 2, refused
    assert "suppressed" not in refused[0] and refused[1]["suppressed"] == 4


async def test_worker_lines_name_their_worker_and_pid(redis_server: RedisServer, make_server) -> None:
    srv = make_server("--workers", "2", "--broker", redis_server.url, "--log-format", "json").start()
    wait_until(lambda: srv.output().count('"listening on') >= 2, 10)
    assert srv.stop() == 0
    listening = [r for r in json_lines(srv.output()) if r["msg"].startswith("listening on")]
    assert sorted(r["worker"] for r in listening) == [0, 1]
    assert len({r["pid"] for r in listening}) == 2 and srv.proc.pid not in {r["pid"] for r in listening}


# ---------------------------------------------------------------- nothing internal reaches a client

INTERNAL = re.compile(r"127\.0\.0\.1|:\d{2,5}\b|redis|errno|Error|Connect|refused|\[Errno", re.IGNORECASE)


@pytest.mark.parametrize("how", ["never_up", "lost"])
async def test_broker_down_tells_clients_only_unavailable(how: str, make_server) -> None:
    if how == "lost":
        redis = RedisServer(require_redis()).start()
        url = redis.url
    else:
        redis, url = None, f"redis://127.0.0.1:{free_port()}/0"
    http_port = free_port()
    srv = make_server(
        "--broker", url, "--admin-key", ADMIN, "--http-port", str(http_port), "--namespaces", "chat:presence=true"
    ).start()  # fmt: skip
    wait_for_port(http_port)
    try:
        c = await PicowsPeer.connect(srv.url)
        if redis is not None:
            assert (await c.request("join", room="before"))["type"] == "ack"
            redis.stop()
        messages = []
        requests = [
            ("join", {"room": "r"}),
            ("presence", {"room": "chat:x"}),
            ("presence_stats", {"room": "chat:x"}),
        ]
        if redis is not None:  # publishing needs a joined room: the one joined while Redis was up
            requests.append(("publish", {"room": "before", "payload": 1}))
        for kind, request in requests:
            err = await c.request(kind, **request)
            assert err["code"] == "UNAVAILABLE", err
            messages.append(err["message"])
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"http://{HOST}:{http_port}/publish",
                json={"room": "r", "payload": 1},
                headers={"Authorization": f"Bearer {ADMIN}"},
            ) as r:
                assert r.status == 503 and r.headers["Retry-After"] == "1"
                messages.append((await r.json())["error"])
            for path in ("presence", "presence_stats"):
                async with http.get(
                    f"http://{HOST}:{http_port}/{path}",
                    params={"room": "chat:x"},
                    headers={"Authorization": f"Bearer {ADMIN}"},
                ) as r:
                    assert r.status == 503, await r.text()
                    messages.append((await r.json())["error"])
        await c.close()
    finally:
        if redis is not None:
            redis.stop()
    assert messages == [UNAVAILABLE_TEXT] * (len(requests) + 3), "WebSocket replies, admin publish, presence"
    assert not INTERNAL.search(UNAVAILABLE_TEXT)
    assert srv.stop() == 0
    assert url.rsplit(":", 1)[1].split("/")[0] in srv.output(), "the address is in the log, for the operator"


async def test_admin_publish_errors_are_our_words(json_server: ServerProcess) -> None:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN}"}) as http:
        for body, expected in (
            (b"{not json", "not parseable as JSON"),
            (b'{"room": "bad room", "payload": 1}', FIELD_RULES["room"]),
            (b'{"payload": 1}', "missing field 'room'"),
            (b"[1, 2]", "must be a JSON object"),
            (
                b'{"room": "r", "payload": "' + b"x" * 4000 + b'"}',
                "body larger than 2048 bytes (--max-message-size 1024 + 1024",
            ),
        ):
            async with http.post(f"{json_server.http}/publish", data=body) as r:
                assert r.status in (400, 413)
                error = (await r.json())["error"]
            assert expected in error, error
            assert "`" not in error and "Expected" not in error and "Maximum request body" not in error


# Our templates, and nothing else, for a message msgspec refuses.
OURS = re.compile(
    r"not parseable as (JSON|MSGPACK)|missing field '\w+'|invalid value for '\w+'"
    r"|the message must be a (JSON|MSGPACK) object \(map\) with a 'type' field|"
    + "|".join(re.escape(v) for v in FIELD_RULES.values())
    + r"|unknown message type .*"
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
messages = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["join", "leave", "publish", "echo", "ping"]) | json_values,
        "room": st.sampled_from(["ok", "bad room", "r\n"]) | json_values,
        "since": json_values,
        "epoch": json_values,
        "id": json_values,
        "payload": json_values,
    },
)


CODECS = {e: Codec(e) for e in (Encoding.JSON, Encoding.MSGPACK)}


@settings(max_examples=300, deadline=None)
@given(msg=messages | json_values, encoding=st.sampled_from([Encoding.JSON, Encoding.MSGPACK]))
def test_schema_errors_are_always_our_words(msg: Any, encoding: Encoding) -> None:
    codec = CODECS[encoding]
    data = msgspec.json.encode(msg) if encoding is Encoding.JSON else msgspec.msgpack.encode(msg)
    try:
        codec.decode(data)
    except DecodeFailure as failure:
        assert OURS.fullmatch(failure.message), failure.message


@pytest.mark.parametrize("data", [b"{", b"\xff", b'{"type": "join", "room": 1}x'])
def test_unparseable_input_is_our_words(data: bytes) -> None:
    with pytest.raises(DecodeFailure) as failure:
        Codec(Encoding.JSON).decode(data)
    assert failure.value.message == "not parseable as JSON"


@pytest.mark.parametrize("admin", [False, True])
def test_the_startup_lines_list_what_answers_where(make_server: type[ServerProcess], admin: bool) -> None:
    """With --metrics-port, /metrics is on the metrics listener (its own line), not on --http-port
    (whose line listed it, answering 404 there); without --admin-key the server API is off (404)
    and not listed either. Every path a line lists answers something else than 404."""
    http_port, metrics_port = free_port(), free_port()
    flags = ["--http-port", str(http_port), "--metrics-port", str(metrics_port), "--log-format", "json"]
    srv = make_server(*flags, *(["--admin-key", ADMIN] if admin else [])).start()
    wait_for_port(http_port)
    wait_for_port(metrics_port)

    async def status(url: str) -> int:
        async with aiohttp.ClientSession() as http:
            method = (
                "POST"
                if url.rsplit("/", 1)[1] in ("publish", "broadcast", "disconnect", "unsubscribe")
                else "GET"
            )
            async with http.request(
                method, url, headers={"Authorization": f"Bearer {ADMIN}"}, data=b"{}"
            ) as r:
                return r.status

    try:
        time.sleep(0.3)
        records = json_lines(srv.output())
        lines = {r["msg"].split(" on ", 1)[0]: r["msg"] for r in records if " on http" in r["msg"]}
        listed = {
            "HTTP endpoints": (http_port, lines["HTTP endpoints"]),
            "metrics": (metrics_port, lines["metrics"]),
        }
        for port, line in listed.values():
            assert f"http://{HOST}:{port} (" in line, line
            for path in line.rsplit("(", 1)[1].rstrip(")").split():
                if path == "/sse":
                    continue  # a stream: answered 400 without ?room=, checked below
                assert asyncio.run(status(f"http://{HOST}:{port}{path}")) != 404, (path, line)
        http_line = listed["HTTP endpoints"][1]
        assert "/metrics" not in http_line and "/healthz" in http_line and "/sse" in http_line
        assert ("/publish" in http_line) is admin and ("/rooms" in http_line) is admin
        assert asyncio.run(status(f"http://{HOST}:{http_port}/sse")) == 400
        assert asyncio.run(status(f"http://{HOST}:{metrics_port}/metrics")) == 200
    finally:
        assert srv.stop() == 0
