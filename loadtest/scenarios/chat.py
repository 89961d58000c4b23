"""Chat: users join rooms and publish at a fixed rate; everybody receives.

    locust -f loadtest/scenarios/chat.py --headless -u 100 -r 20 -t 1m \
        --rooms 10 --publish-rate 2 --payload-size 256 --host ws://127.0.0.1:8080

Rows: connect, join, publish (ack RTT), delivery (publish -> receive latency).
"""

import os
import sys

try:
    import wsfan.loadtest  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from wsfan.loadtest.users import ChatUser

__all__ = ["ChatUser"]
