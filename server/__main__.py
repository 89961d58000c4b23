"""``python -m server`` / ``wsfan``: parse settings, set up logging, run the node on uvloop."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import uvloop

from server import config
from server.app import serve


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # picows logs every disconnect at INFO; at scale that is noise on the hot path.
    logging.getLogger("picows").setLevel(logging.DEBUG if level.lower() == "debug" else logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    settings = config.load(argv)
    setup_logging(settings.log_level)
    return uvloop.run(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
