"""The opening handshake (RFC 6455 §4.2.1, §4.2.2, §11.3) and the request-header rules of the WebSocket port.

Requests are sent byte for byte with tests/helpers/rawws.py, because client libraries refuse to
send most of them (two keys, a bad version, no Host). Each rule is documented in
docs/protocol-choices.md, "Handshake".
"""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from picows import WSUpgradeRequest

from helpers.rawws import RawWS, accept_key, send_head, upgrade_head
from helpers.servers import ServerProcess
from wsfan.server.app import Node
from wsfan.server.config import Settings
from wsfan.server.handshake import BARE_LF, Refusal, check_request_head

HOST = "127.0.0.1"
KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 §1.3's sample: the base64 of 16 bytes


@pytest.fixture(scope="module")
def srv():
    s = ServerProcess("--echo-endpoint", "--rate-limit", "0").start()
    yield s
    s.kill()


def exchange(srv: ServerProcess, head: bytes) -> tuple[int, dict[str, str], bytes]:
    return send_head(HOST, srv.port, head)


# ---------------------------------------------------------------- what must be accepted


@pytest.mark.parametrize("path", ["/ws", "/echo"])
@pytest.mark.parametrize(
    "connection",
    [
        [("Connection", "keep-alive, Upgrade")],  # older Firefox, some proxies and HTTP libraries
        [("Connection", "Upgrade, keep-alive")],
        [("Connection", "upgrade")],
        [("Connection", "keep-alive,UPGRADE")],
        [("Connection", "keep-alive"), ("Connection", "Upgrade")],  # two lines are one list (RFC 7230 §3.2.2)
    ],
)
def test_connection_header_containing_the_upgrade_token_is_accepted(srv, path, connection):
    status, headers, _ = exchange(srv, upgrade_head(path, key=KEY, drop=("connection",), extra=connection))
    assert status == 101
    assert headers["sec-websocket-accept"] == accept_key(KEY)


@pytest.mark.parametrize("upgrade", ["WebSocket", "h2c, websocket", "websocket, foo/2"])
def test_upgrade_header_containing_the_websocket_token_is_accepted(srv, upgrade):
    status, _, _ = exchange(srv, upgrade_head(key=KEY, drop=("upgrade",), extra=[("Upgrade", upgrade)]))
    assert status == 101


def test_subprotocols_on_several_header_lines_are_one_list(srv):
    """§11.3.4: repeated Sec-WebSocket-Protocol lines are the same as one line with all values."""
    extra = [("Sec-WebSocket-Protocol", "chat"), ("Sec-WebSocket-Protocol", "superchat, msgpack")]
    status, headers, _ = exchange(srv, upgrade_head(key=KEY, extra=extra))
    assert status == 101
    assert headers["sec-websocket-protocol"] == "msgpack"


def test_absolute_form_request_uri_is_accepted(srv):
    """§4.1: the Request-URI may be the absolute http(s) URI of the resource (as a proxy forwards it)."""
    target = f"http://{HOST}:{srv.port}/ws"
    status, headers, _ = exchange(srv, upgrade_head(target, key=KEY))
    assert status == 101 and headers["sec-websocket-accept"] == accept_key(KEY)
    status, _, body = exchange(
        srv, f"GET http://{HOST}:{srv.port}/healthz HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    )
    assert (status, body) == (200, b"ok\n")


def test_a_connection_accepted_with_a_list_header_works(srv):
    with RawWS.connect(HOST, srv.port, headers={"Connection": "keep-alive, Upgrade"}) as ws:
        kind, data = ws.recv_message()
        assert b'"welcome"' in data


# ---------------------------------------------------------------- what must be refused, and how

REFUSALS = [
    # (case, head, status, response header that must be present)
    ("two different keys", dict(extra=[("Sec-WebSocket-Key", "AAAAAAAAAAAAAAAAAAAAAA==")]), 400, None),
    ("the same key twice", dict(extra=[("Sec-WebSocket-Key", KEY)]), 400, None),
    ("no key", dict(drop=("sec-websocket-key",)), 400, None),
    ("key of 15 bytes", dict(drop=("sec-websocket-key",), extra=[("Sec-WebSocket-Key", "AAAAAAAAAAAAAAAAAAAA")]), 400, None),
    ("key not base64", dict(drop=("sec-websocket-key",), extra=[("Sec-WebSocket-Key", "!" * 24)]), 400, None),
    ("key with non-ASCII", dict(drop=("sec-websocket-key",), extra=[("Sec-WebSocket-Key", b"\xc3\xa9" * 12)]), 400, None),
    ("version 8", dict(drop=("sec-websocket-version",), extra=[("Sec-WebSocket-Version", "8")]), 426, "sec-websocket-version"),
    ("version 7", dict(drop=("sec-websocket-version",), extra=[("Sec-WebSocket-Version", "7")]), 426, "sec-websocket-version"),
    ("no version", dict(drop=("sec-websocket-version",)), 426, "sec-websocket-version"),
    ("version twice", dict(extra=[("Sec-WebSocket-Version", "13")]), 400, None),
    ("version non-ASCII digits", dict(drop=("sec-websocket-version",), extra=[("Sec-WebSocket-Version", "١٣".encode())]), 426, "sec-websocket-version"),
    ("no Host", dict(drop=("host",)), 400, None),
    ("two Hosts", dict(extra=[("Host", "example.com")]), 400, None),
    ("Host with non-ASCII", dict(drop=("host",), extra=[("Host", b"caf\xc3\xa9")]), 400, None),
    ("Upgrade to another protocol", dict(drop=("upgrade",), extra=[("Upgrade", "h2c")]), 400, None),
    ("no Upgrade at all", dict(drop=("upgrade", "connection")), 426, "upgrade"),
    ("Connection without Upgrade", dict(drop=("connection",), extra=[("Connection", "keep-alive")]), 400, None),
    ("no Connection", dict(drop=("connection",)), 400, None),
    ("subprotocol not a token", dict(extra=[("Sec-WebSocket-Protocol", "a b")]), 400, None),
    ("subprotocol not ASCII", dict(extra=[("Sec-WebSocket-Protocol", "msgpack, caf\xe9".encode())]), 400, None),
    ("two Origins", dict(extra=[("Origin", "https://a.example"), ("Origin", "https://b.example")]), 400, None),
]  # fmt: skip


@pytest.mark.parametrize("path", ["/ws", "/echo"])
@pytest.mark.parametrize("case, kw, status, header", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_handshake_rules_are_answered_as_the_rfc_says(srv, path, case, kw, status, header):
    got, headers, body = exchange(srv, upgrade_head(path, **kw))
    assert got == status, body
    if header == "sec-websocket-version":
        assert headers[header] == "13"  # §4.2.2: the versions the server understands
    elif header == "upgrade":
        assert headers[header].lower() == "websocket"  # RFC 7231 §6.5.15: 426 names the protocol
    # A short sentence of ours, never an exception's text.
    assert body.endswith(b"\n") and len(body) < 100
    assert b"Error" not in body and b"b'" not in body


def test_refusals_change_nothing(srv):
    """After every refusal the server still accepts a valid upgrade and serves it."""
    for _, kw, _, _ in REFUSALS:
        exchange(srv, upgrade_head(**kw))
    with RawWS.connect(HOST, srv.port) as ws:
        ws.send_text('{"type":"ping","id":"p"}')
        assert b'"pong"' in ws.recv_message()[1] or b'"pong"' in ws.recv_message()[1]


def test_plain_gets_need_a_host_too(srv):
    status, _, body = exchange(srv, b"GET /healthz HTTP/1.1\r\n\r\n")
    assert status == 400 and body == b"missing Host header\n"
    status, _, body = exchange(srv, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200 and body == b"ok\n"


# ---------------------------------------------------------------- what picows' parser would refuse

BARE_LF_BODY = BARE_LF.encode() + b"\n"
TARGET_BODY = b"malformed request target: visible ASCII only (RFC 3986, RFC 9112 section 3.2)\n"

HEAD_REFUSALS = [
    ("POST", b"POST /ws HTTP/1.1\r\nHost: x\r\n\r\n", 405, b"only GET is served on this port\n"),
    ("HTTP/1.0", b"GET /ws HTTP/1.0\r\nHost: x\r\n\r\n", 400, b"HTTP/1.1 is required\n"),
    ("request line of 4 parts", b"GET /ws x HTTP/1.1\r\nHost: x\r\n\r\n", 400, b"malformed request line\n"),
    ("control character", b"GET /ws HTTP/1.1\r\nHost: x\r\nX: a\x01b\r\n\r\n", 400, b"control character in a header value\n"),
    ("line folding", b"GET /ws HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n\r\n", 400, b"obsolete header line folding\n"),
    ("header name not a token", b"GET /ws HTTP/1.1\r\nHost: x\r\nX Y: 1\r\n\r\n", 400, b"malformed header line\n"),
    ("header line without colon", b"GET /ws HTTP/1.1\r\nHost: x\r\nnocolon\r\n\r\n", 400, b"malformed header line\n"),
    ("Transfer-Encoding", b"GET /ws HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", 400, b"a request body is not accepted here\n"),
    ("a body", b"GET /ws HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello", 400, b"a request body is not accepted here\n"),
    ("129 header lines", b"GET /ws HTTP/1.1\r\nHost: x\r\n" + b"X: 1\r\n" * 128 + b"\r\n", 431, b"more than 128 header fields\n"),
    ("head past 16 KiB", b"GET /ws HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 17000, 431, b"request head larger than 16 KiB\n"),
    # RFC 9112 §3.2: the target is visible ASCII (before: these were routed, and answered 404).
    ("NUL in the target", upgrade_head("/ws\x00"), 400, TARGET_BODY),
    ("DEL in the target", upgrade_head("/ws\x7f"), 400, TARGET_BODY),
    ("CR in the target", upgrade_head("/ws\r"), 400, TARGET_BODY),
    ("raw byte above 0x7F in the query", b"GET /ws?token=\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n", 400, TARGET_BODY),
    # RFC 9112 §2.2: a bare LF as a line end is refused with a sentence, never a silent close.
    ("bare LF everywhere", upgrade_head(key=KEY).replace(b"\r\n", b"\n"), 400, BARE_LF_BODY),
    ("bare LF, plain GET", b"GET /healthz HTTP/1.1\nHost: x\n\n", 400, BARE_LF_BODY),
    ("bare LF after the request line", b"GET /ws HTTP/1.1\nHost: x\r\n\r\n", 400, BARE_LF_BODY),
    ("bare LF after a header line", b"GET /ws HTTP/1.1\r\nHost: x\nX: 1\r\n\r\n", 400, BARE_LF_BODY),
    ("head ended by LF CRLF", b"GET /ws HTTP/1.1\r\nHost: x\n\r\n", 400, BARE_LF_BODY),
    ("head ended by CRLF LF", b"GET /ws HTTP/1.1\r\nHost: x\r\n\n", 400, BARE_LF_BODY),
]  # fmt: skip


@pytest.mark.parametrize("case, head, status, body", HEAD_REFUSALS, ids=[c[0] for c in HEAD_REFUSALS])
def test_unparseable_requests_get_a_fixed_sentence_not_the_parsers_text(srv, case, head, status, body):
    """picows would answer these with its parser's exception text, which quotes the request back."""
    got, headers, reply = exchange(srv, head)
    assert (got, reply) == (status, body)
    if status == 405:
        assert headers["allow"] == "GET"


@settings(max_examples=300)
@given(data=st.data())
def test_any_bare_lf_in_a_good_head_is_refused_by_name(data):
    """Any valid head, with any of its CRLFs (one or more, request line or header lines) cut to LF:
    400 with BARE_LF, whatever else the head holds (before: a silent close, or another sentence)."""
    fields = st.tuples(st.sampled_from(["X-A", "Origin", "Cookie"]), st.text("abc ,;=", max_size=8))
    head = upgrade_head(key=KEY, extra=data.draw(st.lists(fields, max_size=4)))
    head = head[: -len(b"\r\n\r\n")]  # check_request_head takes the head without the blank line
    assert check_request_head(head) is None
    ends = [i for i in range(len(head)) if head.startswith(b"\r\n", i)]
    cut = sorted(data.draw(st.sets(st.sampled_from(ends), min_size=1)))
    bad = b"".join(head[i:j] for i, j in _pieces(len(head), cut))
    assert check_request_head(bad) == Refusal(400, BARE_LF)


@settings(max_examples=300)
@given(target=st.binary(min_size=1, max_size=24).filter(lambda b: b" " not in b and b"\n" not in b))
def test_a_target_passes_the_head_check_exactly_when_it_is_visible_ascii(target):
    """RFC 9112 §3.2: any target bytes; the head is refused (400, our sentence) unless every byte is
    visible ASCII."""
    got = check_request_head(b"GET " + target + b" HTTP/1.1\r\nHost: x")
    if all(0x21 <= c <= 0x7E for c in target):
        assert got is None
    else:
        assert got == Refusal(400, TARGET_BODY.decode().rstrip("\n"))


def _pieces(n: int, cuts: list[int]) -> list[tuple[int, int]]:
    """Spans of a head of ``n`` bytes that skip the CR at each of ``cuts``."""
    spans, start = [], 0
    for c in cuts:
        spans.append((start, c))
        start = c + 1
    spans.append((start, n))
    return spans


def test_a_bare_lf_is_refused_before_the_head_is_complete(srv):
    """A client that ends its lines with LF and never sends the blank line (a head that can never
    complete: no CRLF CRLF will come) gets the 400 at once, not a silent close at --request-timeout
    (5 s here, past send_head's 3 s)."""
    status, _, body = exchange(srv, b"GET /ws HTTP/1.1\nHost: x\n")
    assert (status, body) == (400, BARE_LF_BODY)


# RFC 9112 §2.2: a server SHOULD ignore at least one empty line (CRLF) before the request-line.
LEADING = [b"\r\n", b"\r\n" * 3]


@pytest.mark.parametrize("lead", LEADING, ids=["one CRLF", "three CRLFs"])
@pytest.mark.parametrize("path", ["/ws", "/echo"])
def test_empty_lines_before_the_request_line_are_skipped_on_an_upgrade(srv, lead, path):
    """Before: 400 'malformed request line'. The 101 and the welcome follow as without them."""
    status, headers, body = exchange(srv, lead + upgrade_head(path, key=KEY))
    assert status == 101 and headers["sec-websocket-accept"] == accept_key(KEY)
    if path == "/ws":
        assert b'"welcome"' in body


@pytest.mark.parametrize("lead", LEADING, ids=["one CRLF", "three CRLFs"])
def test_empty_lines_before_the_request_line_are_skipped_on_a_plain_get(srv, lead):
    assert exchange(srv, lead + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")[::2] == (200, b"ok\n")


def test_empty_lines_arriving_apart_from_the_request_line_are_skipped(srv):
    """Each CRLF in a read of its own (a head accumulated over reads), then the upgrade."""
    import socket

    with socket.create_connection((HOST, srv.port), timeout=3) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for piece in (b"\r", b"\n", b"\r\n", upgrade_head(key=KEY)):
            sock.sendall(piece)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
    assert data.startswith(b"HTTP/1.1 101"), data[:200]


@pytest.mark.parametrize(
    "head, status, body",
    [
        (b"\n" + upgrade_head(key=KEY), 400, BARE_LF_BODY),
        (b"\r\n\n" + upgrade_head(key=KEY), 400, BARE_LF_BODY),
        (b"\r\n" * 8200, 431, b"request head larger than 16 KiB\n"),
    ],
    ids=["a bare LF first", "CRLF then a bare LF", "16 KiB of empty lines"],
)
def test_what_is_not_an_empty_line_before_the_request_line_is_still_refused(srv, head, status, body):
    """Only CRLF is an empty line (a bare LF is BARE_LF); empty lines count towards the 16 KiB head."""
    assert exchange(srv, head)[::2] == (status, body)


def test_a_first_frame_in_the_same_packet_as_the_head_is_not_lost(srv):
    """The head check hands every byte after the head to picows: here a ping sent with the upgrade."""
    import socket

    from helpers.rawws import TEXT, build_frame

    with socket.create_connection((HOST, srv.port), timeout=3) as sock:
        sock.sendall(upgrade_head(key=KEY) + build_frame(TEXT, b'{"type":"ping","id":"p"}'))
        data = b""
        while b'"pong"' not in data:
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
    assert data.startswith(b"HTTP/1.1 101")


@pytest.mark.parametrize(
    ("extra", "subprotocol"),
    [
        ([], None),
        ([("Sec-WebSocket-Protocol", "msgpack")], "msgpack"),
        ([("Sec-WebSocket-Protocol", "x, msgpack")], "msgpack"),
    ],
)
def test_the_101_is_picows_bytes_and_the_welcome_follows_in_the_same_write(srv, extra, subprotocol):
    """The 101 is built once per header set (handshake.SwitchingProtocols) with the welcome in its write:
    the head is byte for byte what picows' create_101_response + to_bytes would send, then the frame."""
    import socket

    from picows import WSUpgradeResponse

    from wsfan.server.wire import MSGPACK_SUBPROTOCOL

    expected = WSUpgradeResponse.create_101_response(
        {"Sec-WebSocket-Protocol": subprotocol} if subprotocol else None
    )
    expected.headers["Sec-WebSocket-Accept"] = accept_key(KEY)
    with socket.create_connection((HOST, srv.port), timeout=3) as sock:
        sock.sendall(upgrade_head(key=KEY, extra=extra))
        data = b""
        while True:
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
            head, sep, rest = data.partition(b"\r\n\r\n")
            if sep and len(rest) >= 2 and len(rest) >= 2 + rest[1]:
                break
    assert head + sep == bytes(expected.to_bytes())
    opcode = rest[0] & 0x0F
    assert opcode == (2 if subprotocol == MSGPACK_SUBPROTOCOL else 1)
    if opcode == 1:
        assert b'"type":"welcome"' in rest[2 : 2 + rest[1]]
    else:
        assert b"welcome" in rest[2 : 2 + rest[1]]


# ---------------------------------------------------------------- nothing escapes the listener factory


async def test_an_exception_in_routing_is_a_fixed_500_not_its_text(caplog):
    """picows answers an exception from the listener factory with 500 and the exception's text;
    route() must never let one through. A request picows could not produce (headers None) forces one."""
    node = Node(Settings(port=1))
    request = WSUpgradeRequest()
    request.method = b"GET"
    request.path = b"/ws"
    request.version = b"HTTP/1.1"
    request.headers = None
    reply = node.route(request)
    assert reply.response.status == 500
    assert reply.response.body == b"internal server error\n"
    assert reply.listener is None
    assert "error while routing" in caplog.text
    await asyncio.sleep(0)


# ---------------------------------------------------------------- the handshake timeout (slowloris)


def test_websocket_port_drops_a_silent_or_trickling_request(make_server):
    """--request-timeout bounds the whole request head: nothing sent, or one header line at a time."""
    import socket
    import time

    srv = make_server("--request-timeout", "1").start()
    silent = socket.create_connection((HOST, srv.port))
    trickle = socket.create_connection((HOST, srv.port))
    started = time.monotonic()
    lines = upgrade_head().split(b"\r\n")[:-2]
    trickle.settimeout(0.25)
    eof_at = None
    for i in range(40):  # one header line every 0.25 s, never the blank line
        try:
            trickle.sendall(lines[i % len(lines)] + b"\r\n" if i else lines[0] + b"\r\n")
            if trickle.recv(1024) == b"":
                eof_at = time.monotonic()
                break
        except TimeoutError:
            continue
        except OSError:
            eof_at = time.monotonic()
            break
    assert eof_at is not None and eof_at - started < 3.0
    silent.settimeout(3.0)
    assert silent.recv(1024) == b""
    silent.close()
    trickle.close()


@settings(max_examples=500)
@given(
    st.lists(st.text(alphabet=" \t,aAbBeEgGkKoOpPrRsStTuUwW-", max_size=30), max_size=3),
    st.sampled_from(["websocket", "upgrade"]),
)
def test_the_one_line_token_check_agrees_with_the_list_rule(values: list[str], token: str) -> None:
    """has_token's shortcut for one line without a comma says what the RFC 7230 §7 list rule says."""
    from wsfan.server.handshake import has_token, list_elements

    assert has_token(values, token) == (token in (e.lower() for e in list_elements(values)))
