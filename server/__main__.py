"""``python -m wsfan`` / ``wsfan``: parse settings, set up logging, run one node or a supervisor of workers."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import uvloop

from wsfan.server import config, logs
from wsfan.server.app import serve


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["token"]:
        from wsfan.server.auth import token_main

        return token_main(args[1:])
    settings = config.load(args)
    logs.setup(settings.log_level, settings.log_format)
    if settings.workers > 1:
        from wsfan.server.workers import supervise

        return supervise(settings)
    return uvloop.run(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
