"""Asymmetric JWTs: RS256/ES256 from a PEM public key or a JWKS URL, aud/iss checks, HS256 unchanged.

Keys are generated here (cryptography); the JWKS is served by the test itself on 127.0.0.1
(http.server in a thread), so rotation, an unreachable or stalled identity provider and the
refresh are real HTTP against a real server process.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers.ports import free_port, wait_for_port
from helpers.rawws import HandshakeFailed, RawWS
from helpers.servers import ROOT
from helpers.waiting import wait_until
from wsfan.server.auth import Authenticator, AuthError

HOST = "127.0.0.1"
SECRET = "hs256-secret-that-is-long-enough-for-the-test"


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def public_pem(key: Any) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def sign(
    key: Any, alg: str, kid: str | None = None, ttl: float = 600, sub: str = "alice", **claims: Any
) -> str:
    body = {"sub": sub, "exp": int(time.time() + ttl), **claims}
    return jwt.encode(body, key, algorithm=alg, headers={"kid": kid} if kid else None)


def hs256_with(secret: bytes, **claims: Any) -> str:
    """An HS256 token with any bytes as the secret (PyJWT refuses a PEM there; an attacker does not)."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps({"sub": "mallory", "exp": int(time.time() + 600), **claims}).encode())
    mac = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(mac)}"


def connect(port: int, token: str) -> tuple[int, str]:
    """(101, user from the welcome) or (status, body) of a refused upgrade."""
    try:
        ws = RawWS.connect(HOST, port, path=f"/ws?token={token}")
    except HandshakeFailed as refused:
        return refused.status, refused.body.decode(errors="replace").strip()
    with ws:
        _, data = ws.recv_message()
        return 101, json.loads(data)["user"]


def jwk_of(key: Any, kid: str) -> dict[str, Any]:
    alg = "RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256"
    algo = jwt.get_algorithm_by_name(alg)
    return {**json.loads(algo.to_jwk(key.public_key())), "kid": kid, "use": "sig", "alg": alg}


class Jwks:
    """A JWKS endpoint on 127.0.0.1: ``keys`` is served as is; ``stall`` holds each answer that long."""

    def __init__(self, port: int | None = None) -> None:
        self.keys: list[dict[str, Any]] = []
        self.fetches = 0
        self.stall = 0.0
        jwks = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                jwks.fetches += 1
                if jwks.stall:
                    time.sleep(jwks.stall)
                body = json.dumps({"keys": jwks.keys}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer((HOST, port or 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://{HOST}:{self.httpd.server_address[1]}/.well-known/jwks.json"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def jwks() -> Iterator[Jwks]:
    served = Jwks()
    yield served
    served.close()


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    return {"rsa": rsa_key(), "rsa2": rsa_key(), "ec": ec_key(), "ec2": ec_key()}


def key_file(tmp_path: Path, key: Any, name: str = "public.pem") -> str:
    path = tmp_path / name
    path.write_bytes(public_pem(key))
    return str(path)


# ---------------------------------------------------------------- PEM public key


def test_rs256_public_key_and_algorithm_confusion(tmp_path: Path, keys: dict[str, Any], make_server) -> None:
    pem = key_file(tmp_path, keys["rsa"])
    srv = make_server("--jwt-public-key", pem).start()
    assert connect(srv.port, sign(keys["rsa"], "RS256")) == (101, "alice")
    assert connect(srv.port, sign(keys["rsa"], "PS256")) == (101, "alice"), "the key's type decides: RSA"
    status, body = connect(srv.port, sign(keys["rsa2"], "RS256"))
    assert (status, body) == (401, "unauthorized: bad token signature")
    status, body = connect(srv.port, sign(keys["ec"], "ES256"))
    assert status == 401 and "token algorithm must be RS256" in body, body
    # Algorithm confusion: HS256 with the public key's PEM as the HMAC secret.
    status, body = connect(srv.port, hs256_with(Path(pem).read_bytes()))
    assert status == 401 and "token algorithm must be" in body, body
    status, _ = connect(
        srv.port, jwt.encode({"sub": "x", "exp": int(time.time() + 60)}, None, algorithm="none")
    )
    assert status == 401


def test_es256_public_key_with_audience_and_issuer(tmp_path: Path, keys: dict[str, Any], make_server) -> None:
    pem = key_file(tmp_path, keys["ec"])
    srv = make_server(
        "--jwt-public-key", pem, "--jwt-audience", "chat", "--jwt-issuer", "https://idp.test/"
    ).start()
    good = {"aud": "chat", "iss": "https://idp.test/"}
    assert connect(srv.port, sign(keys["ec"], "ES256", **good)) == (101, "alice")
    assert connect(srv.port, sign(keys["ec"], "ES256", aud="other", iss=good["iss"])) == (
        401,
        "unauthorized: token audience (aud) not accepted",
    )
    assert connect(srv.port, sign(keys["ec"], "ES256", aud="chat", iss="https://evil.test/")) == (
        401,
        "unauthorized: token issuer (iss) not accepted",
    )
    assert connect(srv.port, sign(keys["ec"], "ES256", aud="chat")) == (
        401,
        "unauthorized: token lacks the 'iss' claim",
    )
    status, body = connect(srv.port, sign(keys["ec2"], "ES256", **good))
    assert (status, body) == (401, "unauthorized: bad token signature")


def test_hs256_and_a_public_key_together(tmp_path: Path, keys: dict[str, Any], make_server) -> None:
    pem = key_file(tmp_path, keys["rsa"])
    srv = make_server("--jwt-secret", SECRET, "--jwt-public-key", pem).start()
    assert connect(srv.port, sign(SECRET, "HS256", sub="bob")) == (101, "bob")
    assert connect(srv.port, sign(keys["rsa"], "RS256")) == (101, "alice")
    # The PEM as an HMAC secret: HS256 is checked against the secret only, never against the key.
    assert connect(srv.port, hs256_with(Path(pem).read_bytes())) == (401, "unauthorized: bad token signature")


# ---------------------------------------------------------------- JWKS


def test_jwks_kid_rotation_and_ignored_keys(jwks: Jwks, keys: dict[str, Any], make_server) -> None:
    jwks.keys = [
        jwk_of(keys["rsa"], "k1"),
        {"kty": "oct", "k": base64.urlsafe_b64encode(b"s" * 32).decode(), "kid": "hs"},
    ]
    srv = make_server("--jwks-url", jwks.url).start()
    assert jwks.fetches == 1, "fetched once before listening"
    assert connect(srv.port, sign(keys["rsa"], "RS256", kid="k1")) == (101, "alice")
    # A symmetric key in the set is never used: HS256 is not an algorithm a key set provides.
    status, body = connect(srv.port, sign(b"s" * 32, "HS256", kid="hs"))
    assert status == 401 and "token algorithm must be" in body, body
    # The kid decides: k1's key with another kid, or another key under k1, fails.
    assert connect(srv.port, sign(keys["rsa2"], "RS256", kid="k1"))[0] == 401
    # Rotation: k2 appears in the set; the first token naming it starts a fetch, and is accepted after it.
    jwks.keys = [jwk_of(keys["rsa"], "k1"), jwk_of(keys["ec"], "k2")]
    first = connect(srv.port, sign(keys["ec"], "ES256", kid="k2"))
    assert first in ((401, "unauthorized: unknown signing key (kid); retry shortly"), (101, "alice")), first
    assert wait_until(lambda: connect(srv.port, sign(keys["ec"], "ES256", kid="k2")) == (101, "alice"), 10)
    assert jwks.fetches == 2, "one fetch for the new kid"
    # A flood of unknown kids fetches at most once per interval.
    for i in range(20):
        assert connect(srv.port, sign(keys["ec2"], "ES256", kid=f"nope{i}"))[0] == 401
    assert jwks.fetches <= 3
    # k1 retired: gone from the set, refused after the next fetch.
    jwks.keys = [jwk_of(keys["ec"], "k2")]
    time.sleep(5.05)  # the miss interval (keys.MISS_INTERVAL_S) of real time
    connect(srv.port, sign(keys["ec2"], "ES256", kid="trigger"))
    assert wait_until(lambda: connect(srv.port, sign(keys["rsa"], "RS256", kid="k1"))[0] == 401, 10)
    assert srv.stop() == 0


async def test_sse_and_presence_read_jwks_tokens(jwks: Jwks, keys: dict[str, Any], make_server) -> None:
    jwks.keys = [jwk_of(keys["rsa"], "k1")]
    http_port = free_port()
    make_server("--jwks-url", jwks.url, "--http-port", str(http_port)).start()
    wait_for_port(http_port)
    base = f"http://{HOST}:{http_port}"
    jwks.keys.append(jwk_of(keys["ec"], "k2"))
    async with aiohttp.ClientSession() as http:
        # SSE may wait: a token naming a new kid waits for one fetch and is accepted on the first try.
        async with http.get(
            f"{base}/sse", params={"room": "r", "token": sign(keys["ec"], "ES256", kid="k2")}
        ) as r:
            assert r.status == 200
            assert (await r.content.readline()).startswith(b": joined r")
        async with http.get(
            f"{base}/sse", params={"room": "r", "token": sign(keys["rsa2"], "RS256", kid="k1")}
        ) as r:
            assert r.status == 401 and (await r.json())["error"] == "bad token signature"
        async with http.get(
            f"{base}/presence", params={"room": "r", "token": sign(keys["rsa"], "RS256", kid="k1")}
        ) as r:
            assert r.status in (200, 404), (
                await r.text()
            )  # 404: presence off for the room's namespace, auth passed
        async with http.get(
            f"{base}/presence", params={"room": "r", "token": sign(keys["rsa2"], "RS256", kid="k1")}
        ) as r:
            assert r.status == 401
    assert jwks.fetches == 2


def test_unreachable_or_stalled_jwks_is_a_401_never_a_hang(keys: dict[str, Any], make_server) -> None:
    port = free_port()
    url = f"http://{HOST}:{port}/.well-known/jwks.json"
    srv = make_server("--jwks-url", url).start()
    token = sign(keys["rsa"], "RS256", kid="k1")
    assert connect(srv.port, token) == (401, "unauthorized: signing keys unavailable; retry shortly")
    served = Jwks(port)  # the identity provider comes up: the retry picks the key set up
    try:
        served.keys = [jwk_of(keys["rsa"], "k1")]
        assert wait_until(lambda: connect(srv.port, token) == (101, "alice"), 15)
        # A fetch that stalls runs in a thread: the event loop keeps answering meanwhile.
        served.stall = 3.0
        assert connect(srv.port, sign(keys["rsa"], "RS256", kid="new"))[0] == 401  # starts the stalled fetch
        started = time.monotonic()
        assert connect(srv.port, token) == (101, "alice")
        assert time.monotonic() - started < 1.0, "a known key is verified from memory, not after the fetch"
        assert srv.stop() == 0
    finally:
        served.stall = 0
        served.close()
    assert "cannot fetch signing keys" in srv.output()


# ---------------------------------------------------------------- tools and startup


def test_wsfan_token_signs_with_a_private_key(tmp_path: Path, keys: dict[str, Any], make_server) -> None:
    private = tmp_path / "private.pem"
    private.write_bytes(
        keys["ec"].private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    srv = make_server("--jwt-public-key", key_file(tmp_path, keys["ec"]), "--jwt-audience", "chat").start()
    out = subprocess.run(
        [sys.executable, "-m", "wsfan", "token", "--sub", "carol", "--private-key", str(private), "--aud", "chat"],
        cwd=ROOT, capture_output=True, text=True, timeout=20, check=True,
    ).stdout.strip()  # fmt: skip
    assert jwt.get_unverified_header(out)["alg"] == "ES256"
    assert connect(srv.port, out) == (101, "carol")


@pytest.mark.parametrize(
    "content", [b"", b"-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n", None]
)
def test_bad_public_key_file_is_one_line_and_exit_2(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "key.pem"
    if content is not None:
        path.write_bytes(content)
    r = subprocess.run(
        [sys.executable, "-m", "wsfan", "--port", str(free_port()), "--jwt-public-key", str(path)],
        cwd=ROOT, capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "--jwt-public-key" in r.stderr, r.stderr


# ---------------------------------------------------------------- any header and claims: 401, never 500

SECRET = "property-secret-of-32-bytes-....."
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
_DATE = _JSON | st.integers(0, 2**40) | st.just("9999999999") | st.just(True)


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _signed(header: dict[str, Any], claims: dict[str, Any]) -> str:
    """A token signed with SECRET whatever its header says (PyJWT refuses to write odd headers)."""
    signing = _b64(json.dumps(header).encode()) + b"." + _b64(json.dumps(claims).encode())
    return (signing + b"." + _b64(hmac.new(SECRET.encode(), signing, hashlib.sha256).digest())).decode()


@settings(max_examples=400)
@given(
    alg=st.just("HS256") | _JSON,
    kid=st.none() | _JSON,
    claims=st.fixed_dictionaries(
        {},
        optional={"sub": st.just("u") | _JSON, "exp": _DATE, "nbf": _DATE, "iat": _DATE, "rooms": _JSON},
    ),
)
def test_any_header_and_claims_give_an_identity_or_a_fixed_refusal(alg: Any, kid: Any, claims: dict) -> None:
    """Whatever JSON the header's ``alg``/``kid`` and the claims hold (signature valid): an Identity
    whose claims have the types RFC 7519 gives them, or AuthError with our sentence, never another
    exception (before: ``alg`` as a list raised TypeError, a 500 on the upgrade, SSE and presence,
    before any signature check; ``exp: "9999999999"`` was taken as a date)."""
    header = {"alg": alg, "typ": "JWT"} if kid is None else {"alg": alg, "typ": "JWT", "kid": kid}
    auth = Authenticator(SECRET)
    try:
        ident = auth.verify(_signed(header, claims))
    except AuthError as exc:
        assert "Error" not in str(exc) and len(str(exc)) < 120, str(exc)
        return
    assert alg == "HS256"
    assert isinstance(claims["sub"], str) and claims["sub"]
    for name in ("exp", "nbf", "iat"):
        if claims.get(name) is not None:
            assert type(claims[name]) in (int, float), (name, claims[name])
    assert ident.expires_at is not None and ident.expires_at > time.time()


@pytest.mark.parametrize(
    "args, says",
    [
        (["--sub", "a", "--ttl", "nan"], "--ttl must be a number of seconds"),
        (["--sub", "a", "--ttl", "inf"], "--ttl must be a number of seconds"),
        (["--sub", "a", "--ttl=-1e300"], "--ttl must be a number of seconds"),
        (["--sub", "", "--ttl", "60"], "--sub must not be empty"),
    ],
    ids=["nan", "inf", "huge", "empty sub"],
)
def test_wsfan_token_refuses_what_would_crash_or_make_a_useless_token(args: list[str], says: str) -> None:
    """One usage line and exit 2 (before: nan/inf were a traceback; an empty sub printed a token
    the server refuses)."""
    run = subprocess.run(
        [sys.executable, "-m", "wsfan", "token", "--secret", "s" * 32, *args],
        cwd=ROOT, capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert run.returncode == 2 and run.stdout == "", (run.returncode, run.stdout)
    assert says in run.stderr and "Traceback" not in run.stderr, run.stderr
