"""``python -m wsfan`` / the ``wsfan`` command.

wsfan [server flags]        run a node (``wsfan --help`` lists every flag)
wsfan token ...             print a JWT for tests and demos
wsfan bench SCENARIO ...    the benchmark suite (extra ``bench``)
wsfan swarm ...             a short headless Locust run against a throwaway server (extra ``loadtest``)
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence

#: Modules each extra brings (pyproject.toml's optional-dependencies), checked before a subcommand starts.
_EXTRA_MODULES = {"bench": ("numpy", "psutil", "websockets"), "loadtest": ("locust", "websocket")}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    command = args[0] if args else ""
    if command in ("bench", "swarm"):
        extra = "bench" if command == "bench" else "loadtest"
        # swarm itself is stdlib-only and runs Locust in a child process: check the extra up front.
        missing = [m for m in _EXTRA_MODULES[extra] if importlib.util.find_spec(m) is None]
        try:
            if command == "bench":
                from wsfan.bench.__main__ import main as sub
            else:
                from wsfan.loadtest.swarm import main as sub
        except ImportError as exc:
            missing.append(exc.name or str(exc))
        if missing:
            print(
                f"wsfan {command}: missing dependency {missing[0]!r}; install it with: pip install 'wsfan[{extra}]'",
                file=sys.stderr,
            )
            return 2
        return int(sub(args[1:]) or 0)
    from wsfan.server.__main__ import main as serve_main

    return serve_main(args)


if __name__ == "__main__":
    sys.exit(main())
