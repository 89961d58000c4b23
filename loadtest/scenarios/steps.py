"""Chat load in steps up to --users (--step-count steps of --step-time s): find where latency bends.

    locust -f loadtest/scenarios/steps.py --headless -u 1000 -r 100 --step-count 5 --step-time 30 \
        --host ws://127.0.0.1:8080
"""

import os
import sys

try:
    import wsfan.loadtest  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from wsfan.loadtest.shapes import StepLoad
from wsfan.loadtest.users import ChatUser

__all__ = ["ChatUser", "StepLoad"]
