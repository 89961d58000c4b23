"""``python -m wsfan`` / the ``wsfan`` command.

wsfan [server flags]        run a node (``wsfan --help`` lists every flag)
wsfan token ...             print a JWT for tests and demos
wsfan bench SCENARIO ...    the benchmark suite (extra ``bench``)
wsfan swarm ...             a short headless Locust run against a throwaway server (extra ``loadtest``)
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    command = args[0] if args else ""
    if command in ("bench", "swarm"):
        extra = "bench" if command == "bench" else "loadtest"
        try:
            if command == "bench":
                from wsfan.bench.__main__ import main as sub
            else:
                from wsfan.loadtest.swarm import main as sub
        except ImportError as exc:
            print(
                f"wsfan {command}: missing dependency {exc.name!r}; install it with: pip install 'wsfan[{extra}]'",
                file=sys.stderr,
            )
            return 2
        return int(sub(args[1:]) or 0)
    from wsfan.server.__main__ import main as serve_main

    return serve_main(args)


if __name__ == "__main__":
    sys.exit(main())
