"""The audit page: every command ever run, filtered by session, actor and time; the same rows as
a JSONL or CSV download (sandkasten.store.audit, the one export `sandkasten audit export` uses);
and the hash chain's verification with the first event that breaks it, if any."""

from __future__ import annotations

import io
from datetime import UTC, datetime

from sanic import Request
from sanic.response import raw

from sandkasten.api import blueprint, daemon_of
from sandkasten.console.render import page
from sandkasten.errors import InvalidRequest
from sandkasten.store import audit as trail

bp = blueprint("console_audit", url_prefix="/console")
SHOWN = 500   # newest rows on the page; the download has them all


def moment(request: Request, name: str) -> datetime | None:
    """A time filter as a browser's datetime-local field sends it (read as UTC), or full ISO 8601."""
    value = (request.args.get(name) or "").strip()
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(f"invalid {name} {value!r}: expected a time like 2024-05-01T12:00 (UTC)",
                             parameter=name) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def filters(request: Request) -> dict:
    return {"session": (request.args.get("session") or "").strip() or None,
            "actor": (request.args.get("actor") or "").strip() or None,
            "since": moment(request, "since"), "until": moment(request, "until")}


def iso(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat(timespec="microseconds") if value else None


@bp.get("/audit")
async def audit_page(request: Request):
    d = daemon_of(request)
    f = filters(request)
    rows = await trail.collect(d.journal, iso(f["since"]), f["session"], until_iso=iso(f["until"]),
                               actor=f["actor"])
    check = await d.journal.verify()
    bad = None
    if not check.ok and check.first_bad_seq is not None:
        found = await d.journal.events(after_seq=check.first_bad_seq - 1, limit=1)
        bad = found[0] if found and found[0].seq == check.first_bad_seq else None
    query = {k: request.args.get(k, "") for k in ("session", "actor", "since", "until")}
    return page(request, "audit.html", section="audit", rows=list(reversed(rows))[:SHOWN], total=len(rows),
                shown=SHOWN, check=check, bad=bad, query=query, formats=trail.FORMATS)


@bp.get("/audit/export")
async def audit_export(request: Request):
    d = daemon_of(request)
    fmt = request.args.get("format", "jsonl")
    f = filters(request)
    out = io.StringIO()
    await trail.export(d.journal, fmt, f["since"], f["session"], out, until=f["until"], actor=f["actor"])
    kind = "application/x-ndjson" if fmt == "jsonl" else "text/csv"
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return raw(out.getvalue().encode(), content_type=f"{kind}; charset=utf-8",
               headers={"content-disposition": f'attachment; filename="sandkasten-audit-{stamp}.{fmt}"'})
