"""``python -m server`` / ``wsfan``: parse settings, set up logging, run one node or a supervisor of workers."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import uvloop

from server import config, logs
from server.app import serve


def main(argv: Sequence[str] | None = None) -> int:
    settings = config.load(argv)
    logs.setup(settings.log_level, settings.log_format)
    if settings.workers > 1:
        from server.workers import supervise

        return supervise(settings)
    return uvloop.run(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
