"""The client's bounded message buffer, and the streams that read it (``client.messages(...)``).

The rules (README "Clients"; the JS client, client/js/wsfan.js, keeps the same ones):

* **One buffer per client, filled from the first connection on**, so nothing is lost
  between ``join()`` and the first read, however the application reads. Every delivery
  handed to the application goes into it (unless ``on_message`` takes them instead).
* **A stream is a view, not a buffer**: ``messages("r")`` reads the buffer's messages of
  room ``r``, ``messages()`` those of every room, each oldest first. A stream holds no
  messages of its own, so creating one per read (``await c.messages(r).get()``) and
  dropping it loses nothing and costs nothing; any number of them may exist.
* **Each message is read once**: by the first read that asks for it. A message that
  arrives while reads wait goes to a waiting read of its room if there is one, else to a
  waiting all-rooms read. (So read a room through ``messages(room)`` or ``messages()``,
  not both at once, when all of its messages must reach one place.)
* **Bounded**: at most ``maxsize`` messages (``max_buffered``, 10,000) are buffered,
  all rooms together. When full, the **oldest** message is dropped: for live data the
  newest is worth more, and the reader keeps making progress instead of the socket
  stalling (which would only move the problem to the server, which drops slow consumers
  with 4008). Each drop is reported once, by the next read that could have returned the
  message (a read of its room or an all-rooms read) raising ``MessagesDropped(count)``;
  the read after that returns the oldest message still buffered. An ``Overflow(room,
  dropped)`` event is reported at the first drop of a room's burst (until a read reports it).
* **Ends**: after ``client.close()`` every stream drains what it can read, then ends
  (``StopAsyncIteration``; ``get()`` raises ``EOFError``), or raises why the client stopped
  on its own. ``client.leave(room)`` (or a rejoin refused for good) ends the streams of
  ``room`` created before it the same way, once they have read what arrived before it.

Room-less pushes (``client.pushes()``) have a buffer of their own, ``Inbox``, with the
same bound and overflow policy: every ``pushes()`` stream reads from it, each push once.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from wsfan.client.errors import MessagesDropped, MessageTimeout
from wsfan.server.wire import Message

OverflowFn = Callable[[str | None, int], None]


class Inbox:
    """One bounded FIFO (the buffer of room-less pushes) with a single wake-up future for its reader(s)."""

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
    )

    def __init__(self, room: str | None, maxsize: int, on_overflow: OverflowFn | None = None) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be >= 1")
        self.room = room
        self.maxsize = maxsize
        self.items: deque[Any] = deque()
        self.dropped = 0  # total since creation
        self._unreported = 0  # dropped since the last read: raised once
        self._waiter: asyncio.Future[None] | None = None
        self._end: BaseException | None = None
        self._ended = False
        self._on_overflow = on_overflow

    def put(self, msg: Any) -> None:
        items = self.items
        if len(items) >= self.maxsize:
            items.popleft()
            self.dropped += 1
            self._unreported += 1
            if self._unreported == 1 and self._on_overflow is not None:
                self._on_overflow(self.room, self.dropped)
        items.append(msg)
        self._wake()

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

    async def read(self) -> Any:
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

    get = read  # the name older callers use

    def take(self) -> Any | None:
        items = self.items
        return items.popleft() if items else None

    def __len__(self) -> int:
        return len(self.items)

    def timeout_error(self, timeout: float) -> MessageTimeout:
        return MessageTimeout("no push", timeout)


class _Membership:
    """One stretch of a room's streams, from their creation to the room's ``end_room`` (a leave)."""

    __slots__ = ("end", "error", "__weakref__")

    def __init__(self) -> None:
        self.end: int | None = None  # arrival number of the first message the streams must not read
        self.error: BaseException | None = None


class Router:
    """The client's message buffer: see the module docstring for the rules.

    Messages are numbered in arrival order and kept per room (``deque`` of ``(number,
    message)``), with one arrival-order list of ``(number, room)`` for all-rooms reads and
    for dropping the oldest. A room read leaves a stale entry in that list, skipped when met
    and compacted away once stale entries outnumber live ones: every operation is O(1)
    amortized, memory O(``maxsize``).
    """

    __slots__ = (
        "maxsize",
        "dropped",
        "pushes",
        "_n",
        "_rooms",
        "_order",
        "_size",
        "_lost",
        "_room_waiters",
        "_all_waiters",
        "_memberships",
        "_on_overflow",
        "_ended",
        "_end",
    )

    def __init__(
        self, maxsize: int, on_overflow: OverflowFn | None = None, on_push_overflow: OverflowFn | None = None
    ) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be >= 1")
        self.maxsize = maxsize
        self.dropped = 0  # messages dropped since the client started
        # Room-less pushes (broadcasts, application types): one buffer of their own, same policy.
        self.pushes = Inbox(None, maxsize, on_push_overflow)
        self._n = 0  # arrival number of the next message
        self._rooms: dict[str, deque[tuple[int, Message]]] = {}
        self._order: deque[tuple[int, str]] = deque()
        self._size = 0
        self._lost: dict[str, int] = {}  # drops not yet reported, per room
        self._room_waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._all_waiters: list[asyncio.Future[None]] = []
        # The current stretch of each room that has live streams; a leave ends it.
        self._memberships: weakref.WeakValueDictionary[str, _Membership] = weakref.WeakValueDictionary()
        self._on_overflow = on_overflow
        self._ended = False
        self._end: BaseException | None = None

    # ------------------------------------------------------------ writing

    def route(self, msg: Message) -> None:
        """Buffer one delivery (dropping the oldest when full) and wake the reads that may take it."""
        n = self._n
        self._n = n + 1
        if self._size >= self.maxsize:
            self._drop_oldest()
        room = msg.room
        items = self._rooms.get(room)
        if items is None:
            items = self._rooms[room] = deque()
        items.append((n, msg))
        self._order.append((n, room))
        self._size += 1
        # Wake the room's reads first: they run first, so a waiting room read takes it before an
        # all-rooms read. Every woken read looks again; those that find nothing wait again.
        waiters = self._room_waiters.pop(room, None)
        if waiters is not None:
            _wake(waiters)
        if self._all_waiters:
            waiters, self._all_waiters = self._all_waiters, []
            _wake(waiters)

    def _drop_oldest(self) -> None:
        popped = self._pop_oldest()
        if popped is None:
            return
        room = popped.room
        self.dropped += 1
        lost = self._lost.get(room, 0)
        self._lost[room] = lost + 1
        if lost == 0 and self._on_overflow is not None:
            self._on_overflow(room, self.dropped)

    def _pop_oldest(self) -> Message | None:
        order, rooms = self._order, self._rooms
        while order:
            n, room = order.popleft()
            items = rooms.get(room)
            if items and items[0][0] == n:
                msg = items.popleft()[1]
                if not items:
                    del rooms[room]
                self._size -= 1
                return msg
        return None

    def _pop_room(self, room: str, before: int | None) -> Message | None:
        """The oldest buffered message of ``room`` numbered below ``before`` (any when None)."""
        items = self._rooms.get(room)
        if not items or (before is not None and items[0][0] >= before):
            return None
        n, msg = items.popleft()
        if not items:
            del self._rooms[room]
        self._size -= 1
        order = self._order
        if order[0][0] == n:
            order.popleft()  # it was the oldest of all: no stale entry left behind
        elif len(order) > 2 * self._size + 64:
            self._compact()
        return msg

    def _compact(self) -> None:
        """Rebuild the arrival order from the live messages (stale entries of room reads removed)."""
        live = {n for items in self._rooms.values() for n, _ in items}
        self._order = deque(entry for entry in self._order if entry[0] in live)

    # ------------------------------------------------------------ reading

    def stream(self, room: str | None) -> MessageStream:
        """A view of the buffer: one room's messages, or every room's (``room`` None)."""
        if room is None:
            return MessageStream(_AllRooms(self))
        membership = self._memberships.get(room)
        if membership is None:
            membership = self._memberships[room] = _Membership()
        return MessageStream(_Room(self, room, membership))

    async def _wait(self, room: str | None) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters = self._all_waiters if room is None else self._room_waiters.setdefault(room, [])
        waiters.append(fut)
        try:
            await fut
        finally:
            if not fut.done():  # cancelled (a timeout): forget this waiter
                fut.cancel()
                waiters = self._all_waiters if room is None else self._room_waiters.get(room, [])
                if fut in waiters:
                    waiters.remove(fut)
                if room is not None and not waiters:
                    self._room_waiters.pop(room, None)

    def _report_lost(self, room: str | None) -> None:
        """Raise ``MessagesDropped`` for the drops this read could have returned, once."""
        if room is None:
            if self._lost:
                count = sum(self._lost.values())
                self._lost.clear()
                raise MessagesDropped(count)
        elif room in self._lost:
            raise MessagesDropped(self._lost.pop(room))

    # ------------------------------------------------------------ ends

    def end_room(self, room: str, exc: BaseException | None = None) -> None:
        """``room`` was left: its current streams read what arrived until now, then stop (or raise ``exc``)."""
        membership = self._memberships.pop(room, None)
        if membership is not None:
            membership.end = self._n
            membership.error = exc
        waiters = self._room_waiters.pop(room, None)
        if waiters is not None:
            _wake(waiters)

    def end(self, exc: BaseException | None) -> None:
        """No more messages will come: every stream drains what it can read, then stops (or raises ``exc``)."""
        if not self._ended:
            self._ended = True
            self._end = exc
        self.pushes.end(exc)
        waiters, self._all_waiters = self._all_waiters, []
        _wake(waiters)
        for room in list(self._room_waiters):
            _wake(self._room_waiters.pop(room))

    def _finished(self, error: BaseException | None) -> Message:
        if error is not None:
            raise error
        raise StopAsyncIteration


def _wake(waiters: list[asyncio.Future[None]]) -> None:
    for fut in waiters:
        if not fut.done():
            fut.set_result(None)


class _Room:
    """The read side of ``messages(room)``."""

    __slots__ = ("router", "room", "membership")

    def __init__(self, router: Router, room: str, membership: _Membership) -> None:
        self.router = router
        self.room = room
        self.membership = membership

    async def read(self) -> Message:
        router, room, membership = self.router, self.room, self.membership
        while True:
            router._report_lost(room)
            msg = router._pop_room(room, membership.end)
            if msg is not None:
                return msg
            if membership.end is not None:
                return router._finished(membership.error)
            if router._ended:
                return router._finished(router._end)
            await router._wait(room)

    def take(self) -> Message | None:
        return self.router._pop_room(self.room, self.membership.end)

    def __len__(self) -> int:
        items = self.router._rooms.get(self.room)
        if not items:
            return 0
        end = self.membership.end
        return len(items) if end is None else sum(1 for n, _ in items if n < end)

    @property
    def dropped(self) -> int:
        return self.router.dropped

    def timeout_error(self, timeout: float) -> MessageTimeout:
        return MessageTimeout(f"no message in room {self.room!r}", timeout, self.room)


class _AllRooms:
    """The read side of ``messages()``."""

    __slots__ = ("router",)
    room = None

    def __init__(self, router: Router) -> None:
        self.router = router

    async def read(self) -> Message:
        router = self.router
        while True:
            router._report_lost(None)
            msg = router._pop_oldest()
            if msg is not None:
                return msg
            if router._ended:
                return router._finished(router._end)
            await router._wait(None)

    def take(self) -> Message | None:
        return self.router._pop_oldest()

    def __len__(self) -> int:
        return self.router._size

    @property
    def dropped(self) -> int:
        return self.router.dropped

    def timeout_error(self, timeout: float) -> MessageTimeout:
        return MessageTimeout("no message in any room", timeout)


class MessageStream:
    """``async for`` over deliveries; also ``await stream.get(timeout)`` for one message.

    A view of the client's buffer (module docstring): creating one is cheap and dropping it
    loses nothing. Ends (``StopAsyncIteration``) after ``client.close()``, or for a room's
    stream after ``client.leave(room)``, once what it can read is drained; raises
    ``ConnectionClosed`` instead if the client stopped for good on its own (e.g. gave up
    reconnecting), and the refusal of a room a rejoin could not get back (``RejoinFailed``).
    """

    __slots__ = ("_source",)

    def __init__(self, source: Any) -> None:
        self._source = source

    def __aiter__(self) -> MessageStream:
        return self

    def __anext__(self) -> Awaitable[Any]:
        return self._source.read()

    async def get(self, timeout: float | None = None) -> Any:
        """One message within ``timeout`` seconds (None: wait forever).

        Raises ``MessageTimeout`` (a ``RequestTimeout``, so a ``TimeoutError``) saying what it
        waited for (``no message in room 'r' within 2s``); nothing is lost by a timeout.
        ``MessagesDropped`` once after an overflow; ``EOFError`` once the stream ended.
        """
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                return await self._source.read()
        except StopAsyncIteration:
            raise EOFError("message stream ended") from None
        except TimeoutError:
            if deadline.expired():
                raise self._source.timeout_error(timeout or 0.0) from None
            raise

    def get_nowait(self) -> Any | None:
        """The next buffered message, or None when empty (overflow is not reported here)."""
        return self._source.take()

    def __len__(self) -> int:
        """Messages buffered that this stream can read now."""
        return len(self._source)

    @property
    def dropped(self) -> int:
        """Messages the client's buffer (the pushes' buffer for ``pushes()``) dropped since the client started."""
        return self._source.dropped

    @property
    def room(self) -> str | None:
        return self._source.room
