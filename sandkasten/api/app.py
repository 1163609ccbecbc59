"""The Sanic application: auth, request ids, error rendering, routes."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets

from sanic import Request, Sanic
from sanic.exceptions import BadRequest, PayloadTooLarge, SanicException
from sanic.http import Http

from sandkasten import intake
from sandkasten.api import archive, errors, files, processes, sessions, stream, system, workspaces
from sandkasten.api.errors import Answer
from sandkasten.errors import InvalidRequest, NotReady, RequestTimeout, SandkastenError, Unauthorized

log = logging.getLogger("sandkasten.api")
OPEN_PATHS = ("/healthz",)
READS = ("GET", "HEAD", "OPTIONS")


def unparsed(request: Request) -> bool:
    """Sanic's stand-in for a request whose head it could not parse (a bad request line or
    header, a head above the size limit): it carries no headers, so no API key either. Its
    error (400, 413) is the answer, not UNAUTHORIZED; no handler runs for it."""
    return request.method == "NONE"


def _drop_body(request: Request) -> None:
    """Answer without reading what is left of the body, then close the connection (it cannot
    carry another request with an unread body in front of it)."""
    if isinstance(request.stream, Http):   # (typed as its base class, which has neither attribute)
        request.stream.keep_alive = False
        request.stream.request_body = None


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

    # Checked right after routing, before Sanic reads the body: a client without the key gets
    # its 401 at once and the connection is closed with the body unread (20 unauthenticated
    # 15 MiB bodies held 300 MB of daemon memory for 10 minutes), and an accepted body must
    # arrive within limits.body_timeout_seconds (a trickle held its connection and memory).
    @app.signal("http.routing.after")
    async def authenticate(request: Request, handler=None, **_):
        given_id = request.headers.get("x-request-id")
        request.ctx.request_id = given_id if given_id and intake.TOKEN.match(given_id) else secrets.token_hex(8)
        # An agent run (e.g. an Agents SDK trace id) acting through this key: journaled in the
        # actor of every event the request appends, so the audit ties each command to its run.
        run = request.headers.get("x-agent-run")
        request.ctx.actor = key_id if run is None else f"{key_id}/run:{run}"
        if given_id is not None and request.ctx.request_id != given_id:   # it is journaled and echoed
            _drop_body(request)
            raise InvalidRequest("invalid X-Request-ID header: expected 1-200 printable ASCII characters",
                                 header="X-Request-ID")
        if run is not None and not intake.AGENT_RUN.match(run):
            _drop_body(request)
            raise InvalidRequest("invalid X-Agent-Run header: expected 1-128 letters, digits, '_', '.', ':' or '-' "
                                 "(e.g. an Agents SDK trace id)", header="X-Agent-Run")
        if unparsed(request):
            return
        if gate is not None and gate.owns(request.path):
            if request.method not in READS and gate.wants_form(request):
                await receive_body(request, handler)   # the login key, or a change's CSRF token, is in the form
            refused = gate.check_page(request)   # no cookie: a redirect to the login page
            if refused is not None:
                _drop_body(request)
                raise Answer(refused)
        elif key and request.path not in OPEN_PATHS:
            given = request.headers.get("authorization", "")
            scheme, _sep, token = given.partition(" ")
            # headers are read as latin-1/surrogates: a byte that is no UTF-8 must compare, not raise
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                    token.strip().encode("utf-8", "surrogateescape"), key):
                admitted, api_refused = gate.check_api(request) if gate is not None else (False, None)
                if not admitted:   # the console's scripts call the API with its cookie + CSRF header
                    _drop_body(request)
                    raise Unauthorized("missing or wrong API key: send 'Authorization: Bearer <api_key>'")
                if api_refused is not None:
                    _drop_body(request)
                    raise Answer(api_refused)
        if daemon.stopping:   # connections still draining; sandboxes and their commands carry on
            _drop_body(request)
            raise NotReady("the daemon is stopping: retry in a moment")
        if request.method not in READS and not daemon.ready:
            # until the start-up reconcile has compared the journal with the host (and never if it
            # failed) nothing may change: a change now could be swept as an orphan, or built on damage
            _drop_body(request)
            phase = daemon.readiness.get("phase")
            if phase == "failed":
                raise NotReady(f"unable to accept changes: the daemon's start-up reconcile failed "
                               f"({daemon.readiness.get('error')}); see /readyz and the daemon log",
                               phase=phase)
            raise NotReady(f"the daemon is starting ({phase}): retry in a moment", phase=phase)
        await receive_body(request, handler)

    async def receive_body(request: Request, handler) -> None:
        """Read the body now, within limits.body_timeout_seconds (a streaming route reads its own)."""
        if request.stream is None or not request.stream.request_body or hasattr(handler, "is_stream"):
            return
        try:
            await asyncio.wait_for(request.receive_body(), cfg.limits.body_timeout_seconds)
        except TimeoutError:
            _drop_body(request)
            raise RequestTimeout(f"unable to read the request body: it did not arrive within "
                                 f"{cfg.limits.body_timeout_seconds:g}s (limits.body_timeout_seconds)",
                                 limit_seconds=cfg.limits.body_timeout_seconds) from None

    @app.on_response
    async def tag(request: Request, response):
        rid = getattr(request.ctx, "request_id", None)
        if rid:
            response.headers["x-request-id"] = rid

    @app.exception(Exception)
    async def render(request: Request, exc: Exception):
        if isinstance(exc, Answer):
            return exc.response
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
        elif isinstance(exc, SandkastenError) and errors.STATUS.get(exc.code, 500) >= 500 and exc.code != "NOT_READY":
            # the host failed us (journal full or locked, the kernel refused): the operator must see it
            log.warning("%s %s: %s %s", request.method, request.path, exc.code, exc.message)
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
