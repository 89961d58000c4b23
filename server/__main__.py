"""``python -m wsfan`` / ``wsfan``: parse settings, set up logging, run one node or a supervisor of workers."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

import uvloop

from wsfan.server import config, logs
from wsfan.server.app import serve
from wsfan.server.startup import EXIT_USAGE, StartupError, preflight

log = logging.getLogger("wsfan")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["token"]:
        from wsfan.server.auth import token_main

        return token_main(args[1:])
    if args[:1] == ["run"]:  # uvicorn's habit: wsfan run myapp:app [flags] is --app myapp:app
        if len(args) < 2 or args[1].startswith("-"):
            print(
                "wsfan: error: wsfan run MODULE:APP [flags], e.g. wsfan run myapp:app --port 9000"
                " (or a file: wsfan run path/to/myapp.py:app)",
                file=sys.stderr,
            )
            return EXIT_USAGE
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(
                0, os.getcwd()
            )  # like uvicorn: the app's module is found from the current directory
        args = ["--app", args[1], *args[2:]]
    settings = config.load(args)
    logs.setup(settings.log_level, settings.log_format)
    try:
        preflight(settings)
    except StartupError as exc:
        print(f"wsfan: error: {exc}", file=sys.stderr)
        if exc.detail:
            print(exc.detail, end="", file=sys.stderr)
        return EXIT_USAGE
    cores = os.cpu_count() or 1
    if settings.production and settings.workers == 1 and cores > 1 and not settings.broker:
        log.warning(
            "--production without --broker runs one worker; give --broker redis://... to use all %d cores",
            cores,
        )
    for warning in config.warnings(settings):
        log.warning("%s", warning)
    if settings.workers > 1:
        from wsfan.server.workers import supervise

        return supervise(settings, reload=lambda: config.load(args))
    return uvloop.run(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
