"""Reconnection storm: hold --storm-users chat users, drop them all at once, measure the way back.

    locust -f loadtest/scenarios/storm.py --headless --host ws://127.0.0.1:8080 \
        --storm-users 500 --storm-drops 2 --backoff full-jitter      # then again with --backoff none

Rows: storm<N>:reconnect (max = time until everybody rejoined), storm<N>:recovered
(size = messages replayed via join since). See loadtest/shapes.py for the triggers.
"""

import os
import sys

try:
    import wsfan.loadtest  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from wsfan.loadtest.shapes import ReconnectStorm
from wsfan.loadtest.users import ChatUser

__all__ = ["ChatUser", "ReconnectStorm"]
