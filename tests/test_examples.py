"""examples/ as real servers (``wsfan run examples.X:app`` / ``python -m wsfan run`` / ``--app``), driven by the Python client."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from examples import chat, dashboard, rpc
from helpers.ports import free_port, wait_for_port
from helpers.servers import ROOT, ServerProcess
from helpers.waiting import run
from wsfan.client import Broadcast, connect
from wsfan.client.errors import Forbidden, InvalidMessage, NotJoined, ProtocolError

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "DASHBOARD_TICK_S": "0.05"}


@pytest.fixture
def served(request: pytest.FixtureRequest) -> Iterator[str]:
    """``<command> run examples.<name>:app`` on a free port; the ws:// URL."""
    command, name = request.param
    port = free_port()
    argv = (
        [str(Path(sys.executable).with_name("wsfan"))]
        if command == "wsfan"
        else [sys.executable, "-m", "wsfan"]
    )
    proc = subprocess.Popen(
        [*argv, "run", f"examples.{name}:app", "--host", "127.0.0.1", "--port", str(port), "--drain-timeout", "1"],
        cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_port(port, proc=proc)
        yield f"ws://127.0.0.1:{port}/ws"
    finally:
        proc.terminate()
        assert proc.wait(15) == 0


@pytest.mark.parametrize("served", [("wsfan", "chat")], indirect=True)
def test_chat(served: str) -> None:
    async def go() -> None:
        async with connect(served + "?name=alice") as alice, connect(served + "?name=bob") as bob:
            room = "chat:lobby"
            for c in (alice, bob):
                await c.join(room)
                await c.request(chat.Enter(room=room))
            assert (await bob.request(chat.Say(room=room, text="hi")))["seq"] == 3
            seen = []
            async for m in alice.messages(room):
                seen.append((m.sender, m.payload))
                if len(seen) == 3:
                    break
            assert seen == [
                ("server", {"event": "joined", "user": "alice"}),
                ("server", {"event": "joined", "user": "bob"}),
                ("server", {"event": "said", "user": "bob", "text": "hi"}),
            ]
            with pytest.raises(NotJoined):
                await alice.request(chat.Say(room="chat:elsewhere", text="hi"))
            with pytest.raises(InvalidMessage):
                await alice.request(chat.Say(room=room, text=""))
            with pytest.raises(Forbidden):
                await alice.join("not-chat")
            assert await alice.ping() > 0  # the design's ping: built in
            await bob.close()
            async for m in alice.messages(room):
                assert m.payload == {"event": "left", "user": "bob", "code": 1000}
                break

    run(go())


def test_chat_needs_a_name() -> None:
    srv = ServerProcess("--app", "examples.chat:app", env={"PYTHONPATH": str(ROOT)}).start()
    try:
        import websockets

        async def go() -> None:
            with pytest.raises(websockets.InvalidStatus) as refused:
                await websockets.connect(srv.url)
            assert refused.value.response.status_code == 401

        run(go())
    finally:
        srv.kill()


@pytest.mark.parametrize("served", [("python", "dashboard")], indirect=True)
def test_dashboard_feed(served: str) -> None:
    async def go() -> None:
        async with connect(served) as c:
            await c.join(dashboard.ROOM)
            ticks = []
            async for m in c.messages(dashboard.ROOM):
                assert set(m.payload) == {"tick", "node", "load1", "connections"} and m.sender == "server"
                ticks.append(m.payload["tick"])
                if len(ticks) == 3:
                    break
            assert ticks == sorted(ticks) and len(set(ticks)) == 3
            snap = await c.request(dashboard.Snapshot())
            assert snap["tick"] >= ticks[-1] and snap["connections"] == 1
            with pytest.raises(Forbidden):
                await c.publish(dashboard.ROOM, {"tick": -1})  # read-only room

    run(go())


def test_dashboard_across_nodes(redis_server, make_server: type[ServerProcess]) -> None:
    """The feed runs on node A; a client of node B (no app) gets it through the broker."""
    env = {"PYTHONPATH": str(ROOT), "DASHBOARD_TICK_S": "0.05"}
    make_server("--app", "examples.dashboard:app", "--broker", redis_server.url, env=env).start()
    b = make_server("--broker", redis_server.url).start()

    async def go() -> None:
        async with connect(b.url) as c:
            await c.join(dashboard.ROOM)
            async for m in c.messages(dashboard.ROOM):
                assert m.sender == "server" and m.payload["node"] != c.welcome.node
                break

    run(go())


def test_dashboard_announcement_reaches_every_connection(
    redis_server, make_server: type[ServerProcess]
) -> None:
    """An operator on node A announces; a screen on A and a connection of node B (no app, in no
    room) each get the broadcast once; a non-operator is refused."""
    env = {"PYTHONPATH": str(ROOT), "DASHBOARD_TICK_S": "0.05", "DASHBOARD_OPERATOR_KEY": "op-key"}
    a = make_server("--app", "examples.dashboard:app", "--broker", redis_server.url, env=env).start()
    b = make_server("--broker", redis_server.url).start()

    async def go() -> None:
        async with (
            connect(a.url + "?operator=op-key") as op,
            connect(a.url) as screen,
            connect(b.url) as other,
        ):
            with pytest.raises(Forbidden):
                await screen.request(dashboard.Announce(text="not me"))
            await op.request(dashboard.Announce(text="maintenance at 18:00"))
            for c in (op, screen, other):
                push = await c.pushes().get(5)
                assert isinstance(push, Broadcast)
                assert push.payload == {"announcement": "maintenance at 18:00", "node": op.welcome.node}
                assert c.stats.pushes == 1

    run(go())


def test_dashboard_any_operator_parameter_is_an_answer_not_a_crash(make_server: type[ServerProcess]) -> None:
    """A ?operator= with non-ASCII characters (or bytes that are not UTF-8) is a wrong key: the
    connection opens as a screen. hmac.compare_digest raised TypeError on a non-ASCII str, so
    each such upgrade was a 500 and a traceback in the log (hostile finding 01)."""
    env = {"PYTHONPATH": str(ROOT), "DASHBOARD_TICK_S": "5", "DASHBOARD_OPERATOR_KEY": "op-key"}
    srv = make_server("--app", "examples.dashboard:app", env=env).start()

    async def go() -> None:
        for given in ("%C3%A9", "%FF%FE", "op-key%C3%A9", "\u00e9"):
            async with connect(srv.url + "?operator=" + given) as c:
                with pytest.raises(Forbidden):
                    await c.request(dashboard.Announce(text="not an operator"))
        async with connect(srv.url + "?operator=op-key") as op:
            await op.request(dashboard.Announce(text="still works"))

    run(go())
    assert "Traceback" not in srv.output()


@pytest.mark.parametrize("served", [("python", "rpc")], indirect=True)
def test_rpc(served: str) -> None:
    async def go() -> None:
        async with connect(served) as c:
            assert await c.request(rpc.Call(method="add", params={"a": 1, "b": 2.5})) == 3.5
            assert (await c.request(rpc.Call(method="whoami")))["conn"] == c.welcome.conn
            with pytest.raises(ProtocolError) as err:
                await c.request(rpc.Call(method="nope"))
            assert err.value.code == "METHOD_NOT_FOUND"
            with pytest.raises(ProtocolError) as err:
                await c.request(rpc.Call(method="add", params={"a": "x"}))
            assert err.value.code == "INVALID_PARAMS"
            with pytest.raises(ProtocolError) as err:  # was null (JSON) / inf (MessagePack): finding 10
                await c.request(rpc.Call(method="add", params={"a": 1e308, "b": 1e308}))
            assert str(err.value) == "INVALID_PARAMS: the sum is out of range"
            # Calls overlap, answers come in the order sent (the slow one first).
            slow = asyncio.ensure_future(c.request(rpc.Call(method="sleep", params={"seconds": 0.2})))
            await asyncio.sleep(0)
            quick = asyncio.ensure_future(c.request(rpc.Call(method="add", params={"a": 1, "b": 1})))
            done, _ = await asyncio.wait([slow, quick], return_when=asyncio.FIRST_COMPLETED)
            assert slow in done
            assert await quick == 2

    run(go())


@pytest.mark.parametrize(
    "how",
    ["python examples/X.py", "wsfan run examples/X.py:app", "python -m wsfan run examples/X.py:app"],
)
@pytest.mark.parametrize("name", ["chat", "dashboard", "rpc"])
def test_each_example_starts_from_another_directory(tmp_path: Path, how: str, name: str) -> None:
    """From a directory that is not the repository (no PYTHONPATH either), an example runs as a
    script with the server's flags (``app.run()`` takes the command line) or as a file given to
    ``wsfan run``. Before, the script ignored its flags (it listened on 8765 whatever was given)
    and ``wsfan run examples.X:app`` found no module outside the repository root."""
    port = free_port()
    script = ROOT / "examples" / f"{name}.py"
    if how.startswith("python examples"):
        argv = [sys.executable, str(script)]
    elif how.startswith("wsfan"):
        argv = [str(Path(sys.executable).with_name("wsfan")), "run", f"{script}:app"]
    else:
        argv = [sys.executable, "-m", "wsfan", "run", f"{script}:app"]
    env = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}
    proc = subprocess.Popen(
        [*argv, "--host", "127.0.0.1", "--port", str(port), "--drain-timeout", "1"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        wait_for_port(port, proc=proc)

        async def go() -> None:
            async with connect(f"ws://127.0.0.1:{port}/ws?name=ann") as c:
                assert (await c.ping()) >= 0

        run(go())
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
