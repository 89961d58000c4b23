"""Bounded buffers between the socket and ``async for msg in client.messages(...)``.

Policy when the application does not keep up (documented in the README too):

* Every buffer holds at most ``maxsize`` messages. When full, the **oldest**
  message is dropped: for live data the newest is worth more, and the reader
  keeps making progress instead of the socket stalling (which would only move
  the problem to the server, which drops slow consumers with 4008).
* The next read raises ``MessagesDropped(count)`` **once**; the stream stays
  usable and the read after that returns the oldest message still buffered.
  An ``Overflow`` event is reported at the first drop of each burst.

Routing: each message is read **once**, by the most specific reader. A stream
for one room (``messages("r")``) takes that room's messages, including those
already buffered for the all-rooms stream; every other room's messages go to
the client's all-rooms buffer, which exists from the start so that nothing is
lost between ``join()`` and the first read. A room stream lives as long as the
application holds it (weak reference): once dropped, its room routes back to
the all-rooms buffer.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import deque
from collections.abc import Awaitable, Callable

from wsfan.client.errors import MessagesDropped
from wsfan.server.wire import Message

OverflowFn = Callable[[str | None, int], None]


class Inbox:
    """One bounded FIFO with a single wake-up future for the reader(s)."""

    __slots__ = (
        "room",
        "maxsize",
        "items",
        "dropped",
        "_unreported",
        "_waiter",
        "_end",
        "_ended",
        "_on_overflow",
        "__weakref__",
    )

    def __init__(self, room: str | None, maxsize: int, on_overflow: OverflowFn | None = None) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be >= 1")
        self.room = room
        self.maxsize = maxsize
        self.items: deque[Message] = deque()
        self.dropped = 0  # total since creation
        self._unreported = 0  # dropped since the last read: raised once
        self._waiter: asyncio.Future[None] | None = None
        self._end: BaseException | None = None
        self._ended = False
        self._on_overflow = on_overflow

    def put(self, msg: Message) -> None:
        items = self.items
        if len(items) >= self.maxsize:
            items.popleft()
            self.dropped += 1
            self._unreported += 1
            if self._unreported == 1 and self._on_overflow is not None:
                self._on_overflow(self.room, self.dropped)
        items.append(msg)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def end(self, exc: BaseException | None) -> None:
        """No more messages will come: readers drain what is buffered, then stop (or raise ``exc``)."""
        if self._ended:
            return
        self._ended = True
        self._end = exc
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def get(self) -> Message:
        while True:
            if self._unreported:
                count, self._unreported = self._unreported, 0
                raise MessagesDropped(count)
            if self.items:
                return self.items.popleft()
            if self._ended:
                if self._end is not None:
                    raise self._end
                raise StopAsyncIteration
            if self._waiter is None or self._waiter.done():
                self._waiter = asyncio.get_running_loop().create_future()
            # shield: several readers may share the waiter; one being cancelled must not cancel the others
            await asyncio.shield(self._waiter)


class MessageStream:
    """``async for`` over deliveries; also ``await stream.get(timeout)`` for one message.

    Ends (``StopAsyncIteration``) after ``client.close()`` or ``client.leave(room)``
    once the buffer is drained; raises ``ConnectionClosed`` instead if the client
    stopped for good on its own (e.g. gave up reconnecting).
    """

    __slots__ = ("_inbox",)

    def __init__(self, inbox: Inbox) -> None:
        self._inbox = inbox

    def __aiter__(self) -> MessageStream:
        return self

    def __anext__(self) -> Awaitable[Message]:
        return self._inbox.get()

    async def get(self, timeout: float | None = None) -> Message:
        """One message, or ``TimeoutError``; ``StopAsyncIteration`` becomes ``EOFError`` outside ``async for``."""
        try:
            async with asyncio.timeout(timeout):
                return await self._inbox.get()
        except StopAsyncIteration:
            raise EOFError("message stream ended") from None

    def get_nowait(self) -> Message | None:
        """The next buffered message, or None when empty (overflow is not reported here)."""
        items = self._inbox.items
        return items.popleft() if items else None

    def __len__(self) -> int:
        return len(self._inbox.items)

    @property
    def dropped(self) -> int:
        """Messages discarded by this stream's buffer since it was created."""
        return self._inbox.dropped

    @property
    def room(self) -> str | None:
        return self._inbox.room


class Router:
    """Decides which buffer a delivery goes to; see the module docstring for the rules."""

    __slots__ = ("main", "pushes", "_rooms", "_maxsize", "_on_overflow")

    def __init__(
        self, maxsize: int, on_overflow: OverflowFn | None = None, on_push_overflow: OverflowFn | None = None
    ) -> None:
        self._maxsize = maxsize
        self._on_overflow = on_overflow
        self.main = Inbox(None, maxsize, on_overflow)
        # Room-less pushes (broadcasts, application types): one buffer of their own, same policy.
        self.pushes = Inbox(None, maxsize, on_push_overflow)
        self._rooms: weakref.WeakValueDictionary[str, Inbox] = weakref.WeakValueDictionary()

    def route(self, msg: Message) -> None:
        if self._rooms:
            inbox = self._rooms.get(msg.room)
            if inbox is not None:
                inbox.put(msg)
                return
        self.main.put(msg)

    def stream(self, room: str | None) -> MessageStream:
        if room is None:
            return MessageStream(self.main)
        inbox = self._rooms.get(room)
        if inbox is None:
            inbox = Inbox(room, self._maxsize, self._on_overflow)
            main = self.main.items
            if main:
                keep: deque[Message] = deque()
                for msg in main:
                    (inbox.items if msg.room == room else keep).append(msg)
                self.main.items = keep
            if self.main._ended:
                inbox.end(self.main._end)
            self._rooms[room] = inbox
        return MessageStream(inbox)

    def end_room(self, room: str, exc: BaseException | None = None) -> None:
        """``room`` was left: its stream drains, then stops (or raises ``exc``: why the room was dropped)."""
        inbox = self._rooms.pop(room, None)
        if inbox is not None:
            inbox.end(exc)

    def end(self, exc: BaseException | None) -> None:
        self.main.end(exc)
        self.pushes.end(exc)
        for inbox in list(self._rooms.values()):
            inbox.end(exc)
