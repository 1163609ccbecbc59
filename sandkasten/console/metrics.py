"""The metrics page: exec latency histogram, sessions alive over time and the warm pool's fill,
from the journal (the same exec rows the audit export folds) and the pool configuration."""

from __future__ import annotations

from datetime import UTC, datetime

from sanic import Request

from sandkasten.api import blueprint, daemon_of
from sandkasten.console import charts
from sandkasten.console.render import page, parse_time
from sandkasten.store import audit as trail

bp = blueprint("console_metrics", url_prefix="/console")


@bp.get("/metrics")
async def metrics_page(request: Request):
    d = daemon_of(request)
    now = datetime.now(UTC)
    execs = [r for r in await trail.collect(d.journal, None, None) if r.get("kind", "exec") == "exec"]
    finished = [r for r in execs if r["status"] == "finished"]
    sessions = await d.journal.sessions(include_ended=True, include_pool=True)
    spans = [(parse_time(s["created_at"]) or now, parse_time(s["ended_at"])) for s in sessions]
    idle = await d.journal.idle_pool()
    statuses: dict[str, int] = {}
    for s in sessions:
        statuses[s["status"]] = statuses.get(s["status"], 0) + 1
    return page(
        request, "metrics.html", section="metrics",
        latency=charts.histogram(r["duration_ms"] for r in finished),
        alive=charts.live_over_time(spans, now),
        pool=charts.pool_fill(dict(d.cfg.pool.images) if d.cfg.pool.enabled else {}, (s["image"] for s in idle)),
        pool_enabled=d.cfg.pool.enabled, statuses=sorted(statuses.items()),
        counts={"execs": len(execs), "finished": len(finished),
                "failed": sum(1 for r in finished if r["exit_code"] not in (0, None)),
                "lost": sum(1 for r in execs if r["status"] == "lost"),
                "events": await d.journal.last_seq(), "sessions": len(sessions)})
