"""The browser client (client/js/wsfan.js) and the ``--demo`` page, in node and in real headless browsers.

* The JS unit tests (tests/browser/*.test.mjs: backoff, dedupe, recovery, timeouts,
  reconnect rules against a fake socket) run under ``node --test``.
* The demo routes are checked over plain HTTP: right Content-Type, off without ``--demo``.
* The end-to-end scenarios run in two engines: Debian's ``chromium`` through
  playwright-core, and Debian's ``firefox-esr`` through puppeteer-core over WebDriver
  BiDi, so both engines' real handshakes (their headers, the extensions they offer,
  their close behaviour) stay covered (tests/browser/driver.mjs takes one command per
  line, so the scenario is written here, next to the server processes and the Python
  client that take part in it):

  - single node: the page chats with a Python client, the server restarts with its
    history gone, and the page reconnects, shows the gap, and goes on;
  - two nodes behind Redis: the page's node is killed, messages are published on the
    other node while it is down, and after the restart the page shows each of them once,
    in order (history lives in Redis, so a node restart loses nothing).

Missing node, npm, chromium or firefox-esr skips these tests and says how to install them;
``WSFAN_REQUIRE_BROWSER=1`` (CI) turns that into a failure, so CI cannot go green by skipping.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers.servers import ServerProcess
from helpers.waiting import run
from wsfan.client import connect

ROOT = Path(__file__).resolve().parents[1]
BROWSER_DIR = ROOT / "tests" / "browser"
DRIVER = BROWSER_DIR / "driver.mjs"
SCREENSHOT_DIR = Path(os.environ.get("WSFAN_SCREENSHOT_DIR", tempfile.gettempdir()))
INSTALL_HINT = (
    "apt-get install -y chromium firefox-esr nodejs npm (Debian), then `npm ci` in tests/browser; "
    "WSFAN_CHROMIUM=/path/to/chromium or WSFAN_FIREFOX=/path/to/firefox to use another browser binary"
)
ENGINES = ("chromium", "firefox")

# Console errors the browsers print by themselves while the server is down: expected, not page bugs.
EXPECTED_CONSOLE = (
    "WebSocket connection to",  # Chromium
    "Failed to load resource",
    "net::ERR_CONNECTION_REFUSED",
    "can’t establish a connection to the server at ws://",  # Firefox
    "was interrupted while the page was loading",
)


def _missing(what: str) -> None:
    """Skip, or fail when CI said the browser tests must run."""
    message = f"{what} is not available: {INSTALL_HINT}"
    if os.environ.get("WSFAN_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{message}; WSFAN_REQUIRE_BROWSER=1 makes this a failure", pytrace=False)
    pytest.skip(message)


def require_node() -> str:
    node = shutil.which("node")
    if node is None:
        _missing("node")
    return node


def require_browser(engine: str) -> str:
    """The binary of ``engine`` (chromium or firefox): from WSFAN_CHROMIUM / WSFAN_FIREFOX, else PATH."""
    if engine == "firefox":
        path = os.environ.get("WSFAN_FIREFOX") or shutil.which("firefox-esr") or shutil.which("firefox")
    else:
        path = (
            os.environ.get("WSFAN_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
        )
    if path is None or not os.access(path, os.X_OK):
        _missing("firefox-esr" if engine == "firefox" else "chromium")
    return path


def require_drivers() -> None:
    """playwright-core and puppeteer-core from tests/browser/package-lock.json; ``npm ci`` when absent.

    Installing here keeps ``make test`` working on a fresh clone; .ci/run does the same
    ahead of time so the install is not counted in a test's time.
    """
    modules = BROWSER_DIR / "node_modules"
    if all((modules / name / "package.json").exists() for name in ("playwright-core", "puppeteer-core")):
        return
    npm = shutil.which("npm")
    if npm is None:
        _missing("npm (to install playwright-core and puppeteer-core)")
    done = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=BROWSER_DIR,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0:
        _missing(f"the browser drivers (npm ci failed: {done.stderr.strip()[-500:]})")


class Browser:
    """tests/browser/driver.mjs as a child process: one JSON command per line, one JSON answer each."""

    def __init__(self, node: str, engine: str, path: str) -> None:
        self.engine = engine
        self.log = tempfile.NamedTemporaryFile(prefix="wsfan-browser-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [node, str(DRIVER)],
            cwd=BROWSER_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            env={**os.environ, "WSFAN_BROWSER": engine, "WSFAN_BROWSER_PATH": path},
        )
        self._buffer = b""
        self.broken = False  # a missed answer or a dead driver: not to be shared with the next test
        self.info = self._answer(60.0)

    def _answer(self, timeout: float) -> Any:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.broken = True
                raise TimeoutError(f"browser driver silent for {timeout}s; log: {self.output()}")
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    self.broken = True
                    raise RuntimeError(f"browser driver exited ({self.proc.wait(5)}): {self.output()}")
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        answer = json.loads(line)
        if not answer.get("ok"):
            raise AssertionError(f"browser: {answer.get('error')}")
        return answer.get("result")

    def call(self, cmd: str, timeout: float = 10.0, **fields: Any) -> Any:
        """Run one driver command; ``timeout`` (s) bounds the browser-side wait too."""
        assert self.proc.stdin is not None
        command = {"cmd": cmd, "timeout": int(timeout * 1000), **fields}
        self.proc.stdin.write(json.dumps(command).encode() + b"\n")
        self.proc.stdin.flush()
        return self._answer(timeout + 10.0)

    async def __call__(self, cmd: str, timeout: float = 10.0, **fields: Any) -> Any:
        """The same from async test code, without blocking the loop the Python client runs on."""
        return await asyncio.to_thread(self.call, cmd, timeout, **fields)

    def page_errors(self) -> list[str]:
        """Uncaught exceptions and console errors that are not the browser's own network noise."""
        return [p for p in self.call("problems") if not any(e in p for e in EXPECTED_CONSOLE)]

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-4000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(b'{"cmd":"quit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(15)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
        os.unlink(self.log.name)


class Engine:
    """One browser process of one engine, shared by the module's tests; a new one replaces a broken one."""

    def __init__(self, engine: str) -> None:
        self.engine = engine
        self.node = require_node()
        self.path = require_browser(engine)
        require_drivers()
        self.current: Browser | None = None

    def fresh(self) -> Browser:
        """The shared browser on a blank page with no problems recorded (the last test's page is left).

        A driver that exited or missed an answer (its pipe may hold a late reply) is closed and replaced.
        """
        b = self.current
        if b is not None and not b.broken and b.proc.poll() is None:
            try:
                b.call("reset")
                return b
            except (AssertionError, RuntimeError, TimeoutError, OSError, ValueError):
                pass
        if b is not None:
            b.close()
        self.current = Browser(self.node, self.engine, self.path)
        return self.current

    def close(self) -> None:
        if self.current is not None:
            self.current.close()


@pytest.fixture(scope="module", params=ENGINES)
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    """One browser per engine for the module: pytest runs each engine's tests in a row, so each engine starts once."""
    e = Engine(request.param)
    yield e
    e.close()


@pytest.fixture
def browser(engine: Engine) -> Browser:
    """The same scenario in each engine (test ids end in [chromium] / [firefox])."""
    return engine.fresh()


def http_get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


# ---------------------------------------------------------------- node unit tests


def test_js_client_unit_tests_pass_under_node():
    node = require_node()
    files = sorted(str(p) for p in BROWSER_DIR.glob("*.test.mjs"))
    assert files, "no tests/browser/*.test.mjs"
    done = subprocess.run([node, "--test", *files], cwd=ROOT, capture_output=True, text=True, timeout=60)
    summary = [line for line in done.stdout.splitlines() if line.startswith(("# pass", "# fail", "not ok"))]
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "# fail 0" in summary, summary


# ---------------------------------------------------------------- demo routes over plain HTTP


def run_node_script(name: str, *args: str) -> dict[str, Any]:
    """Run tests/browser/<name> under node against a real server; the JSON line it prints."""
    node = require_node()
    done = subprocess.run(
        [node, "--experimental-websocket", "--no-warnings", str(BROWSER_DIR / name), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_js_client_reads_every_message_with_a_stream_per_get_from_a_real_server():
    """Newcomer finding 2: a stream made after the messages arrived saw none of them, and each one leaked."""
    with ServerProcess() as server:
        out = run_node_script("streams_real.mjs", server.url)
    assert out["got"] == list(range(20))
    assert out["timeout"] == ["MessageTimeout", "no message in room 'chat.general' within 50 ms"]
    assert out["late"] == "late"
    assert out["handed"] == 29 and out["buffered"] == 0
    # newcomer finding 3, JS side: the rule's edges arrive exactly, the rest is refused before sending
    assert out["arrived"] == [True] * 8
    assert out["refusals"] == ["refused"] * 8 and out["errors"] == {}


def test_demo_serves_page_and_module_with_their_content_types():
    with ServerProcess("--demo") as server:
        base = f"http://127.0.0.1:{server.port}"
        status, headers, body = http_get(base + "/")
        assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
        assert b'import { connect, Backoff, ProtocolError } from "./wsfan.js"' in body
        assert body == (ROOT / "client" / "js" / "demo.html").read_bytes()
        module = (ROOT / "client" / "js" / "wsfan.js").read_bytes()
        for path in ("/wsfan.js", "/client.js"):
            status, headers, body = http_get(base + path)
            assert status == 200 and headers["Content-Type"] == "text/javascript; charset=utf-8"
            assert body == module
        assert http_get(base + "/?room=x")[0] == 200  # the query string does not change the route
        assert http_get(base + "/nope.js")[0] == 404
        assert http_get(base + "/metrics")[0] == 200  # what the page polls, on the same port
    with ServerProcess() as server:
        assert http_get(f"http://127.0.0.1:{server.port}/")[0] == 404  # off unless --demo
        assert http_get(f"http://127.0.0.1:{server.port}/wsfan.js")[0] == 404


# ---------------------------------------------------------------- end to end in Chromium and Firefox


CONNECTED = '#status[data-state="connected"]'
CHAT_LINES = "#messages li:not(.system) .text"
SHOWN_SEQS = "[...document.querySelectorAll('#messages li[data-seq]')].map((li) => +li.dataset.seq)"


async def open_chat(browser: Browser, port: int, room: str, query: str = "") -> None:
    """Open the demo page, wait for its connection, join ``room`` the way a person would."""
    await browser("goto", url=f"http://127.0.0.1:{port}/?room={room}&name=alice&backoffCap=400{query}")
    await browser("wait", selector=CONNECTED)
    await browser("click", selector="#join")
    await browser("wait_text", selector="#roomline", text=f"in room {room}")
    # the counters panel parsed /metrics from the same port
    await browser(
        "wait_js", expr="Number(document.querySelector('[data-metric=\"connections\"]')?.textContent) >= 1"
    )


async def chat_both_ways(browser: Browser, python_client: Any, room: str) -> None:
    await python_client.publish(room, {"text": "hello from python", "name": "bob"})
    await browser("wait_text", selector="#messages", text="hello from python")
    await browser("fill", selector="#text", value="hi from the browser")
    await browser("press", selector="#text", key="Enter")
    got = await python_client.messages(room).get(5)
    assert got.payload == {"text": "hi from the browser", "name": "alice"}
    await browser("wait_text", selector="#messages", text="hi from the browser")  # own line, from the ack


async def page_events(browser: Browser, kind: str) -> list[dict[str, Any]]:
    expr = f"wsfanDemo.events.filter((e) => e.type === {json.dumps(kind)}).map((e) => ({{...e, welcome: undefined, error: e.error ? String(e.error) : undefined}}))"
    return await browser("eval", expr=expr)


def test_page_chats_and_survives_a_single_node_restart_with_a_gap(browser):
    """Single node: history dies with the process, so the page must say so (gap) and carry on."""
    room = "browser-single"

    async def body(server: ServerProcess) -> None:
        await open_chat(browser, server.port, room)
        async with connect(server.url, backoff_base=0.05, backoff_cap=0.2, stable_after=0) as bob:
            await bob.join(room)
            await chat_both_ways(browser, bob, room)
            assert await asyncio.to_thread(server.stop) == 0  # graceful: close 1001 to everyone
            await browser("wait", selector='#status[data-state="reconnecting"]')
            await asyncio.to_thread(server.start)  # same port, empty history: seq starts over
            await browser("wait", selector=CONNECTED, timeout=15)
            await browser("wait_text", selector="#messages", text="lost this room's history")
            gaps = await page_events(browser, "gap")
            assert [(g["room"], g["since"], g["seq"], g["reset"]) for g in gaps] == [(room, 2, 0, True)]
            disconnected = await page_events(browser, "disconnected")
            assert [(d["code"], d["willReconnect"]) for d in disconnected] == [(1001, True)]
            assert int(await browser("eval", expr="document.getElementById('attempts').textContent")) >= 1
            for _ in range(100):  # bob reconnects on its own schedule
                if bob.connected:
                    break
                await asyncio.sleep(0.05)
            await bob.publish(room, {"text": "after the restart", "name": "bob"})
            await browser("wait_text", selector="#messages", text="after the restart")
            seqs = await browser("eval", expr=SHOWN_SEQS)
            assert seqs == [1, 2, 1]  # the new numbering is shown, not dropped as duplicates
            await browser(
                "screenshot", path=str(SCREENSHOT_DIR / f"wsfan-demo-single-node-{browser.engine}.png")
            )
        assert browser.page_errors() == []

    with ServerProcess("--demo", "--rate-limit", "0") as server:
        run(body(server), timeout=50)


def test_page_detects_a_frozen_server_with_app_level_pings_and_reconnects(browser):
    """A browser cannot see ping frames: a server that stops answering is found by the client's own pings."""
    room = "browser-frozen"

    async def body(server: ServerProcess) -> None:
        await open_chat(browser, server.port, room, "&ping=300")
        server.pause()  # SIGSTOP: the socket stays open, nothing answers
        try:
            await browser("wait", selector='#status[data-state="reconnecting"]', timeout=5)
            gone = await page_events(browser, "disconnected")
            assert [d["code"] for d in gone] == [1006] and "no pong within 300 ms" in gone[0]["reason"]
        finally:
            server.resume()
        await browser("wait", selector=CONNECTED, timeout=15)
        recovered = await page_events(browser, "recovered")
        assert [(r["room"], r["since"], r["seq"]) for r in recovered] == [(room, 0, 0)]
        assert browser.page_errors() == []

    with ServerProcess("--demo", "--rate-limit", "0") as server:
        run(body(server), timeout=50)


def test_page_recovers_every_message_published_while_its_node_was_down(browser):
    """Two nodes behind Redis: the page's node crashes, the other keeps publishing, nothing is lost."""
    if not (ROOT / "server" / "broker" / "redis.py").exists():
        pytest.skip("needs the Redis broker (server/broker/redis.py)")
    from helpers.redis_server import RedisServer, require_redis

    room = "browser-cluster"
    redis = RedisServer(require_redis()).start()

    async def body(node_a: ServerProcess, node_b: ServerProcess) -> None:
        await open_chat(browser, node_a.port, room)
        async with connect(node_b.url) as bob:
            await bob.join(room)
            await chat_both_ways(browser, bob, room)
            await asyncio.to_thread(node_a.kill)  # a crash: no close frame, the page sees 1006
            await browser("wait", selector='#status[data-state="reconnecting"]')
            away = [f"while you were away {i}" for i in range(1, 6)]
            for text in away:
                await bob.publish(room, {"text": text, "name": "bob"})
            await asyncio.to_thread(node_a.start)
            await browser("wait", selector=CONNECTED, timeout=15)
            await browser("wait_text", selector="#messages", text=away[-1])
            await bob.publish(room, {"text": "live again", "name": "bob"})
            await browser("wait_text", selector="#messages", text="live again")
            texts = await browser("texts", selector=CHAT_LINES)
            # once each, in order
            assert texts == ["hello from python", "hi from the browser", *away, "live again"]
            seqs = await browser("eval", expr=SHOWN_SEQS)
            assert seqs == list(range(1, 9))
            recovered = await page_events(browser, "recovered")
            assert [(r["room"], r["since"], r["seq"]) for r in recovered] == [(room, 2, 7)]
            assert await page_events(browser, "gap") == []
            assert [d["code"] for d in await page_events(browser, "disconnected")] == [1006]
            await browser("wait_text", selector="#messages", text="nothing lost")
            await browser(
                "screenshot",
                path=str(SCREENSHOT_DIR / f"wsfan-demo-recovered-{browser.engine}.png"),
                fullPage=True,
            )
        assert browser.page_errors() == []

    try:
        with (
            ServerProcess("--demo", "--broker", redis.url, "--rate-limit", "0") as node_a,
            ServerProcess("--broker", redis.url, "--rate-limit", "0") as node_b,
        ):
            run(body(node_a, node_b), timeout=50)
    finally:
        redis.stop()


def test_page_negotiates_permessage_deflate_and_reads_compressed_deliveries(browser):
    """Both engines offer permessage-deflate on every connection: with --compression the server
    accepts, compresses what it delivers to the page, and inflates what the page compresses."""
    room = "browser-deflate"

    async def body(server: ServerProcess) -> None:
        await open_chat(browser, server.port, room)
        async with connect(server.url) as bob:
            await bob.join(room)
            await chat_both_ways(browser, bob, room)
        assert server.metric("wsfan_compressed_deliveries_total") >= 1  # bob's message went out compressed
        assert browser.page_errors() == []

    with ServerProcess(
        "--demo", "--rate-limit", "0", "--compression", "--compression-threshold", "16"
    ) as server:
        run(body(server), timeout=40)
