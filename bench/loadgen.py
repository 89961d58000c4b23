"""Load-generator process: ``python -m wsfan.bench.loadgen '<json config>'``, driven by the harness.

``cfg["role"]`` names one role of ``bench/roles`` (the registry is ``wsfan.bench.roles.ROLES``;
what they share is ``bench/roles/base.py``). The process runs that role on uvloop with the
cyclic GC off and its open-file limit raised, and reports a failure as an ``error`` event.
"""

from __future__ import annotations

import gc
import json
import resource
import sys
from typing import Any

import uvloop

from wsfan.bench.roles import ROLES
from wsfan.bench.roles.base import Control, emit


async def main(cfg: dict[str, Any]) -> None:
    control = Control()
    await control.open()
    try:
        await ROLES[cfg["role"]](cfg, control)
    except SystemExit:
        raise
    except BaseException as exc:
        emit("error", message=f"{type(exc).__name__}: {exc}")
        raise


if __name__ == "__main__":
    # A cyclic-GC pass over tens of thousands of listener objects stalls the event loop for
    # milliseconds, which open-loop phases would report as the server's latency. Deliveries
    # create no reference cycles, so a bounded run needs no cycle collector.
    gc.disable()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    uvloop.run(main(json.loads(sys.argv[1])))
