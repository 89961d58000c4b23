"""An App with a message type declared without ``tag=``, for tests/test_app_api.py.

msgspec would give ``Shout`` the wire type ``"Shout"`` (its class name), silently: registering
it is refused with a ``TypeError`` naming the class and the fix, so ``wsfan run`` stops with
exit code 2 instead of serving a type nobody chose (docs/app-api.md, "Message types and handlers").
"""

from __future__ import annotations

import wsfan

app = wsfan.App()


class Shout(wsfan.Message):  # no tag=: the mistake under test
    text: str


@app.message(Shout)
def shout(conn: wsfan.Conn, msg: Shout) -> str:
    return msg.text.upper()
