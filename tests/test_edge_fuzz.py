"""Property tests (Hypothesis) of what a client controls before it is a connection: the request head.

Any header set on the WebSocket port is answered 101 or a 4xx (or 200/404 for a plain GET),
never a 5xx, and the listener factory never raises. Any query string and headers on
``GET /sse`` are a 200 stream or a 4xx. In process, the pieces they rest on are checked
over far more inputs: :func:`check_upgrade`, :meth:`Authenticator.verify`,
:func:`token_from_request`, :func:`parse_seq`.

Examples are bounded (max_examples) and each one is a fresh TCP connection to one real
server, so the module takes a few seconds.
"""

from __future__ import annotations

import socket
import time

import jwt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from helpers.ports import free_port, wait_for_port
from helpers.rawws import send_head
from helpers.servers import ServerProcess
from wsfan.server.auth import Authenticator, AuthError, Identity, token_from_request
from wsfan.server.handshake import Refusal, Upgrade, _check_header_lines, check_request_head, check_upgrade
from wsfan.server.wire import SEQ_MAX, parse_seq

HOST = "127.0.0.1"
SECRET = "fuzz-secret-that-is-long-enough-for-hs256!!"
KEY = "dGhlIHNhbXBsZSBub25jZQ=="
GOOD = jwt.encode({"sub": "fuzz", "exp": int(time.time()) + 7 * 24 * 3600}, SECRET, algorithm="HS256")

NAMES = [
    "Host", "Upgrade", "Connection", "Sec-WebSocket-Key", "Sec-WebSocket-Version",
    "Sec-WebSocket-Protocol", "Sec-WebSocket-Extensions", "Sec-WebSocket-Extensions", "Origin", "Authorization",
    "Content-Length", "Transfer-Encoding", "Last-Event-ID", "Cookie", "X-Other",
]  # fmt: skip
VALUES = [
    "websocket", "Upgrade", "keep-alive, Upgrade", "upgrade, upgrade", KEY, "13", "8", "", " ",
    "msgpack", "msgpack, chat", "https://good.example", "null", f"Bearer {GOOD}", "Bearer café",
    "0", "1", "²", "127.0.0.1", "a" * 300,
    # RFC 7692 offers, good and bad (the fuzz server runs with --compression)
    "permessage-deflate; client_max_window_bits", "permessage-deflate; server_max_window_bits=²",
    "permessage-deflate; server_max_window_bits=99", "permessage-deflate; server_no_context_takeover=1",
    "permessage-deflate; client_max_window_bits=\"10\"", "x-webkit-deflate-frame, permessage-deflate;;",
]  # fmt: skip
# Any bytes but CR and LF inside a value (those would end the line): control characters, NUL,
# bytes above 0x7F, invalid UTF-8 all stay in.
raw_value = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
value = st.one_of(
    st.sampled_from(VALUES).map(str.encode),
    raw_value,
    raw_value.map(lambda b: b"Bearer " + b),  # what a token looks like to the parsers, then anything
)
name = st.one_of(
    st.sampled_from(NAMES),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz-_!#", min_size=1, max_size=12),
).map(str.encode)
field = st.tuples(name, value)
path = st.sampled_from(
    [
        b"/ws",
        b"/echo",
        b"/ws?token=" + GOOD.encode(),
        b"/ws?token=%ff&token=",
        b"/healthz",
        b"/metrics",
        b"/x",
    ]
)
BASE = [
    (b"Host", b"127.0.0.1"),
    (b"Upgrade", b"websocket"),
    (b"Connection", b"Upgrade"),
    (b"Sec-WebSocket-Key", KEY.encode()),
    (b"Sec-WebSocket-Version", b"13"),
    (b"Authorization", b"Bearer " + GOOD.encode()),
]


@st.composite
def mutated(draw: st.DrawFn, base: list[tuple[bytes, bytes]], values: st.SearchStrategy[bytes]) -> list:
    """Each base field kept, dropped, given another value, or sent twice; then arbitrary fields; shuffled."""
    fields: list[tuple[bytes, bytes]] = []
    for key, val in base:
        action = draw(st.sampled_from(["keep", "keep", "drop", "replace", "repeat"]))
        if action == "keep":
            fields.append((key, val))
        elif action == "replace":
            fields.append((key, draw(values)))
        elif action == "repeat":
            fields += [(key, val), (key, draw(values))]
    fields += draw(st.lists(st.tuples(name, values), max_size=4))
    return list(draw(st.permutations(fields)))


@st.composite
def request_heads(draw: st.DrawFn) -> bytes:
    """A GET of some path whose headers are a mutation of a valid upgrade's."""
    lines = [b"GET " + draw(path) + b" HTTP/1.1"] + [n + b": " + v for n, v in draw(mutated(BASE, value))]
    return b"\r\n".join(lines) + b"\r\n\r\n"


@pytest.fixture(scope="module")
def fuzz_server():
    http_port = free_port()
    srv = ServerProcess(
        "--echo-endpoint", "--rate-limit", "0", "--jwt-secret", SECRET, "--http-port", str(http_port),
        "--allowed-origins", "https://good.example", "--compression",
    )  # fmt: skip
    srv.http_port = http_port
    srv.start()
    wait_for_port(http_port)
    yield srv
    out = srv.output()
    srv.kill()
    assert "error while routing" not in out and "Traceback" not in out, out[-3000:]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(head=request_heads())
def test_any_header_set_is_101_or_4xx_never_5xx(fuzz_server, head):
    status, _, body = send_head(HOST, fuzz_server.port, head, timeout=5)
    assert status in (101, 200, 404) or 400 <= status < 500, (status, body, head)
    # our sentences only: no exception text, no request line or header quoted back
    assert b"Traceback" not in body and b"codec" not in body and b"b'" not in body, body


QUERY_VALUES = st.one_of(
    st.sampled_from(["ok%0A", "%C2%B2", "%D9%A3", "9" * 25, "%FF", "+1"]),
    st.text(alphabet="abc019%+-_.:&=²", max_size=12),
).map(str.encode)


@st.composite
def sse_requests(draw: st.DrawFn) -> bytes:
    """``GET /sse`` with a mutation of a valid query (room, since, token) and of a few headers."""
    params = draw(mutated([(b"room", b"ok"), (b"since", b"0"), (b"token", GOOD.encode())], QUERY_VALUES))
    query = b"&".join(k + b"=" + v for k, v in params)
    lines = [b"GET /sse?" + query + b" HTTP/1.1", b"Host: x"]
    lines += [n + b": " + v for n, v in draw(st.lists(st.tuples(name, value | QUERY_VALUES), max_size=3))]
    return b"\r\n".join(lines) + b"\r\n\r\n"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(head=sse_requests())
def test_any_sse_request_is_a_stream_or_4xx_never_5xx(fuzz_server, head):
    with socket.create_connection((HOST, fuzz_server.http_port), timeout=5) as sock:
        sock.sendall(head)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    status = int(data.split(b" ", 2)[1])
    assert status == 200 or 400 <= status < 500, (data, head)
    assert b"Traceback" not in data and b"codec" not in data


# ---------------------------------------------------------------- in process: many more inputs

header_values = (
    st.text(max_size=40) | st.sampled_from(VALUES) | st.text(alphabet="\udcc3\udca9ab, ", max_size=8)
)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(NAMES[:8]), header_values), max_size=10))
def test_check_upgrade_answers_every_header_set(fields):
    result = check_upgrade(CIMultiDict(fields))
    if isinstance(result, Refusal):
        assert result.status in (400, 426) and result.reason.isascii()
    else:
        assert isinstance(result, Upgrade) and len(result.key) == 24


authenticator = Authenticator(SECRET, leeway=5)
token_text = st.one_of(
    st.text(max_size=60),
    st.sampled_from([GOOD, GOOD + "x", GOOD[:-2], "a.b.c", "..", "café", "\udcff"]),
    st.builds(
        lambda claims: jwt.encode(claims, SECRET, algorithm="HS256"),
        st.fixed_dictionaries(
            {},
            optional={
                "sub": st.one_of(st.text(max_size=5), st.integers(), st.none()),
                "exp": st.one_of(
                    st.integers(min_value=-(10**30), max_value=10**30),
                    st.floats(allow_nan=False),
                    st.integers(min_value=10**308, max_value=10**400),  # past float's range
                ),
                "nbf": st.integers(min_value=-(10**20), max_value=10**20),
                "rooms": st.one_of(
                    st.lists(st.text(max_size=5), max_size=3), st.integers(), st.text(max_size=3)
                ),
            },
        ),
    ),
)


@settings(max_examples=400, deadline=None)
@given(token_text)
def test_verify_returns_an_identity_or_a_fixed_auth_error(tok):
    try:
        ident = authenticator.verify(tok)
    except AuthError as exc:
        assert exc.status == 401
        reason = str(exc)
        assert reason.isascii() and len(reason) < 80 and "Error" not in reason
    else:
        assert isinstance(ident, Identity) and ident.expires_at == ident.exp + 5


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(["Authorization", "X"]), header_values), max_size=3),
    st.text(max_size=40) | st.binary(max_size=40),
)
def test_token_from_request_never_fails_but_on_ambiguity(fields, query):
    try:
        tok = token_from_request(CIMultiDict(fields), query)
    except AuthError as exc:
        assert exc.status == 400
    else:
        assert tok is None or isinstance(tok, str)


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=25) | st.integers(min_value=0, max_value=2**70).map(str))
def test_parse_seq_is_ascii_digits_up_to_2_63(text):
    value = parse_seq(text)
    ascii_digits = text != "" and all("0" <= c <= "9" for c in text)
    if value is None:
        assert not ascii_digits or len(text) > 19 or int(text) > SEQ_MAX
    else:
        assert ascii_digits and int(text) == value <= SEQ_MAX


header_line = st.one_of(
    st.tuples(name, st.sampled_from([b":", b": ", b" :", b""]), value).map(b"".join),
    st.sampled_from(
        [b"Content-Length: 0", b"content-length: 00", b"Content-Length: 1", b"Transfer-Encoding: x"]
    ),
    raw_value,
)


@settings(max_examples=500, deadline=None)
@given(st.lists(header_line, min_size=1, max_size=8))
def test_request_head_fast_path_agrees_with_the_line_by_line_rules(lines):
    """check_request_head answers a good head with one regex; it must agree with the per-line rules."""
    head = b"GET /ws HTTP/1.1\r\n" + b"\r\n".join(lines)
    assert check_request_head(head) == _check_header_lines(lines)
