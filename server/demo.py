"""The ``--demo`` pages: a chat room (``GET /``) and the browser client module (``GET /wsfan.js``).

They are served on the WebSocket port as plain GETs (picows answers body-less
GETs), so the demo needs no second port and the page's WebSocket, ``/metrics``
poll and script all share one origin. The files are read once, when the node
starts, so a request costs a dict lookup and a missing file fails the start
instead of the first visitor. They ship as package data of ``client``
(``client/js/``) and are located without importing that package.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import NamedTuple

HTML = "text/html; charset=utf-8"
JAVASCRIPT = "text/javascript; charset=utf-8"

# path -> (file in client/js, Content-Type). "/client.js" is an alias: the brief of issue #5 names both.
ROUTES: dict[bytes, tuple[str, str]] = {
    b"/": ("demo.html", HTML),
    b"/index.html": ("demo.html", HTML),
    b"/wsfan.js": ("wsfan.js", JAVASCRIPT),
    b"/client.js": ("wsfan.js", JAVASCRIPT),
}


class Page(NamedTuple):
    body: bytes
    headers: dict[str, str]


def js_dir() -> Path:
    """``client/js`` wherever the ``client`` package is installed (source tree, editable or wheel)."""
    spec = importlib.util.find_spec("client")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package 'client' not found: the demo page ships in client/js/")
    return Path(next(iter(spec.submodule_search_locations))) / "js"


def load_pages(directory: Path | None = None) -> dict[bytes, Page]:
    """Read every demo file once; ``no-cache`` so a browser revalidates after an upgrade of the server."""
    directory = directory or js_dir()
    cache: dict[str, bytes] = {}
    pages: dict[bytes, Page] = {}
    for path, (name, content_type) in ROUTES.items():
        if name not in cache:
            cache[name] = (directory / name).read_bytes()
        headers = {
            "Content-Type": content_type,
            "Cache-Control": "no-cache",
            "X-Content-Type-Options": "nosniff",
        }
        pages[path] = Page(cache[name], headers)
    return pages
