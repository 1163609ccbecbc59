"""The Sanic application: auth, request ids, error rendering, routes."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets

from sanic import Request, Sanic
from sanic.exceptions import BadRequest, PayloadTooLarge, SanicException

from sandkasten import intake
from sandkasten.api import archive, errors, files, processes, sessions, stream, system, workspaces
from sandkasten.errors import SandkastenError

log = logging.getLogger("sandkasten.api")
OPEN_PATHS = ("/healthz",)


def unparsed(request: Request) -> bool:
    """Sanic's stand-in for a request whose head it could not parse (a bad request line or
    header, a head above the size limit): it carries no headers, so no API key either. Its
    error (400, 413) is the answer, not UNAUTHORIZED; no handler runs for it."""
    return request.method == "NONE"


def create_app(daemon) -> Sanic:
    cfg = daemon.cfg
    app = Sanic("sandkasten", configure_logging=False)
    app.config.REQUEST_MAX_SIZE = cfg.limits.max_body_bytes
    app.config.REQUEST_TIMEOUT = 60
    app.config.RESPONSE_TIMEOUT = cfg.defaults.max_exec_timeout_ms / 1000 + 60
    app.config.KEEP_ALIVE_TIMEOUT = 30
    app.config.GRACEFUL_SHUTDOWN_TIMEOUT = 5   # requests in flight answer 503 at once on a stop (daemon.begin_stop)
    app.config.FALLBACK_ERROR_FORMAT = "json"
    app.config.TOUCHUP = False   # Sanic's recompilation of its request path at start: ~30 ms of a restart
    app.ctx.daemon = daemon
    key = cfg.api_key.encode()
    key_id = "api:" + hashlib.sha256(key).hexdigest()[:8] if key else "api:anonymous"
    gate = None
    if cfg.console.enabled:   # the web console: its pages use a login cookie (sandkasten.console.auth)
        from sandkasten import console
        gate = console.install(app, daemon)

    @app.on_request
    async def authenticate(request: Request):
        given_id = request.headers.get("x-request-id")
        request.ctx.request_id = given_id if given_id and intake.TOKEN.match(given_id) else secrets.token_hex(8)
        # An agent run (e.g. an Agents SDK trace id) acting through this key: journaled in the
        # actor of every event the request appends, so the audit ties each command to its run.
        run = request.headers.get("x-agent-run")
        request.ctx.actor = key_id if run is None else f"{key_id}/run:{run}"
        if given_id is not None and request.ctx.request_id != given_id:   # it is journaled and echoed
            return errors.body("INVALID_REQUEST", "invalid X-Request-ID header: expected 1-200 printable "
                               "ASCII characters", {"header": "X-Request-ID"})
        if run is not None and not intake.AGENT_RUN.match(run):
            return errors.body("INVALID_REQUEST", "invalid X-Agent-Run header: expected 1-128 letters, digits, "
                               "'_', '.', ':' or '-' (e.g. an Agents SDK trace id)", {"header": "X-Agent-Run"})
        if unparsed(request):
            return None
        if gate is not None and gate.owns(request.path):
            refused = gate.check_page(request)   # no cookie: a redirect to the login page
            if refused is not None:
                return refused
        elif key and request.path not in OPEN_PATHS:
            given = request.headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            # headers are read as latin-1/surrogates: a byte that is no UTF-8 must compare, not raise
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                    token.strip().encode("utf-8", "surrogateescape"), key):
                admitted, refused = gate.check_api(request) if gate is not None else (False, None)
                if not admitted:   # the console's scripts call the API with its cookie + CSRF header
                    return errors.body("UNAUTHORIZED", "missing or wrong API key: send 'Authorization: Bearer <api_key>'")
                if refused is not None:
                    return refused
        if daemon.stopping:   # connections still draining; sandboxes and their commands carry on
            return errors.body("NOT_READY", "the daemon is stopping: retry in a moment")
        return None

    @app.on_response
    async def tag(request: Request, response):
        rid = getattr(request.ctx, "request_id", None)
        if rid:
            response.headers["x-request-id"] = rid

    @app.exception(Exception)
    async def render(request: Request, exc: Exception):
        if isinstance(exc, PayloadTooLarge) and unparsed(request):
            limit = app.config.REQUEST_MAX_HEADER_SIZE
            return errors.body("PAYLOAD_TOO_LARGE", f"request head too large: the request line and headers "
                               f"may take {limit} bytes (a very long URL?)", {"limit": limit})
        if isinstance(exc, BadRequest) and unparsed(request):
            return errors.body("INVALID_REQUEST", f"unable to read the HTTP request: {exc}")
        if isinstance(exc, PayloadTooLarge):
            limit = cfg.limits.max_body_bytes
            return errors.body("PAYLOAD_TOO_LARGE", f"request body too large: the limit is {limit} bytes",
                               {"limit": limit})
        if not isinstance(exc, (SandkastenError, SanicException)):
            log.exception("unhandled error on %s %s", request.method, request.path)
        return errors.render(exc)

    app.blueprint(system.bp)
    app.blueprint(sessions.bp)
    app.blueprint(files.bp)
    app.blueprint(archive.bp)
    app.blueprint(stream.bp)
    app.blueprint(processes.bp)
    app.blueprint(workspaces.bp)
    if cfg.shared_journal:  # one host of a cluster: any node answers for any session (docs/cluster.md)
        from sandkasten.cluster import forward

        forward.install(app, daemon)
    return app
