"""Every wsfan user class, no load shape: pick classes by name or in the web UI.

    locust -f loadtest/locustfile.py --host ws://127.0.0.1:8080            # web UI, --class-picker to choose
    locust -f loadtest/locustfile.py --headless -u 50 -r 10 -t 1m ChatUser --host ws://127.0.0.1:8080

Without class names all three run, mixed by equal weight. One scenario per
file, with a shape where it needs one, is in ``loadtest/scenarios/``; ready
configurations in ``loadtest/conf/``. Options: ``locust -f loadtest/locustfile.py --help``.
"""

import os
import sys

try:
    import wsfan.loadtest  # noqa: F401
except ImportError:  # not installed: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from wsfan.loadtest.users import ChatUser, EchoUser, IdleUser

__all__ = ["ChatUser", "EchoUser", "IdleUser"]
