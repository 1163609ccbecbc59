"""Any node answers for any session: requests about a session placed on another host are
forwarded over HTTP to that host's advertised address, and its answer (a JSON body, a file, or
an SSE stream, chunk by chunk) goes back to the client unchanged.

Who runs this: the Sanic app of a cluster host: a wrapper around the per-session route
handlers (authentication has run before it).
Forwarded: everything under /v1/sessions/{sid}/… (exec, streams, execs, files, processes,
stats) and DELETE /v1/sessions/{sid} (the owner tears its sandbox down). Answered locally from
the journal: the session itself (GET) and lists. A forwarded request carries
`X-Sandkasten-Forwarded-By`; a node never forwards such a request again (no loops while a
placement changes) and answers it only for a session placed on itself: otherwise 503, retry.
Why forwarding and not "the owner follows the journal": exec output, files and process
streams live on the owner's disk and runner socket, never in the journal (DESIGN.md §2: large
output never goes inside events) — see docs/cluster.md.
"""

from __future__ import annotations

import functools
import logging
import re

import httpx
from sanic import Request

from sandkasten.api import errors
from sandkasten.domain import host as h

log = logging.getLogger("sandkasten.cluster")
FORWARDED_BY = "x-sandkasten-forwarded-by"
_SESSION_PATH = re.compile(r"^/v1/sessions/(?P<sid>[^/]+)(?P<rest>/.*)?$")
_PASS_HEADERS = ("authorization", "content-type", "accept", "idempotency-key", "last-event-id", "x-request-id")
_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "server",
                "date", "content-type"}  # content-type goes in as respond()'s own argument


def forwarded_session(request: Request) -> str | None:
    """The session id whose owner should answer this request, or None (answer here)."""
    m = _SESSION_PATH.match(request.path)
    if m is None:
        return None
    if m.group("rest") and m.group("rest") != "/":
        return m.group("sid")
    return m.group("sid") if request.method == "DELETE" else None


def install(app, daemon) -> None:
    """Wrap the handlers of the per-session routes (at server start, once routes are final):
    a request for a session placed on another live host is relayed there; others run as
    before. A wrapper, not a request middleware: a handler may stream its answer
    (`request.respond`) and return nothing, a middleware may not."""
    timeout = daemon.cfg.cluster.forward_timeout_seconds
    clients: dict[str, httpx.AsyncClient] = {}

    def client_for(address: str) -> httpx.AsyncClient:
        c = clients.get(address)
        if c is None:
            c = clients[address] = httpx.AsyncClient(base_url=address, timeout=httpx.Timeout(timeout, connect=5.0))
        return c

    def wrap(handler):
        @functools.wraps(handler)
        async def forwarding(request: Request, *args, **kwargs):
            answer = await _maybe_forward(request, daemon, client_for)
            if answer is _HERE:
                return await handler(request, *args, **kwargs)
            return answer
        return forwarding

    @app.before_server_start
    async def _wrap_session_routes(app, _loop=None) -> None:
        for route in app.router.routes:
            path = "/" + route.path.lstrip("/")
            if path.startswith("/v1/sessions/<") and (path.count("/") > 3 or "DELETE" in route.methods):
                route.handler = wrap(route.handler)

    @app.after_server_stop
    async def _close_clients(app, _loop=None) -> None:
        for c in clients.values():
            await c.aclose()


_HERE = object()  # answer the request on this node


async def _maybe_forward(request: Request, daemon, client_for):
    sid = forwarded_session(request)
    membership = daemon.cluster
    if sid is None or membership is None or not daemon.ready:
        return _HERE
    row = await daemon.journal.session(sid)
    if row is None or row["host_id"] is None or row["host_id"] == membership.host_id:
        return _HERE
    if request.headers.get(FORWARDED_BY):  # never forward twice; never touch a sandbox that is not ours
        return errors.body("HOST_UNREACHABLE", f"unable to answer for session {sid} here: it moved to host "
                           f"{row['host_id']} while the request was forwarded; retry", {"host_id": row["host_id"]})
    hosts = {r["id"]: r for r in await membership.hosts()}
    target = hosts.get(row["host_id"])
    if target is None or target["status"] != h.LIVE:
        return errors.body("HOST_UNREACHABLE", f"unable to reach session {sid}: its host {row['host_id']} is "
                           f"{target['status'] if target else 'unknown'}; the session is recovered by the "
                           f"lost_sandbox_policy once the host is declared lost", {"host_id": row["host_id"]})
    return await _relay(request, client_for(target["address"]), membership.host_id, sid, target)


async def _relay(request: Request, client: httpx.AsyncClient, me: str, sid: str, target: dict):
    headers = {k: v for k, v in request.headers.items() if k.lower() in _PASS_HEADERS}
    headers[FORWARDED_BY] = me
    url = request.path + (f"?{request.query_string}" if request.query_string else "")
    try:
        upstream = await client.send(client.build_request(request.method, url, headers=headers,
                                                          content=request.body or None), stream=True)
    except httpx.HTTPError as e:
        return errors.body("HOST_UNREACHABLE", f"unable to forward to host {target['id']} ({target['address']}) "
                           f"that runs session {sid}: {type(e).__name__}: {e}", {"host_id": target["id"]})
    try:
        out = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_HEADERS}
        out["x-sandkasten-host"] = target["id"]
        response = await request.respond(status=upstream.status_code, headers=out,
                                         content_type=upstream.headers.get("content-type"))
        async for chunk in upstream.aiter_raw():
            await response.send(chunk)
        await response.eof()
    except httpx.HTTPError as e:  # the owner went away mid-answer: the client sees a cut stream
        log.warning("forwarding %s %s to %s cut: %s", request.method, request.path, target["id"], e)
    finally:
        await upstream.aclose()
    return None
