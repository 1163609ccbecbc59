"""Health, readiness, metrics and the OpenAPI document."""

from __future__ import annotations

from sanic import Request, json, text

from sandkasten import __version__
from sandkasten.api.openapi import document
from sandkasten.api import blueprint, daemon_of

bp = blueprint("system")


@bp.get("/healthz")
async def healthz(request: Request):
    return json({"status": "ok", "version": __version__})


@bp.get("/readyz")
async def readyz(request: Request):
    d = daemon_of(request)
    if not d.ready:
        return json({"status": "starting", "ready": False, "detail": d.readiness}, status=503)
    return json({"status": "ready", "ready": True, "detail": d.readiness})


@bp.get("/openapi.json")
async def openapi(request: Request):
    return json(document())


@bp.get("/metrics")
async def metrics(request: Request):
    d = daemon_of(request)
    live = await d.journal.sessions()
    counts: dict[str, int] = {}
    for s in live:
        counts[s["status"]] = counts.get(s["status"], 0) + 1
    lines = ["# TYPE sandkasten_sessions gauge"]
    lines += [f'sandkasten_sessions{{status="{k}"}} {v}' for k, v in sorted(counts.items())]
    lines += ["# TYPE sandkasten_journal_last_seq counter", f"sandkasten_journal_last_seq {await d.journal.last_seq()}",
              "# TYPE sandkasten_ready gauge", f"sandkasten_ready {int(d.ready)}"]
    return text("\n".join(lines) + "\n", content_type="text/plain; version=0.0.4")
