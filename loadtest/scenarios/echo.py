"""Echo: request/response at --echo-rate per user (``echo`` message on /ws, or --echo-path /echo).

    locust -f loadtest/scenarios/echo.py --headless -u 50 -r 50 -t 1m --echo-rate 10 --host ws://127.0.0.1:8080

The ``echo`` row is a round trip measured on one clock, so it is valid across machines.
"""

import os
import sys

try:
    import wsfan.loadtest  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from wsfan.loadtest.users import EchoUser

__all__ = ["EchoUser"]
