"""When a connection ends: whether to reconnect, when (backoff), and with which token.

Kept apart from the session so the policy can be read in one screen and tested
with fake connections: the session hands ``run()`` a few callables and never
decides anything about retries itself.

Rules:
* Close codes 1000 (normal) and 4001 (token expired) end the session unless
  ``refresh_token`` supplies a new token; every other code (1001 going away,
  1006 socket died or ping timeout, 4000 heartbeat, 4008 slow consumer, ...)
  reconnects.
* Attempts sleep ``Backoff.next_delay()`` first, the first one included, so a
  crowd dropped by the same restart spreads out. HTTP 503 with ``Retry-After``
  adds that wait. HTTP 401 asks ``refresh_token`` once, else stops.
* A connection that stayed up ``stable_after`` seconds resets the backoff, so a
  flapping server does not get hammered at the base delay forever.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from picows import WSError

from wsfan.client.backoff import Backoff
from wsfan.client.errors import ClientError, ConnectionClosed, HandshakeRejected, Unauthorized
from wsfan.client.events import Disconnected, Event, Reconnecting
from wsfan.client.transport import Connection

log = logging.getLogger(__name__)

NO_RECONNECT_CODES = frozenset({1000, 4001})
TokenFn = Callable[[int], "str | None | Awaitable[str | None]"]
"""Called with the close code (1000, 4001) or HTTP status (401) that ended the session; returns a new token or None."""


class Reconnector:
    __slots__ = ("backoff", "enabled", "stable_after", "refresh_token", "sleep")

    def __init__(
        self,
        backoff: Backoff,
        *,
        enabled: bool = True,
        stable_after: float = 10.0,
        refresh_token: TokenFn | None = None,
    ) -> None:
        self.backoff = backoff
        self.enabled = enabled
        self.stable_after = stable_after
        self.refresh_token = refresh_token
        self.sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep  # replaceable in tests

    async def run(
        self,
        conn: Connection,
        *,
        reopen: Callable[[], Awaitable[Connection]],
        stop: Callable[[BaseException], None],
        emit: Callable[[Event], None],
        use_token: Callable[[str], None],
        closing: Callable[[], bool],
    ) -> None:
        """Supervise ``conn`` and its successors until the session stops; never raises (except cancel)."""
        loop = asyncio.get_running_loop()
        try:
            while not closing():
                connected_at = loop.time()
                code, reason = await asyncio.shield(conn.closed)
                if closing():
                    return
                if loop.time() - connected_at >= self.stable_after:
                    self.backoff.reset()
                will = self.enabled
                if will and code in NO_RECONNECT_CODES:
                    token = await self._refreshed(code)
                    will = token is not None
                    if token is not None:
                        use_token(token)
                emit(Disconnected(code, reason, will))
                if not will:
                    stop(ConnectionClosed(code, reason))
                    return
                new_conn = await self._retry(reopen, stop, emit, use_token, closing)
                if new_conn is None:
                    return
                conn = new_conn
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must not leave callers waiting forever
            log.exception("reconnect supervisor failed")
            stop(exc)

    async def _retry(
        self,
        reopen: Callable[[], Awaitable[Connection]],
        stop: Callable[[BaseException], None],
        emit: Callable[[Event], None],
        use_token: Callable[[str], None],
        closing: Callable[[], bool],
    ) -> Connection | None:
        """Attempt until connected (the new connection) or stopped for good (None)."""
        backoff = self.backoff
        error: BaseException | None = None
        retry_after: float | None = None
        while not closing():
            if backoff.exhausted:
                stop(ConnectionClosed(1006, f"gave up after {backoff.attempt} reconnect attempts"))
                return None
            delay = backoff.next_delay(retry_after)
            emit(Reconnecting(backoff.attempt, delay, error))
            await self.sleep(delay)
            if closing():
                return None
            retry_after = None
            try:
                return await reopen()
            except Unauthorized as exc:
                token = await self._refreshed(exc.status)
                if token is None:
                    stop(exc)
                    return None
                use_token(token)
                error = exc
            except HandshakeRejected as exc:
                error, retry_after = exc, exc.retry_after
            except (OSError, TimeoutError, WSError, ClientError) as exc:
                error = exc
            except Exception as exc:  # noqa: BLE001 - a library's surprise must not end reconnecting silently
                log.exception("reconnect attempt %d failed unexpectedly; retrying", backoff.attempt)
                error = exc
        return None

    async def _refreshed(self, why: int) -> str | None:
        """A new token from ``refresh_token``, or None (no callback, it declined, or it failed)."""
        if self.refresh_token is None:
            return None
        try:
            token: Any = self.refresh_token(why)
            if inspect.isawaitable(token):
                token = await token
        except Exception:
            log.exception("refresh_token callback failed")
            return None
        return token or None
