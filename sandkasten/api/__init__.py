"""The HTTP API: Sanic blueprints, one module per resource (`app.create_app` puts them together)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sanic import Blueprint, Request

from sandkasten.service import Caller

if TYPE_CHECKING:   # the daemon imports the API (create_app) when it serves
    from sandkasten.daemon import Daemon


class _Blueprint(Blueprint):
    def _determine_error_format(self, handler: Any) -> str:
        return "json"


def blueprint(name: str, **options: Any) -> Blueprint:
    """A blueprint whose routes answer errors as JSON (our error shape, `api.errors`). Said up
    front: Sanic would otherwise parse every handler's source at import to guess the format
    (~2 ms per route, a sixth of a restart)."""
    return _Blueprint(name, **options)


def daemon_of(request: Request) -> Daemon:
    """The daemon serving this request: its service, journal, runtime, config (typed)."""
    return request.app.ctx.daemon


def caller(request: Request) -> Caller:
    """Who asks, for the journal: the API key's id (and agent run) and the request id."""
    return Caller(request.ctx.actor, request.ctx.request_id)
