"""Role ``storm``: a crowd of ``client/`` clients loses its connections at once and comes back.

This role uses the project's asyncio client on purpose: what is measured is the
client's real reconnect logic (backoff, ``Retry-After``, rejoin with ``since``,
dedupe) against the server's admission control, so nothing here reimplements
it. "No jitter" is the same client with a random source whose ``uniform(0, w)``
returns ``w``: plain exponential backoff, every client computing the same delay.

Flow: ``clients`` clients join ``rooms`` rooms (client ``i`` in room ``i % rooms``);
one more client, the publisher, joins every room and publishes ``warm`` messages
per room, which everyone must receive before ``ready``. On ``go`` it starts
publishing ``{"k": n}`` round-robin at ``publish_rate`` per second, awaiting each
ack (messages it publishes while itself disconnected are skipped, not queued).
The harness then disrupts (restarts the server, or kills every socket with
``ss -K``; ``drop`` does it from inside for machines without ``ss -K``) and sends
``disrupted`` with the moment it did. The role waits until every client has
reconnected with its room rejoined (the client's ``Connected(reconnect=True)``)
or ``timeout`` passed, publishes ``settle`` seconds more, stops, waits for the
last deliveries and reports ``done``.

Messages are accounted by the payload's ``k``, not by seq, so a room whose
numbering restarted (single node restart) is still counted right: for each
client, expected = every acked ``k`` of its room; lost = expected ones never
delivered; recovered = delivered ones that were published while the client was
away (they came from the server's history replay on rejoin).
"""

from __future__ import annotations

import asyncio
import math
import random
from typing import Any

import msgspec
from msgspec import Raw

from wsfan.bench.roles.base import Control, emit
from wsfan.bench.roles.pacing import clock
from wsfan.client import (
    Client,
    ClientError,
    Connected,
    Disconnected,
    Gap,
    HandshakeRejected,
    Message,
    Reconnecting,
    Recovered,
    connect,
)


class K(msgspec.Struct):
    k: int


K_DECODER = msgspec.json.Decoder(K)


class NoJitter(random.Random):
    """``uniform(a, b)`` returns ``b``: every client sleeps exactly the backoff window."""

    def uniform(self, a: float, b: float) -> float:
        return b


def _describe(event: Any) -> str:
    name = type(event).__name__
    if isinstance(event, Disconnected):
        return f"{name}({event.code})"
    if isinstance(event, Reconnecting):
        return f"{name}(attempt {event.attempt}, delay {event.delay:.2f}, after {type(event.error).__name__})"
    return name


class Member:
    """One subscriber's view of the storm."""

    __slots__ = (
        "index",
        "room",
        "client",
        "down_at",
        "back_at",
        "attempts",
        "rejected",
        "got",
        "duplicates",
        "gaps",
        "resets",
        "recovered_events",
        "timeline",
    )

    def __init__(self, index: int, room: str) -> None:
        self.index = index
        self.room = room
        self.client: Client | None = None
        self.down_at: float | None = None
        self.back_at: float | None = None
        self.attempts = 0
        self.rejected = 0
        self.got: dict[int, float] = {}
        self.duplicates = 0
        self.gaps = 0
        self.resets = 0
        self.recovered_events = 0
        self.timeline: list[tuple[float, str]] = []

    def on_event(self, event: Any) -> None:
        now = clock()
        if len(self.timeline) < 20:
            self.timeline.append((now, _describe(event)))
        if isinstance(event, Disconnected):
            if self.down_at is None:
                self.down_at = now
        elif isinstance(event, Reconnecting):
            self.attempts += 1
            if isinstance(event.error, HandshakeRejected):
                self.rejected += 1
        elif isinstance(event, Connected):
            if event.reconnect and self.back_at is None:
                self.back_at = now
        elif isinstance(event, Gap):
            self.gaps += 1
            self.resets += event.reset
        elif isinstance(event, Recovered):
            self.recovered_events += 1

    def on_message(self, msg: Message) -> None:
        k = K_DECODER.decode(msg.payload).k
        if k in self.got:
            self.duplicates += 1
        else:
            self.got[k] = clock()


async def first_connect(url: str, **kw: Any) -> Client:
    """The client does not retry its first connection (a wrong URL should fail loudly); with admission
    control on, forming the crowd needs retries that honour Retry-After, so they are done here."""
    for attempt in range(30):
        try:
            return await connect(url, **kw)
        except HandshakeRejected as exc:
            await asyncio.sleep((exc.retry_after or 1.0) + random.random() * 0.5 * (attempt + 1))
    return await connect(url, **kw)


def local_port(c: Client) -> int | None:
    """The client's local TCP port, so that the harness can spare the publisher when it kills sockets."""
    conn = c._conn  # noqa: SLF001 - the client has no public accessor for its socket
    if conn is None:
        return None
    sock = conn._transport.underlying_transport.get_extra_info("sockname")  # noqa: SLF001
    return int(sock[1]) if sock else None


def options(cfg: dict[str, Any], seed: int) -> dict[str, Any]:
    return {
        "rng": random.Random(seed) if cfg["jitter"] else NoJitter(),
        "backoff_base": cfg["backoff_base"],
        "backoff_cap": cfg["backoff_cap"],
        "ping_interval": cfg.get("ping_interval", 20.0),
        "raw_payloads": True,
        "open_timeout": 5.0,
        "request_timeout": 10.0,
    }


class Publisher:
    """Publishes ``{"k": n}`` round-robin over the rooms at a fixed rate, remembering every acked ``k``."""

    def __init__(self, client: Client, rooms: list[str]) -> None:
        self.client = client
        self.rooms = rooms
        self.acked: dict[int, tuple[str, float]] = {}  # k -> (room, ack time)
        self.failed = 0
        self.skipped = 0
        self.next_k = 0
        self.running = True

    async def one(self, room: str) -> None:
        k = self.next_k
        self.next_k += 1
        try:
            await self.client.publish(room, Raw(b'{"k":%d}' % k), timeout=2.0)
        except (ClientError, TimeoutError):
            self.failed += 1  # fate unknown: not expected, counted as "extra" if delivered
            return
        self.acked[k] = (room, clock())

    async def warm(self, per_room: int) -> None:
        for _ in range(per_room):
            await asyncio.gather(*(self.one(room) for room in self.rooms))

    async def run(self, rate: float) -> None:
        interval = 1.0 / rate
        t0 = clock()
        i = 0
        while self.running:
            due = t0 + i * interval
            now = clock()
            if now < due:
                await asyncio.sleep(due - now)
                continue
            if now - due > 1.0:  # fell behind (an ack took long): skip the missed slots
                missed = int((now - due) / interval)
                self.skipped += missed
                i += missed
                continue
            room = self.rooms[i % len(self.rooms)]
            i += 1
            if not self.client.connected:
                self.skipped += 1
                continue
            await self.one(room)


def crowd_stats(members: list[Member], since: float) -> dict[str, Any]:
    """When the crowd came back, relative to the disruption at ``since``."""
    back = sorted(m.back_at - since for m in members if m.back_at is not None)
    n = len(members)

    def at(fraction: float) -> float | None:
        need = max(1, math.ceil(fraction * n))
        return back[need - 1] if len(back) >= need else None

    return {
        "clients": n,
        "disrupted": sum(1 for m in members if m.down_at is not None),
        "back": len(back),
        "fraction_back": len(back) / n if n else 0.0,
        "t50_s": at(0.5),
        "t90_s": at(0.9),
        "t99_s": at(0.99),
        "t100_s": at(1.0),
        "back_offsets_s": [round(x, 4) for x in back],
        "first_down_s": min((m.down_at - since for m in members if m.down_at is not None), default=None),
        # Clients that noticed the loss more than 2 s late: a reset they never received (e.g. RFC 5961
        # challenge ACKs rate-limited by the kernel) is only found by their own ping, after its idle interval.
        "late_detection": sum(1 for m in members if m.down_at is not None and m.down_at - since > 2.0),
        "attempts_mean": sum(m.attempts for m in members) / n if n else 0.0,
        "attempts_max": max((m.attempts for m in members), default=0),
        "rejected_503": sum(m.rejected for m in members),
        "gap_events": sum(m.gaps for m in members),
        "reset_gap_events": sum(m.resets for m in members),
        "recovered_events": sum(m.recovered_events for m in members),
        # The slowest few clients' event timelines (seconds since the disruption): why the tail is long.
        "stragglers": [
            [(round(t - since, 3), what) for t, what in m.timeline]
            for m in sorted(members, key=lambda m: -(m.back_at or math.inf))[:3]
        ],
    }


def message_stats(members: list[Member], pub: Publisher) -> dict[str, Any]:
    by_room: dict[str, list[tuple[int, float]]] = {}
    for k, (room, at) in pub.acked.items():
        by_room.setdefault(room, []).append((k, at))
    expected = delivered = lost = extra = away = recovered = duplicates = 0
    for m in members:
        mine = by_room.get(m.room, [])
        keys = {k for k, _ in mine}
        got = m.got
        expected += len(mine)
        hit = sum(1 for k in keys if k in got)
        delivered += hit
        lost += len(mine) - hit
        extra += sum(1 for k in got if k not in keys)
        duplicates += m.duplicates
        if m.down_at is not None:
            end = m.back_at if m.back_at is not None else math.inf
            missed = [k for k, at in mine if m.down_at <= at <= end]
            away += len(missed)
            recovered += sum(1 for k in missed if k in got)
    return {
        "published_acked": len(pub.acked),
        "publish_failed": pub.failed,
        "publish_skipped_offline": pub.skipped,
        "expected_deliveries": expected,
        "delivered": delivered,
        "lost": lost,
        "extra_unacked_delivered": extra,
        "duplicates": duplicates,
        "published_while_away": away,
        "recovered": recovered,
        "lost_while_away": away - recovered,
    }


async def storm(cfg: dict[str, Any], control: Control) -> None:
    url, n = cfg["url"], cfg["clients"]
    room_names = [f"storm-{r}" for r in range(cfg["rooms"])]
    members = [Member(i, room_names[i % len(room_names)]) for i in range(n)]
    sem = asyncio.Semaphore(cfg.get("concurrency", 50))

    async def join(m: Member) -> None:
        async with sem:
            c = await first_connect(
                url, on_message=m.on_message, on_event=m.on_event, **options(cfg, m.index)
            )
            await c.join(m.room)
            m.client = c

    started = clock()
    await asyncio.gather(*(join(m) for m in members))
    pub_client = await first_connect(url, **options(cfg, -1))
    for room in room_names:
        await pub_client.join(room)
    pub = Publisher(pub_client, room_names)
    await pub.warm(cfg["warm"])
    deadline = clock() + 20
    while clock() < deadline and any(len(m.got) < cfg["warm"] for m in members):
        await asyncio.sleep(0.05)
    emit(
        "ready", clients=n, seconds=clock() - started, warm_ok=all(len(m.got) >= cfg["warm"] for m in members)
    )
    await control.wait_for("go")
    publishing = asyncio.create_task(pub.run(cfg["publish_rate"]))
    emit("publishing", publisher_port=local_port(pub_client))
    cmd = await control.next()
    if cmd.get("cmd") == "drop":  # fallback where the harness cannot kill sockets from outside
        cmd = {"cmd": "disrupted", "at": clock()}
        for m in members:
            conn = m.client._conn if m.client is not None else None  # noqa: SLF001 - simulated network drop
            if conn is not None:
                conn.abort()
    if cmd.get("cmd") != "disrupted":
        raise SystemExit(0)
    since = cmd["at"]
    limit = since + cfg["timeout"]
    while clock() < limit and any(m.back_at is None for m in members):
        await asyncio.sleep(0.02)
    recovered_at = clock()
    emit("recovered", seconds=recovered_at - since, back=sum(1 for m in members if m.back_at is not None))
    await asyncio.sleep(cfg["settle"])
    pub.running = False
    await asyncio.wait_for(publishing, 5)
    keys: dict[str, list[int]] = {}
    for k, (room, _) in pub.acked.items():
        keys.setdefault(room, []).append(k)
    final = clock() + 3.0
    while clock() < final:
        if all(all(k in m.got for k in keys.get(m.room, ())) for m in members):
            break
        await asyncio.sleep(0.05)
    emit(
        "done",
        crowd=crowd_stats(members, since),
        messages=message_stats(members, pub),
        publisher_back=pub_client.connected,
    )
    await control.wait_for("quit")
    await asyncio.gather(*(m.client.close() for m in members if m.client is not None), return_exceptions=True)
    await pub_client.close()
