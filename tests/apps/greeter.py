"""An App that greets every connection with server-side pushes, for tests/test_loadtest.py.

``on_open`` joins the connection to ``lobby`` (a ``subscribed`` push) and sends it a ``notice``
(an application push type), which Locust users count in rows of their own, not as failures.
"""

from __future__ import annotations

import wsfan

app = wsfan.App()


@app.on_open
def greet(conn: wsfan.Conn) -> None:
    conn.join("lobby")
    conn.send({"type": "notice", "text": "welcome"})
