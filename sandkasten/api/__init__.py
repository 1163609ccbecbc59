"""The HTTP API: Sanic blueprints, one module per resource (`app.create_app` puts them together)."""

from __future__ import annotations

from typing import Any

from sanic import Blueprint


class _Blueprint(Blueprint):
    def _determine_error_format(self, handler: Any) -> str:
        return "json"


def blueprint(name: str, **options: Any) -> Blueprint:
    """A blueprint whose routes answer errors as JSON (our error shape, `api.errors`). Said up
    front: Sanic would otherwise parse every handler's source at import to guess the format
    (~2 ms per route, a sixth of a restart)."""
    return _Blueprint(name, **options)
