"""Idle: many connections that only answer heartbeats (the heartbeat overhead scenario).

    locust -f loadtest/scenarios/idle.py --headless -u 5000 -r 500 -t 5m --host ws://127.0.0.1:8080

Rows: connect, heartbeat (interval between server pings; count = pings answered),
close:4000 failures if pongs were too late. Watch the server's CPU and memory.
"""

import os
import sys

try:
    import wsfan.loadtest  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from wsfan.loadtest.users import IdleUser

__all__ = ["IdleUser"]
