"""The console's files: its own scripts and styles (static/, in the repo) and the front-end
libraries npm installed (node_modules/, git-ignored; `tools/console-assets`, run by `make
install`). Only names listed here are served, so no request can reach another file.

A daemon without the libraries still starts: `missing()` names what is absent and the pages that
need them (the terminal) say how to install them instead of breaking."""

from __future__ import annotations

import mimetypes
import re
from pathlib import Path

from sanic import Request
from sanic.response import raw

from sandkasten.api import blueprint
from sandkasten.errors import SandkastenError

HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"
MODULES = HERE / "node_modules"
# name under /console/assets/ -> file below node_modules (package.json pins the versions)
LIBRARIES = {
    "xterm.js": "@xterm/xterm/lib/xterm.js",
    "xterm.css": "@xterm/xterm/css/xterm.css",
    "addon-fit.js": "@xterm/addon-fit/lib/addon-fit.js",
}
INSTALL_HINT = "run `make install` (or tools/console-assets) to install the console's libraries with npm"
_OWN_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*\.(js|css)$")

bp = blueprint("console_assets", url_prefix="/console")


class AssetNotFound(SandkastenError):
    code = "NOT_FOUND"


def missing() -> list[str]:
    """Library files the console would serve but cannot find."""
    return [name for name, rel in LIBRARIES.items() if not (MODULES / rel).is_file()]


def _send(path: Path, name: str):
    try:
        data = path.read_bytes()
    except OSError:
        raise AssetNotFound(f"unable to serve console asset {name!r}: {INSTALL_HINT}"
                            if path.is_relative_to(MODULES) else f"unable to serve console asset {name!r}: "
                            "no such file", asset=name) from None
    kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
    if kind.startswith("text/") or kind.endswith("javascript"):
        kind += "; charset=utf-8"
    return raw(data, content_type=kind, headers={"cache-control": "private, max-age=300"})


@bp.get("/static/<name>")
async def own(request: Request, name: str):
    if not _OWN_NAME.match(name):
        raise AssetNotFound(f"unable to serve console asset {name!r}: no such file", asset=name)
    return _send(STATIC / name, name)


@bp.get("/assets/<name>")
async def library(request: Request, name: str):
    rel = LIBRARIES.get(name)
    if rel is None:
        raise AssetNotFound(f"unable to serve console asset {name!r}: not one of {', '.join(LIBRARIES)}",
                            asset=name)
    return _send(MODULES / rel, name)
