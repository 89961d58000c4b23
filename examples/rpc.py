"""Request/response RPC: ``{"type":"call","id":"7","method":"add","params":{"a":1,"b":2}}``.

Answers ``{"type":"ack","requestId":"7","success":true,"data":<result>}``, or an ``error`` reply:
``METHOD_NOT_FOUND`` (no such method), ``INVALID_PARAMS`` (wrong params for it),
``INVALID_MESSAGE`` (not a call at all). Methods may be async; a connection's calls are answered
in the order sent. Run (from any directory): ``python examples/rpc.py`` or
``wsfan run examples/rpc.py:app``.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import msgspec

import wsfan

app = wsfan.App()


class Call(wsfan.Message, tag="call"):
    method: Annotated[str, msgspec.Meta(max_length=64)]
    params: dict[str, Any] = {}


class AddParams(msgspec.Struct, forbid_unknown_fields=True):
    a: float
    b: float


class SleepParams(msgspec.Struct, forbid_unknown_fields=True):
    seconds: Annotated[float, msgspec.Meta(ge=0, le=2)]


def add(p: AddParams, conn: wsfan.Conn) -> float:
    total = p.a + p.b
    if not math.isfinite(total):  # 1e308 + 1e308: a result no payload may carry (the payload rule)
        raise wsfan.Error("INVALID_PARAMS", "the sum is out of range")
    return total


async def sleep(p: SleepParams, conn: wsfan.Conn) -> dict[str, float]:
    await asyncio.sleep(p.seconds)
    return {"slept": p.seconds}


def whoami(p: None, conn: wsfan.Conn) -> dict[str, str]:
    return {"conn": conn.id, "user": conn.user}


METHODS: dict[str, tuple[type | None, Callable[..., Any | Awaitable[Any]]]] = {
    "add": (AddParams, add),
    "sleep": (SleepParams, sleep),
    "whoami": (None, whoami),
}


@app.message(Call)
def call(conn: wsfan.Conn, msg: Call) -> Any:
    entry = METHODS.get(msg.method)
    if entry is None:
        raise wsfan.Error("METHOD_NOT_FOUND", f"no method {msg.method[:64]!r}; try {', '.join(METHODS)}")
    params_type, fn = entry
    params = None
    if params_type is not None:
        try:
            params = msgspec.convert(msg.params, params_type)
        except msgspec.ValidationError:
            fields = ", ".join(params_type.__struct_fields__)
            raise wsfan.Error("INVALID_PARAMS", f"{msg.method} takes {{{fields}}}") from None
    return fn(params, conn)  # a coroutine is awaited by wsfan, in this connection's order


if __name__ == "__main__":
    app.run()
