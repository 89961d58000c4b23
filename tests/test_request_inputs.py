"""Every header and query parameter the server reads, on both ports, against malformed values.

Kinds (issue 11): bytes that are not ASCII or not UTF-8, a value sent twice, an oversized
value, numbers written with non-ASCII digits, names with a trailing newline, foreign
origins, JWT leeway, and clients that send their request head slowly or never. Each is
sent byte for byte over a raw socket (tests/helpers/rawws.py); every refusal is a 4xx with a
short fixed reason, never a 500 or an exception's text.

Surfaces: the WebSocket upgrade (``/ws`` on ``--port``), ``GET /sse`` and ``POST /publish``
(``--http-port``, aiohttp).
"""

from __future__ import annotations

import base64
import json
import socket
import time
import urllib.parse

import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers.ports import free_port, wait_for_port
from helpers.rawws import RawWS, send_head, upgrade_head
from helpers.servers import ServerProcess
from helpers.waiting import wait_until
from wsfan.server.handshake import BARE_LF

HOST = "127.0.0.1"
SECRET = "edge-secret-that-is-long-enough-for-hs256!!"
ADMIN = "edge-admin-key"
ORIGINS = "https://good.example, https://*.trusted.example"


def token(ttl: float = 600, **claims) -> str:
    body = {"sub": "alice", "exp": int(time.time() + ttl), **claims}
    return jwt.encode(body, SECRET, algorithm="HS256")


@pytest.fixture(scope="module")
def edge():
    """Auth on (default leeway 5 s), admin key, HTTP port, an origin allow-list, 1 s request timeout."""
    http_port = free_port()
    srv = ServerProcess(
        "--jwt-secret", SECRET, "--admin-key", ADMIN, "--http-port", str(http_port),
        "--rate-limit", "0", "--allowed-origins", ORIGINS, "--request-timeout", "1",
    )  # fmt: skip
    srv.http_port = http_port
    srv.start()
    wait_for_port(http_port)
    yield srv
    srv.kill()


def ws_upgrade(srv, *, query: str = "", extra=None) -> tuple[int, bytes]:
    status, _, body = send_head(HOST, srv.port, upgrade_head("/ws" + query, extra=extra))
    return status, body


def sse_get(srv, *, query: str, extra=None) -> tuple[int, bytes]:
    return http_get(srv, "/sse" + query, extra=extra)


def http_get(srv, target: str, *, extra=None) -> tuple[int, bytes]:
    """A GET on the --http-port, headers as given (bytes values for non-ASCII); (status, body)."""
    lines = [f"GET {target} HTTP/1.1".encode(), f"Host: {HOST}".encode()]
    lines += [k.encode() + b": " + (v if isinstance(v, bytes) else v.encode()) for k, v in extra or []]
    status, _, body = send_head(HOST, srv.http_port, b"\r\n".join(lines) + b"\r\n\r\n")
    return status, body


def publish_raw(srv, *, auth: list[bytes], body: bytes = b'{"room":"r","payload":1}') -> tuple[int, bytes]:
    lines = [b"POST /publish HTTP/1.1", f"Host: {HOST}".encode(), b"Content-Type: application/json"]
    lines += [b"Authorization: " + a for a in auth]
    lines.append(b"Content-Length: %d" % len(body))
    status, _, got = send_head(HOST, srv.http_port, b"\r\n".join(lines) + b"\r\n\r\n" + body)
    return status, got


def assert_fixed_reason(body: bytes) -> None:
    """A short sentence of ours: no Python exception text, no echo of raw input."""
    assert len(body) < 200, body
    for leak in (b"codec", b"Error", b"Traceback", b"surrogate", b"\\x", b"b'"):
        assert leak not in body, body


# ---------------------------------------------------------------- tokens: encoding, duplicates, size

GOOD = token(ttl=7 * 24 * 3600)  # made at collection: must outlive a slow whole-suite run
HUGE_EXP = token(exp=10**400)
STRING_EXP = token(exp=str(int(time.time()) + 7 * 24 * 3600))  # RFC 7519: a NumericDate is a number


def odd_header_token(**header: object) -> str:
    """A token whose header holds what PyJWT would not write (``alg`` a list): unsigned, which the
    server must not even get to check."""
    b64 = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()  # noqa: E731
    return f"{b64(header)}.{b64({'sub': 'alice', 'exp': int(time.time()) + 600})}.c2ln"


TOKEN_CASES = [
    # (case, extra headers, query, status)
    ("Bearer café (UTF-8)", [("Authorization", "Bearer café".encode())], "", 401),
    ("Bearer with bytes that are not UTF-8", [("Authorization", b"Bearer \xff\xfe")], "", 401),
    ("two Authorization headers", [("Authorization", f"Bearer {GOOD}"), ("Authorization", f"Bearer {GOOD}")], "", 400),
    ("token query not ASCII", [], "?token=caf%C3%A9", 401),
    ("token query not UTF-8", [], "?token=%FF%FE", 401),
    ("two token parameters", [], f"?token={GOOD}&token={GOOD}", 400),
    ("exp of 10**400", [("Authorization", f"Bearer {HUGE_EXP}")], "", 401),
    ("oversized token", [("Authorization", "Bearer " + "a." * 3000 + "b")], "", 401),
    ("alg a list", [("Authorization", "Bearer " + odd_header_token(alg=["HS256"]))], "", 401),
    ("alg an object", [], "?token=" + odd_header_token(alg={"HS256": 1}), 401),
    ("exp a numeric string", [("Authorization", f"Bearer {STRING_EXP}")], "", 401),
]  # fmt: skip


@pytest.mark.parametrize("case, extra, query, status", TOKEN_CASES, ids=[c[0] for c in TOKEN_CASES])
def test_token_inputs_on_the_websocket_upgrade(edge, case, extra, query, status):
    got, body = ws_upgrade(edge, query=query, extra=extra)
    assert got == status, body
    assert_fixed_reason(body)
    if status == 400:  # a malformed request, answered as any other (it began "unauthorized:")
        assert body in (b"more than one token parameter\n", b"more than one Authorization header\n"), body


@pytest.mark.parametrize("path", ["/sse", "/presence", "/presence_stats"])
@pytest.mark.parametrize("case, extra, query, status", TOKEN_CASES, ids=[c[0] for c in TOKEN_CASES])
def test_token_inputs_on_the_http_port(edge, path, case, extra, query, status):
    got, body = http_get(edge, path + (f"{query}&room=r" if query else "?room=r"), extra=extra)
    assert got == status, body
    assert_fixed_reason(body)
    if status == 400:
        assert json.loads(body)["error"] in (
            "more than one token parameter",
            "more than one Authorization header",
        )


def test_a_good_token_still_works_on_both_surfaces(edge):
    assert ws_upgrade(edge, extra=[("Authorization", f"Bearer {GOOD}")])[0] == 101
    assert ws_upgrade(edge, query=f"?token={GOOD}")[0] == 101
    assert sse_get(edge, query=f"?room=r&token={GOOD}")[0] == 200


@pytest.mark.parametrize(
    "auth, status",
    [
        ([b"Bearer \xff\xfe"], 401),  # aiohttp hands this over as lone surrogates
        ("Bearer café".encode(), 401),
        ([f"Bearer {ADMIN}".encode(), f"Bearer {ADMIN}".encode()], 400),
        ([b"Bearer " + b"k" * 6000], 401),
    ],
    ids=["not UTF-8", "UTF-8 non-ASCII", "two headers", "oversized"],
)
def test_admin_key_inputs(edge, auth, status):
    got, body = publish_raw(edge, auth=auth if isinstance(auth, list) else [auth])
    assert got == status, body
    assert_fixed_reason(body)
    assert publish_raw(edge, auth=[f"Bearer {ADMIN}".encode()])[0] == 200


# ---------------------------------------------------------------- names and numbers on SSE

SSE_CASES = [
    ("room with a trailing newline", "?room=ok%0A", [], 400),
    ("room not ASCII", "?room=caf%C3%A9", [], 400),
    ("two rooms", "?room=a&room=b", [], 400),
    ("since superscript two", "?room=ok&since=%C2%B2", [], 400),
    ("since Arabic-Indic three", "?room=ok&since=%D9%A3", [], 400),
    ("since full-width one", "?room=ok&since=%EF%BC%91", [], 400),
    ("since with a sign", "?room=ok&since=%2B1", [], 400),
    ("since negative", "?room=ok&since=-1", [], 400),
    ("since with an underscore", "?room=ok&since=1_0", [], 400),
    ("since with a space", "?room=ok&since=%201", [], 400),
    ("since past 2^63-1", "?room=ok&since=9223372036854775808", [], 400),
    ("two since", "?room=ok&since=1&since=2", [], 400),
    ("Last-Event-ID superscript two", "?room=ok", [("Last-Event-ID", "²".encode())], 400),
    ("Last-Event-ID not UTF-8", "?room=ok", [("Last-Event-ID", b"\xff")], 400),
    ("two Last-Event-ID", "?room=ok", [("Last-Event-ID", "1"), ("Last-Event-ID", "2")], 400),
]


@pytest.mark.parametrize("case, query, extra, status", SSE_CASES, ids=[c[0] for c in SSE_CASES])
def test_sse_names_and_numbers(edge, case, query, extra, status):
    got, body = sse_get(edge, query=f"{query}&token={GOOD}", extra=extra)
    assert got == status, body
    assert_fixed_reason(body)
    assert "error" in json.loads(body)


@pytest.mark.parametrize("path", ["/presence", "/presence_stats"])
@pytest.mark.parametrize(
    "query",
    ["?room=ok%0A", "?room=caf%C3%A9", "?room=a&room=b", "?room="],
    ids=["newline", "non-ASCII", "two", "empty"],
)
def test_presence_room_names(edge, path, query):
    status, body = http_get(edge, f"{path}{query}&token={GOOD}")
    assert status == 400, body
    assert_fixed_reason(body)


# ---------------------------------------------------------------- numbers in queries: one parser, one sentence

SINCE_RULE = "since must be one integer from 0 to 2^63-1 in ASCII digits"
LIMIT_RULE = "limit must be one integer from 1 to 10000 in ASCII digits"
ADMIN_AUTH = [("Authorization", f"Bearer {ADMIN}")]
# (endpoint target without the number, parameter, its sentence, headers)
NUMBER_ENDPOINTS = [
    (f"/sse?room=ok&token={GOOD}", "since", SINCE_RULE, []),
    ("/history?room=ok", "since", SINCE_RULE, ADMIN_AUTH),
    ("/rooms?prefix=ok", "limit", LIMIT_RULE, ADMIN_AUTH),
]
BAD_NUMBERS = [
    "",
    "-1",
    "%2B1",
    "1_0",
    "%201",
    "1.0",
    "x",
    "%C2%B2",
    "%EF%BC%91",
    "9223372036854775808",
    "1&{name}=2",
]


@pytest.mark.parametrize("value", BAD_NUMBERS, ids=lambda v: v or "empty")
@pytest.mark.parametrize(
    "target, name, rule, headers", NUMBER_ENDPOINTS, ids=[e[0].split("?")[0] for e in NUMBER_ENDPOINTS]
)
def test_a_query_number_out_of_its_rule_is_400_with_the_one_sentence(
    edge, target, name, rule, headers, value
):
    """/sse, /history and /rooms read since and limit with one parser and say one sentence (before:
    /sse 'Last-Event-ID and since must be a seq: ...' or 'more than one since parameter', /history
    'since must be one seq (...)', /rooms 'limit must be an integer from 1 to 10000' or 'more than
    one limit parameter'; an empty since= on /sse opened the stream as if absent)."""
    status, body = http_get(edge, f"{target}&{name}={value.format(name=name)}", extra=headers)
    assert (status, json.loads(body)) == (400, {"error": rule})


@pytest.mark.parametrize(
    "target, name, rule, headers", NUMBER_ENDPOINTS, ids=[e[0].split("?")[0] for e in NUMBER_ENDPOINTS]
)
def test_a_query_number_in_its_rule_is_taken(edge, target, name, rule, headers):
    for value in ("1", "0001", "10000" if name == "limit" else "9223372036854775807"):
        assert http_get(edge, f"{target}&{name}={value}", extra=headers)[0] == 200, value
    assert http_get(edge, target, extra=headers)[0] == 200, "absent: the default"


LAST_EVENT_ID_RULE = (
    "Last-Event-ID must be <epoch>:<seq> (this server's event ids) or <seq>, "
    "the seq one integer from 0 to 2^63-1 in ASCII digits"
)


@pytest.mark.parametrize(
    "value", ["-1", "e:", ":5", "e:-1", "e:²", "9223372036854775808", "e :1", "e" * 65 + ":1"]
)
def test_last_event_id_out_of_the_rule_says_its_sentence(edge, value):
    """``<epoch>:<seq>`` (the ids /sse writes) or a bare ``<seq>``; anything else is 400 with one sentence."""
    status, body = sse_get(edge, query=f"?room=ok&token={GOOD}", extra=[("Last-Event-ID", value)])
    assert (status, json.loads(body)) == (400, {"error": LAST_EVENT_ID_RULE}), value


@pytest.mark.parametrize("value", ["0", "7", "5f0c2a9e:0", "a:b:9223372036854775807", "e" * 64 + ":1"])
def test_last_event_id_in_the_rule_opens_the_stream(edge, value):
    assert sse_get(edge, query=f"?room=ok&token={GOOD}", extra=[("Last-Event-ID", value)])[0] == 200, value


@settings(max_examples=150, deadline=None)
@given(
    endpoint=st.sampled_from(NUMBER_ENDPOINTS),
    value=st.one_of(
        st.text(max_size=24),
        st.integers(-(2**64), 2**64).map(str),
        st.text("0123456789", min_size=1, max_size=21),
    ),
)
def test_any_query_value_is_a_number_in_range_or_the_documented_400(edge, endpoint, value):
    """Any text as since/limit on /sse, /history, /rooms: never a 500; 200 exactly when it is ASCII
    digits in range, else 400 with the endpoint's one sentence."""
    target, name, rule, headers = endpoint
    status, body = http_get(edge, f"{target}&{name}={urllib.parse.quote(value, safe='')}", extra=headers)
    high = 10_000 if name == "limit" else 2**63 - 1
    low = 1 if name == "limit" else 0
    good = value != "" and all(c in "0123456789" for c in value) and low <= int(value) <= high
    if good:
        assert status == 200, (value, body)
    else:
        assert (status, json.loads(body)) == (400, {"error": rule}), value


def test_sse_takes_the_largest_seq_and_ascii_digits(edge):
    assert sse_get(edge, query=f"?room=ok&since=9223372036854775807&token={GOOD}")[0] == 200
    assert sse_get(edge, query=f"?room=ok&token={GOOD}", extra=[("Last-Event-ID", "0")])[0] == 200


# ---------------------------------------------------------------- origins

ORIGIN_CASES = [
    ("listed", "https://good.example", True),
    ("listed, other case", "HTTPS://Good.Example", True),
    ("matches a glob", "https://chat.trusted.example", True),
    ("foreign", "https://evil.example", False),
    ("suffix trick", "https://good.example.evil.example", False),
    ("null", "null", False),
    ("absent (not a browser)", None, True),
]


@pytest.mark.parametrize("case, origin, allowed", ORIGIN_CASES, ids=[c[0] for c in ORIGIN_CASES])
def test_allowed_origins_on_the_websocket_upgrade(edge, case, origin, allowed):
    extra = [("Authorization", f"Bearer {GOOD}")] + ([("Origin", origin)] if origin else [])
    status, body = ws_upgrade(edge, extra=extra)
    assert status == (101 if allowed else 403), body
    if not allowed:
        assert body == b"origin not allowed\n"


@pytest.mark.parametrize("case, origin, allowed", ORIGIN_CASES, ids=[c[0] for c in ORIGIN_CASES])
def test_allowed_origins_on_sse(edge, case, origin, allowed):
    status, body = sse_get(edge, query=f"?room=ok&token={GOOD}", extra=[("Origin", origin)] if origin else [])
    assert status == (200 if allowed else 403), body


@pytest.mark.parametrize("surface", ["ws", "sse"])
def test_origin_not_ascii_or_repeated_is_400(edge, surface):
    for extra in ([("Origin", "https://café.example".encode())], [("Origin", "https://good.example")] * 2):
        if surface == "ws":
            status, body = ws_upgrade(edge, extra=[("Authorization", f"Bearer {GOOD}"), *extra])
        else:
            status, body = sse_get(edge, query=f"?room=ok&token={GOOD}", extra=extra)
        assert status == 400, body
        assert_fixed_reason(body)


def test_any_origin_by_default_and_a_warning_in_production(make_server):
    srv = make_server("--rate-limit", "0").start()
    assert ws_upgrade(srv, extra=[("Origin", "https://evil.example")])[0] == 101
    prod = make_server("--production", "--allow-anonymous", "--workers", "1").start()
    assert "--allowed-origins is not set" in prod.output()
    listed = make_server(
        "--production", "--allow-anonymous", "--workers", "1", "--allowed-origins", ORIGINS
    ).start()
    assert "--allowed-origins" not in listed.output()


# ---------------------------------------------------------------- JWT leeway: one rule for both decisions


def test_a_token_inside_the_leeway_connects_and_lives_until_exp_plus_leeway(edge):
    """exp 2-3 s ago, leeway 5 s: accepted, and closed with 4001 at exp + 5, not at once."""
    exp = int(time.time()) - 2
    tok = jwt.encode({"sub": "alice", "exp": exp}, SECRET, algorithm="HS256")
    with RawWS.connect(HOST, edge.port, headers={"Authorization": f"Bearer {tok}"}, timeout=8) as ws:
        with pytest.raises(TimeoutError):
            ws.expect_close(timeout=exp + 5 - time.time() - 0.3)
        code, _ = ws.expect_close(timeout=3)
        closed_at = time.time()
    assert code == 4001
    assert exp + 5 - 0.3 <= closed_at <= exp + 5 + 1.5


def test_a_token_past_the_leeway_is_refused(edge):
    tok = jwt.encode({"sub": "alice", "exp": int(time.time()) - 7}, SECRET, algorithm="HS256")
    status, body = ws_upgrade(edge, extra=[("Authorization", f"Bearer {tok}")])
    assert status == 401 and b"token expired" in body
    assert sse_get(edge, query=f"?room=ok&token={tok}")[0] == 401


def test_sse_with_a_token_inside_the_leeway_ends_at_exp_plus_leeway(edge):
    exp = int(time.time()) - 2
    tok = jwt.encode({"sub": "alice", "exp": exp}, SECRET, algorithm="HS256")
    with socket.create_connection((HOST, edge.http_port), timeout=8) as sock:
        sock.sendall(f"GET /sse?room=ok&token={tok} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        while b"event: close" not in data:
            chunk = sock.recv(4096)
            assert chunk, data
            data += chunk
            if b" 200 " not in data.split(b"\r\n", 1)[0]:
                pytest.fail(data.decode(errors="replace"))
        ended_at = time.time()
    assert b"data: token expired" in data
    assert exp + 5 - 0.3 <= ended_at <= exp + 5 + 1.5


# ---------------------------------------------------------------- slow or silent clients (slowloris)


def _dropped_within(port: int, send_lines: bool, limit: float) -> float:
    """Seconds until the server closes a connection that sends nothing, or one header line every 0.25 s."""
    started = time.monotonic()
    with socket.create_connection((HOST, port)) as sock:
        sock.settimeout(0.25)
        if send_lines:
            sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        n = 0
        while time.monotonic() - started < limit:
            try:
                if send_lines:
                    sock.sendall(b"X-Slow-%d: 1\r\n" % n)
                    n += 1
                if sock.recv(4096) == b"":
                    return time.monotonic() - started
            except TimeoutError:
                continue
            except OSError:
                return time.monotonic() - started
    return float("inf")


@pytest.mark.parametrize("send_lines", [False, True], ids=["silent", "one line at a time"])
@pytest.mark.parametrize("port", ["ws", "http"])
def test_request_head_must_arrive_within_the_request_timeout(edge, port, send_lines):
    took = _dropped_within(edge.port if port == "ws" else edge.http_port, send_lines, limit=6.0)
    assert took < 3.0  # --request-timeout 1, plus scheduling slack on a loaded machine


def test_http_keepalive_connection_idle_past_the_timeout_is_closed(edge):
    with socket.create_connection((HOST, edge.http_port), timeout=5) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        sock.settimeout(5)
        assert sock.recv(4096) == b""
        assert time.monotonic() - started < 3.0


def test_admin_publish_body_that_never_arrives_is_408(edge):
    with socket.create_connection((HOST, edge.http_port), timeout=5) as sock:
        sock.sendall(
            b"POST /publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + ADMIN.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
        )
        reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 408"), reply


# ---------------------------------------------------------------- what aiohttp's parser refuses


LONG_LINE = b"a request line or header line longer than 8190 bytes\n"


@pytest.mark.parametrize(
    "head, status, body",
    [
        # a raw non-ASCII byte in the query; a control character in a value
        (b"GET /sse?room=a&\xc2\xb2=1 HTTP/1.1\r\nHost: x\r\n\r\n", 400, b"400 Bad Request\n"),
        (b"GET /sse?room=a HTTP/1.1\r\nHost: x\r\nX: \x01\r\n\r\n", 400, b"400 Bad Request\n"),
        (b"GET /sse?room=a HTTP/1.1\r\nHost: x\r\nX-" + b"a" * 9000 + b": 1\r\n\r\n", 400, LONG_LINE),
        (b"GET /sse?room=" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 400, LONG_LINE),
        # the WebSocket port's limit and sentence (test_handshake): 431, RFC 6585 §5
        (b"GET /sse?room=a HTTP/1.1\r\nHost: x\r\n" + b"X: 1\r\n" * 128 + b"\r\n", 431, b"more than 128 header fields\n"),
    ],
    ids=["non-ASCII query byte", "control character", "oversized header line", "oversized target", "129 header lines"],
)  # fmt: skip
def test_http_port_parse_errors_are_a_fixed_answer_without_a_traceback(edge, head, status, body):
    """aiohttp's own answer quotes the request back and logs a traceback at ERROR per request
    (and says 400 '400 Bad Request' for too many header fields, where the WebSocket port says 431)."""
    assert send_head(HOST, edge.http_port, head)[::2] == (status, body)
    assert "Traceback" not in edge.output()


@pytest.mark.parametrize(
    "head",
    [
        b"GET /healthz HTTP/1.1\nHost: x\n\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\n\r\n",
        b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Length: 2\n\r\n{}",
    ],
    ids=["all bare LF", "bare LF after a header", "bare LF on an admin POST"],
)
def test_http_port_bare_lf_is_400_with_the_reason(edge, head):
    """RFC 9112 §2.2: a bare LF line end is refused on the --http-port as on the WebSocket port,
    with the same sentence (test_handshake), not a bare "400 Bad Request" or the parser's text."""
    status, _, body = send_head(HOST, edge.http_port, head)
    assert (status, body) == (400, BARE_LF.encode() + b"\n")


@pytest.mark.parametrize("lead", [b"\r\n", b"\r\n" * 3], ids=["one CRLF", "three CRLFs"])
def test_http_port_skips_empty_lines_before_the_request_line(edge, lead):
    """RFC 9112 §2.2 (a server SHOULD ignore at least one CRLF before the request-line), as on the
    WebSocket port (test_handshake); aiohttp's parser does, this keeps it so."""
    status, _, body = send_head(HOST, edge.http_port, lead + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (status, body) == (200, b"ok\n")


def test_admin_body_cut_short_by_the_client_is_not_an_error_in_the_log(make_server):
    """A client that closes before its announced body arrived is its own doing: one DEBUG line, no
    ERROR traceback (before: aiohttp logged ConnectionResetError with a traceback at ERROR each time)."""
    http_port = free_port()
    srv = make_server("--admin-key", ADMIN, "--http-port", str(http_port), "--log-level", "debug").start()
    wait_for_port(http_port)
    with socket.create_connection((HOST, http_port), timeout=3) as sock:
        sock.sendall(
            b"POST /publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + ADMIN.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"room\""
        )  # fmt: skip
    assert wait_until(lambda: "admin request body cut short" in srv.output()), srv.output()[-3000:]
    assert "Traceback" not in srv.output() and " ERROR " not in srv.output(), srv.output()[-3000:]


def test_admin_body_announced_over_the_limit_is_413_at_once(edge):
    """Content-Length past the limit: 413 before any of the body is read (before: the server waited
    for the body and answered 408 after --request-timeout). The body is never sent here."""
    with socket.create_connection((HOST, edge.http_port), timeout=5) as sock:
        sock.sendall(
            b"POST /publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + ADMIN.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: 100000000\r\n\r\n"
        )  # fmt: skip
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = sock.recv(4096)
            assert chunk, reply
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 413"), reply


def test_head_of_sse_is_405_not_a_stream(edge):
    """RFC 9110 §9.3.2: a HEAD answer has no body; an event stream is nothing but body, so HEAD
    /sse is 405 with Allow: GET (before: 200, then ': joined' bytes and a subscriber held open).
    The answer is complete at its head: nothing follows it before the server closes or we stop."""
    with socket.create_connection((HOST, edge.http_port), timeout=5) as sock:
        sock.sendall(
            f"HEAD /sse?room=r&token={GOOD} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        )
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
    head, _, rest = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 405") and b"\r\nAllow: GET" in head, head
    assert rest == b"", rest


@pytest.mark.parametrize(
    "head, status, error, allow",
    [
        (b"GET /publish HTTP/1.1", 405, "GET is not served here: use POST", "POST"),
        (b"DELETE /history HTTP/1.1", 405, "DELETE is not served here: use GET, HEAD", "GET, HEAD"),
        (b"HEAD /sse HTTP/1.1", 405, None, "GET"),
        (b"GET /nope HTTP/1.1", 404, "no such endpoint", None),
    ],
    ids=["GET of a POST endpoint", "DELETE", "HEAD of sse", "unknown path"],
)
def test_http_port_routing_errors_are_json_like_every_other_error(edge, head, status, error, allow):
    """docs/app-api.md: errors on --http-port are {"error": "..."} (before: aiohttp's text,
    '405: Method Not Allowed'); a 405 says which methods to use, in words and in Allow."""
    got, headers, body = send_head(HOST, edge.http_port, head + b"\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert got == status, body
    assert headers.get("allow") == allow
    if error is not None:  # a HEAD answer has no body
        assert json.loads(body) == {"error": error}
