"""TLS: wss:// and https:// from the node itself (--tls-cert/--tls-key), and deploy/nginx/ in front of a node.

The nginx tests run the sample file deploy/nginx/wsfan.conf itself (only its ``# CHANGE``
lines are pointed at free ports and a throwaway certificate) with Debian's real ``nginx``:
a wss:// client -> nginx (TLS ends there) -> ws:// wsfan, as a browser behind a proxy sees it.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import jwt
import pytest
import websockets
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from helpers.peers import PicowsPeer, WebsocketsPeer
from helpers.ports import free_port, wait_for_port
from helpers.servers import ROOT, ServerProcess

SECRET = "tls-test-secret-long-enough-for-hs256!!"
SAMPLE = ROOT / "deploy" / "nginx" / "wsfan.conf"


def make_cert(folder: Path) -> tuple[Path, Path]:
    """A self-signed P-256 certificate for localhost and 127.0.0.1, valid for a day: (cert.pem, key.pem)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_cert(tmp_path_factory.mktemp("tls"))


def client_context(cert_path: Path) -> ssl.SSLContext:
    """What a browser does with a certificate it trusts: verify the chain and the host name."""
    ctx = ssl.create_default_context(cafile=str(cert_path))
    ctx.check_hostname = True
    return ctx


def token(sub: str) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time() + 600)}, SECRET, algorithm="HS256")


# ---------------------------------------------------------------- TLS on the node's own listeners


async def test_node_serves_wss_and_https_with_its_certificate(make_server, cert):
    http_port = free_port()
    srv = make_server(
        "--tls-cert",
        str(cert[0]),
        "--tls-key",
        str(cert[1]),
        "--http-port",
        str(http_port),
        "--rate-limit",
        "0",
    ).start()
    wait_for_port(http_port)
    ctx = client_context(cert[0])
    url = f"wss://localhost:{srv.port}/ws"
    sub = await WebsocketsPeer.connect(url, ssl=ctx)
    pub = await PicowsPeer.connect(url, ssl_context=ctx)
    for peer in (sub, pub):
        assert (await peer.request("join", room="tls-room"))["success"] is True
    ack = await pub.request("publish", room="tls-room", payload={"n": 1})
    assert ack["data"] == {"room": "tls-room", "seq": 1}
    msg = await sub.recv_type("message")
    assert (msg["seq"], msg["payload"]) == (1, {"n": 1})
    assert await sub.close_handshake(1000) == 1000
    await pub.close()
    async with aiohttp.ClientSession() as http:
        async with http.get(f"https://localhost:{http_port}/healthz", ssl=ctx) as r:
            assert r.status == 200
        # Plain http:// to the TLS port is not served: no cleartext side door.
        with pytest.raises(aiohttp.ClientError):
            async with http.get(
                f"http://127.0.0.1:{http_port}/healthz", timeout=aiohttp.ClientTimeout(5)
            ) as r:
                pass
    assert "listening on wss://" in srv.output()


async def test_plain_ws_to_a_tls_port_gets_no_websocket(make_server, cert):
    srv = make_server("--tls-cert", str(cert[0]), "--tls-key", str(cert[1])).start()
    # The cleartext GET is not a TLS ClientHello: the node drops it, no HTTP answer comes back.
    with pytest.raises(websockets.InvalidMessage):
        await asyncio.wait_for(WebsocketsPeer.connect(srv.url, open_timeout=3), 5)
    # The node is still fine for TLS clients afterwards.
    peer = await WebsocketsPeer.connect(f"wss://localhost:{srv.port}/ws", ssl=client_context(cert[0]))
    assert peer.welcome["type"] == "welcome"
    await peer.close()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--tls-cert", "CERT"), "--tls-cert and --tls-key go together"),
        (("--tls-key", "KEY"), "--tls-cert and --tls-key go together"),
        (("--tls-cert", "/nonexistent/cert.pem", "--tls-key", "KEY"), "cannot load them (No such file"),
        (("--tls-cert", "KEY", "--tls-key", "KEY"), "not a PEM certificate and matching private key"),
        (("--tls-cert", "CERT", "--tls-key", "OTHER"), "not a PEM certificate and matching private key"),
    ],
)
def test_tls_flags_are_checked_before_listening(cert, tmp_path, capsys, args, needle):
    from wsfan.server import config

    other_key = make_cert(tmp_path)[1]  # a real key, but not the certificate's
    names = {"CERT": str(cert[0]), "KEY": str(cert[1]), "OTHER": str(other_key)}
    with pytest.raises(SystemExit) as exited:
        config.load([names.get(a, a) for a in args], environ={})
    assert exited.value.code == 2
    assert needle in capsys.readouterr().err


def test_a_bad_key_stops_the_process_with_one_line(cert):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "wsfan",
            "--port",
            str(free_port()),
            "--tls-cert",
            str(cert[0]),
            "--tls-key",
            str(cert[0]),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "not a PEM certificate and matching private key" in done.stderr


# ---------------------------------------------------------------- deploy/nginx/ with the real nginx


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    if found is None:
        hint = "nginx is not installed: `apt-get install nginx`"
        if os.environ.get("WSFAN_REQUIRE_NGINX") == "1":  # .ci/run installs it: missing is a failure there
            pytest.fail(hint, pytrace=False)
        pytest.skip(hint)
    return found


def sample_with(ws_port: int, http_port: int, listen: int, cert: tuple[Path, Path], access_log: Path) -> str:
    """deploy/nginx/wsfan.conf with only its ``# CHANGE`` lines replaced (each must be found exactly once)."""
    text = SAMPLE.read_text()
    for old, new in [
        ("server 127.0.0.1:8765;", f"server 127.0.0.1:{ws_port};"),
        ("server 127.0.0.1:8766;", f"server 127.0.0.1:{http_port};"),
        ("listen 443 ssl;", f"listen 127.0.0.1:{listen} ssl;"),
        ("/etc/ssl/wsfan/fullchain.pem", str(cert[0])),
        ("/etc/ssl/wsfan/privkey.pem", str(cert[1])),
        ("/var/log/nginx/wsfan.access.log", str(access_log)),
    ]:
        assert text.count(old) == 1, f"deploy/nginx/wsfan.conf no longer has {old!r}"
        text = text.replace(old, new)
    return text


class Proxy:
    """nginx (one process, no daemon) serving the sample on ``port``, its logs in ``folder``."""

    def __init__(self, folder: Path, node: ServerProcess, http_port: int, cert: tuple[Path, Path]) -> None:
        self.folder = folder
        self.port = free_port()
        self.access_log = folder / "access.log"
        self.error_log = folder / "error.log"
        (folder / "wsfan.conf").write_text(
            sample_with(node.port, http_port, self.port, cert, self.access_log)
        )
        temps = "\n".join(
            f"    {kind}_temp_path {folder}/{kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        (folder / "nginx.conf").write_text(
            f"daemon off;\nmaster_process off;\npid {folder}/nginx.pid;\nerror_log {self.error_log} info;\n"
            f"events {{ worker_connections 256; }}\n"
            f"http {{\n{temps}\n    include {folder}/wsfan.conf;\n}}\n"
        )
        self.proc = subprocess.Popen(
            [nginx_binary(), "-p", str(folder), "-c", str(folder / "nginx.conf"), "-e", str(self.error_log)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            wait_for_port(self.port, proc=self.proc)
        except (RuntimeError, TimeoutError):
            self.stop()
            raise RuntimeError(f"nginx did not start: {self.logs()}") from None

    def logs(self) -> str:
        return "".join(p.read_text() for p in (self.access_log, self.error_log) if p.exists())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: finish and flush the access log
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def proxied(make_server, cert, tmp_path) -> Iterator[tuple[ServerProcess, Proxy]]:
    http_port = free_port()
    node = make_server(
        "--jwt-secret",
        SECRET,
        "--http-port",
        str(http_port),
        "--max-message-size",
        "1024",
        "--rate-limit",
        "0",
    ).start()
    wait_for_port(http_port)
    proxy = Proxy(tmp_path, node, http_port, cert)
    yield node, proxy
    proxy.stop()


async def test_wss_through_nginx_delivers_and_keeps_close_codes(proxied, cert):
    node, proxy = proxied
    ctx = client_context(cert[0])
    url = f"wss://localhost:{proxy.port}/ws"
    origin = {"Origin": f"https://localhost:{proxy.port}"}
    sub = await WebsocketsPeer.connect(f"{url}?token={token('alice')}", ssl=ctx, additional_headers=origin)
    pub = await PicowsPeer.connect(f"{url}?token={token('bob')}", ssl_context=ctx)
    assert sub.welcome["user"] == "alice"
    for peer in (sub, pub):
        assert (await peer.request("join", room="via-nginx"))["success"] is True
    for n in range(1, 6):
        ack = await pub.request("publish", room="via-nginx", payload={"n": n})
        assert ack["data"]["seq"] == n
    got = [await sub.recv_type("message") for _ in range(5)]
    assert [(m["seq"], m["payload"]["n"], m["from"]) for m in got] == [(n, n, "bob") for n in range(1, 6)]
    # A close code the node chooses crosses nginx unchanged: 1009 for a message over --max-message-size.
    await pub.send_raw("x" * 2000)
    assert await pub.wait_closed(5) == 1009
    # And the node's 1001 on shutdown reaches the client through the proxy.
    node.proc.send_signal(signal.SIGTERM)  # drain; the loop stays free to answer the close
    await asyncio.wait_for(sub.closed.wait(), 10)
    assert sub.close_code == 1001


async def test_token_in_the_query_stays_out_of_nginx_logs(proxied, cert):
    node, proxy = proxied
    secret_token = token("carol")
    peer = await WebsocketsPeer.connect(
        f"wss://localhost:{proxy.port}/ws?token={secret_token}", ssl=client_context(cert[0])
    )
    assert peer.welcome["user"] == "carol"
    assert await peer.close_handshake(1000) == 1000
    # A refused upgrade (bad token: 401) is logged too, still without the query.
    async with aiohttp.ClientSession() as http:
        bad = f"https://localhost:{proxy.port}/ws?token=not.a.jwt-SENTINEL"
        headers = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
                   "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}  # fmt: skip
        async with http.get(bad, headers=headers, ssl=client_context(cert[0])) as r:
            assert r.status == 401
    proxy.stop()  # flushes the access log
    access = proxy.access_log.read_text()
    assert re.search(r'"GET /ws HTTP/1\.1" 101 ', access), access
    assert re.search(r'"GET /ws HTTP/1\.1" 401 ', access), access
    logs = proxy.logs()
    assert secret_token not in logs and "SENTINEL" not in logs and "token=" not in logs


def test_sample_timeouts_outlast_the_heartbeat():
    """nginx closes a proxied connection idle for proxy_read_timeout; the node's own idle limit must come first."""
    from wsfan.server.config import Settings

    text = SAMPLE.read_text()
    s = Settings()
    idle_s = (s.heartbeat + s.heartbeat_timeout) / 1000
    for directive in ("proxy_read_timeout", "proxy_send_timeout"):
        found = re.findall(rf"^\s*{directive}\s+(\d+)s;", text, re.M)
        assert found, f"{directive} missing from deploy/nginx/wsfan.conf"
        assert all(int(v) > idle_s for v in found), (directive, found, idle_s)


# ---------------------------------------------------------------- rediss:// to Redis


async def test_nodes_reach_redis_over_tls(make_server, cert):
    """``--broker rediss://...?ssl_ca_certs=FILE``: redis-server with TLS only, its certificate verified."""
    from helpers.redis_server import RedisServer, require_redis

    redis = RedisServer(require_redis())
    # The TLS port is the server's only port (--port 0 turns plain TCP off).
    redis.extra = ["--tls-port", str(redis.port), "--port", "0", "--tls-cert-file", str(cert[0]),
                   "--tls-key-file", str(cert[1]), "--tls-ca-cert-file", str(cert[0]),
                   "--tls-auth-clients", "no"]  # fmt: skip
    redis.start()
    try:
        url = f"rediss://localhost:{redis.port}/0?ssl_ca_certs={cert[0]}"
        a = make_server("--broker", url, "--node-id", "A", "--rate-limit", "0").start()
        b = make_server("--broker", url, "--node-id", "B", "--rate-limit", "0").start()
        sub = await PicowsPeer.connect(b.url)
        pub = await PicowsPeer.connect(a.url)
        for peer in (sub, pub):
            assert (await peer.request("join", room="over-tls"))["type"] == "ack"
        acks = [(await pub.request("publish", room="over-tls", payload=i))["data"]["seq"] for i in range(3)]
        assert acks == [1, 2, 3]
        got = [await sub.recv_type("message") for _ in range(3)]
        assert [(m["seq"], m["payload"]) for m in got] == [(1, 0), (2, 1), (3, 2)]
        assert "connected to redis at rediss://" in a.output()
        await sub.close()
        await pub.close()
    finally:
        redis.stop()
