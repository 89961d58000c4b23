"""Two independent test peers: a picows client and one on the ``websockets`` library.

They share one small interface (send a message, wait for a reply by requestId,
wait for the next message of a type) so that a protocol test can run against
either, and a bug in one client library cannot hide a bug in the server.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import msgspec
import websockets
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

_ids = itertools.count(1)


class Peer:
    """Common behaviour: message buffer, request/reply matching, waiting for closes."""

    msgpack: bool = False

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.close_code: int | None = None
        self.closed = asyncio.Event()
        self.welcome: dict[str, Any] = {}

    def encode(self, obj: Any) -> bytes | str:
        if self.msgpack:
            return msgspec.msgpack.encode(obj)
        return msgspec.json.encode(obj).decode()

    def decode(self, data: bytes | str) -> dict[str, Any]:
        if self.msgpack:
            return msgspec.msgpack.decode(data)
        return msgspec.json.decode(data)

    async def send(self, obj: Any) -> None:
        await self.send_raw(self.encode(obj))

    async def send_raw(self, data: bytes | str) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def close_handshake(self, code: int = 1000, timeout: float = 5.0) -> int | None:
        """Send a close frame and wait for the server's: the code it answered with (None: no close frame)."""
        raise NotImplementedError

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        return await asyncio.wait_for(self.inbox.get(), timeout)

    async def recv_type(self, type_: str, timeout: float = 5.0) -> dict[str, Any]:
        """The next message of ``type_``; others are dropped."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            left = deadline - asyncio.get_running_loop().time()
            msg = await self.recv(max(left, 0.001))
            if msg.get("type") == type_:
                return msg

    async def request(self, type_: str, timeout: float = 5.0, **fields: Any) -> dict[str, Any]:
        """Send a message with a fresh id and return the one reply that carries it."""
        rid = f"r{next(_ids)}"
        await self.send({"type": type_, "id": rid, **fields})
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            left = deadline - asyncio.get_running_loop().time()
            msg = await self.recv(max(left, 0.001))
            if msg.get("requestId") == rid:
                return msg

    async def no_message(self, within: float = 0.3) -> None:
        """Assert that nothing arrives for ``within`` seconds."""
        try:
            msg = await asyncio.wait_for(self.inbox.get(), within)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected message {msg}")

    async def wait_closed(self, timeout: float = 5.0) -> int | None:
        await asyncio.wait_for(self.closed.wait(), timeout)
        return self.close_code


class _PicowsListener(WSListener):
    def __init__(self, peer: PicowsPeer) -> None:
        self.peer = peer

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        peer = self.peer
        if frame.msg_type in (WSMsgType.TEXT, WSMsgType.BINARY):
            if not peer.paused_reading:
                peer.inbox.put_nowait(peer.decode(frame.get_payload_as_bytes()))
        elif frame.msg_type == WSMsgType.CLOSE:
            peer.close_code = int(frame.get_close_code())
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.peer.closed.set()


class PicowsPeer(Peer):
    def __init__(self, msgpack: bool = False) -> None:
        super().__init__()
        self.msgpack = msgpack
        self.transport: WSTransport | None = None
        self.paused_reading = False

    @classmethod
    async def connect(cls, url: str, msgpack: bool = False, **kwargs: Any) -> PicowsPeer:
        peer = cls(msgpack)
        headers = {"Sec-WebSocket-Protocol": "msgpack"} if msgpack else None
        peer.transport, _ = await ws_connect(
            lambda: _PicowsListener(peer), url, extra_headers=headers, **kwargs
        )
        peer.welcome = await peer.recv()
        return peer

    async def send_raw(self, data: bytes | str) -> None:
        assert self.transport is not None
        if isinstance(data, str):
            self.transport.send(WSMsgType.TEXT, data.encode())
        else:
            self.transport.send(WSMsgType.BINARY, data)

    def stop_reading(self) -> None:
        """Stop reading the socket at all, so the server's writes back up (slow consumer)."""
        assert self.transport is not None
        self.transport.underlying_transport.pause_reading()

    def resume_reading(self) -> None:
        assert self.transport is not None
        self.transport.underlying_transport.resume_reading()

    async def close(self) -> None:
        if self.transport is not None and not self.transport.is_disconnected:
            self.transport.send_close(1000)
            self.transport.disconnect()

    async def close_handshake(self, code: int = 1000, timeout: float = 5.0) -> int | None:
        assert self.transport is not None
        self.transport.send_close(code)  # the listener records the server's close code, then disconnects
        await asyncio.wait_for(self.closed.wait(), timeout)
        return self.close_code


class WebsocketsPeer(Peer):
    """The ``websockets`` library: an implementation independent of picows."""

    def __init__(self, ws: websockets.ClientConnection, msgpack: bool) -> None:
        super().__init__()
        self.ws = ws
        self.msgpack = msgpack
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def connect(cls, url: str, msgpack: bool = False, **kwargs: Any) -> WebsocketsPeer:
        ws = await websockets.connect(url, subprotocols=["msgpack"] if msgpack else None, **kwargs)
        peer = cls(ws, msgpack)
        peer.welcome = await peer.recv()
        return peer

    async def _read(self) -> None:
        try:
            async for data in self.ws:
                self.inbox.put_nowait(self.decode(data))
        except websockets.ConnectionClosed:
            pass
        finally:
            rcvd = self.ws.protocol.close_rcvd
            self.close_code = rcvd.code if rcvd is not None else 1006
            self.closed.set()

    async def send_raw(self, data: bytes | str) -> None:
        await self.ws.send(data)

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()

    async def close_handshake(self, code: int = 1000, timeout: float = 5.0) -> int | None:
        await asyncio.wait_for(self.ws.close(code), timeout)  # returns once the server's close frame came
        rcvd = self.ws.protocol.close_rcvd
        return rcvd.code if rcvd is not None else None


PEERS = {"picows": PicowsPeer, "websockets": WebsocketsPeer}


async def ask(p: Peer, rid: str, type_: str, **fields: Any) -> dict[str, Any]:
    """Send ``{"type": type_, "id": rid, **fields}``; the reply carrying ``rid`` (other messages are skipped)."""
    await p.send({"type": type_, "id": rid, **fields})
    while True:
        msg = await p.recv()
        if msg.get("requestId") == rid:
            return msg
