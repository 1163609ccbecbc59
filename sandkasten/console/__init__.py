"""The web console under /console: watch, replay and audit sessions in a browser.

Served by the daemon itself (off with `console: {enabled: false}`). Pages are rendered on the
server from the journal (Jinja, every value escaped); small scripts of our own (static/) keep
them live over Server-Sent Events and make changes through the JSON API with the login cookie
and a CSRF header; xterm.js, installed by npm (`tools/console-assets`), draws terminals.

Modules: auth (cookie, CSRF, the gate the API's request hook calls), login, pages (sessions, one
session, terminal, workspaces), files, audit, metrics, feeds (SSE), timeline (events → entries),
charts (numbers → SVG shapes), render (templates, security headers), assets (static files).
"""

from __future__ import annotations

import logging

from sanic import Request, Sanic
from sanic.exceptions import SanicException
from sanic.response import HTTPResponse

from sandkasten.api import errors
from sandkasten.console import assets, audit, auth, feeds, files, login, metrics, pages, render
from sandkasten.errors import SandkastenError

log = logging.getLogger("sandkasten.console")
BLUEPRINTS = (login.bp, pages.bp, files.bp, audit.bp, metrics.bp, feeds.bp, assets.bp)


def install(app: Sanic, daemon) -> auth.Gate:
    """Register the console's routes and hooks on `app`; the gate for the API's auth hook."""
    gate = auth.Gate(daemon.cfg.api_key, daemon.cfg.console.key)
    app.ctx.console_gate = gate
    for bp in BLUEPRINTS:
        app.blueprint(bp)

    @app.on_response
    async def console_headers(request: Request, response: HTTPResponse):
        if auth.Gate.owns(request.path):
            render.secure_headers(request, response)

    absent = assets.missing()
    if absent:
        log.warning("console: %s missing; terminals will not work: %s", ", ".join(absent), assets.INSTALL_HINT)
    return gate


async def error_page(request: Request, exc: Exception):
    """Errors on console pages as a page; scripts (not asking for HTML) get the API's error body."""
    if isinstance(exc, errors.Answer):   # the auth hook's redirect to the login page, or its 403
        return exc.response
    if isinstance(exc, SandkastenError):
        code, message = exc.code, exc.message
        status = errors.STATUS.get(code, 500)
    elif isinstance(exc, SanicException):
        status = getattr(exc, "status_code", 500)
        code = errors.SANIC_CODES.get(status, "INTERNAL")
        message = str(exc) or code.lower().replace("_", " ")
    else:
        log.exception("console: unhandled error on %s %s", request.method, request.path)
        status, code, message = 500, "INTERNAL", f"internal error: {type(exc).__name__}; see the daemon log"
    if "text/html" not in request.headers.get("accept", ""):
        return errors.render(exc)
    return render.page(request, "error.html", status=status, code=code, message=message)


for _bp in BLUEPRINTS:
    _bp.exception(Exception)(error_page)
