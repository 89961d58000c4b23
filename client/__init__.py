"""Asyncio client for the wsfan pub/sub WebSocket server (PROTOCOL.md v1), on picows.

    from wsfan.client import connect

    async with connect("ws://127.0.0.1:8080/ws", token, encoding="msgpack") as c:
        await c.join("news")
        await c.publish("news", {"hello": "world"})
        async for msg in c.messages("news"):
            print(msg.room, msg.seq, msg.sender, msg.payload)

Room-less pushes (a server ``broadcast``, an application's own message types sent with
``conn.send``) come from ``c.pushes()`` (or ``on_push=``); rooms the server joined the
connection to deliver through ``messages()`` like joined ones.

The same client serves tests, benchmarks (``on_message=``, ``publish_nowait``,
``encode_payload``, ``raw_payloads=True``) and applications (reconnect with
backoff, rejoin with recovery, typed errors). See ``client.client.Client``.
"""

from wsfan.client.backoff import Backoff, parse_retry_after
from wsfan.client.client import Client, connect
from wsfan.client.errors import (
    TRANSIENT_CODES,
    ClientError,
    ConnectionClosed,
    Forbidden,
    HandshakeRejected,
    InternalError,
    InvalidMessage,
    InvalidPayload,
    InvalidURL,
    LimitExceeded,
    MessagesDropped,
    MessageTimeout,
    NotAvailable,
    NotConnected,
    NotJoined,
    ProtocolError,
    RateLimited,
    RequestTimeout,
    Unauthorized,
    Unavailable,
    UnknownType,
    error_for,
)
from wsfan.client.events import (
    Connected,
    Disconnected,
    Event,
    Gap,
    Joined,
    Left,
    Overflow,
    Reconnecting,
    Recovered,
    RejoinFailed,
    ServerError,
    Subscribed,
    Unsubscribed,
)
from wsfan.client.inbox import MessageStream
from wsfan.client.session import Stats
from wsfan.server.wire import Broadcast, Message, RawBroadcast, RawMessage, Welcome

__all__ = [
    "Backoff",
    "Broadcast",
    "Client",
    "ClientError",
    "Connected",
    "ConnectionClosed",
    "Disconnected",
    "Event",
    "Forbidden",
    "Gap",
    "HandshakeRejected",
    "InternalError",
    "InvalidMessage",
    "InvalidPayload",
    "InvalidURL",
    "Joined",
    "Left",
    "Subscribed",
    "Unsubscribed",
    "Message",
    "MessageStream",
    "LimitExceeded",
    "MessagesDropped",
    "MessageTimeout",
    "NotAvailable",
    "NotConnected",
    "NotJoined",
    "Overflow",
    "ProtocolError",
    "RateLimited",
    "RawBroadcast",
    "RawMessage",
    "Reconnecting",
    "Recovered",
    "RejoinFailed",
    "RequestTimeout",
    "ServerError",
    "Stats",
    "TRANSIENT_CODES",
    "Unauthorized",
    "Unavailable",
    "UnknownType",
    "Welcome",
    "connect",
    "error_for",
    "parse_retry_after",
]
