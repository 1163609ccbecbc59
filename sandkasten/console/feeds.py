"""Live updates as Server-Sent Events: the sessions table and one session's timeline.

Who runs this: the daemon's event loop, one handler per open page. Each feed watches the journal
(a cheap read of the last sequence number, twice a second) and sends what changed; a page that
reconnects sends Last-Event-ID and gets everything after it. Nothing here writes. Feeds end when
the daemon begins to stop (the browser's EventSource reconnects to the next daemon on its own).

- `/console/feed/sessions`: event `sessions` {seq, now, sessions: [session + stats]}, sent when the
  journal moved and every STATS_S for the cgroup numbers (cpu, memory, pids) of running sessions.
- `/console/feed/sessions/<sid>`: event `entry` {key, html} with the rendered timeline entry a
  new event started or changed, and `head` {html} with the session's summary; ids are event seqs.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime

from sanic import Request

from sandkasten.api import blueprint, daemon_of, params
from sandkasten.api.sessions import session_row
from sandkasten.console import timeline
from sandkasten.console.pages import entry_context, outputs
from sandkasten.console.render import fragment
from sandkasten.errors import SandkastenError
from sandkasten.views import session_view

bp = blueprint("console_feeds", url_prefix="/console")
POLL_S = 0.5
STATS_S = 2.0
HEARTBEAT_S = 15.0
ENDED_SHOWN = 200   # newest ended sessions in the table when they are asked for


def sse(kind: str, data: dict, event_id: int | None = None) -> str:
    head = f"event: {kind}\n" + (f"id: {event_id}\n" if event_id is not None else "")
    return head + f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def open_stream(request: Request):
    response = await request.respond(content_type="text/event-stream; charset=utf-8",
                                     headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
    await response.send(": connected\n\n")   # the headers go out now: the page shows it is live
    return response


def sample(daemon, sids: list[str]) -> dict[str, dict]:
    """cgroup numbers of running sessions (a worker thread); a sandbox gone meanwhile is skipped."""
    out = {}
    for sid in sids:
        try:
            s = daemon.runtime.cgroups.stats(sid)
        except (SandkastenError, OSError, ValueError, KeyError):
            continue
        out[sid] = {"memory_bytes": s.memory_bytes, "memory_limit": s.memory_limit,
                    "cpu_usage_usec": s.cpu_usage_usec, "pids": s.pids, "t": time.time()}
    return out


async def snapshot(daemon, ended: bool) -> list[dict]:
    rows = await daemon.journal.sessions(include_ended=ended, include_pool=True)
    if ended:
        over = [r for r in rows if r["ended_at"]]
        over = sorted(over, key=lambda r: r["ended_at"])[:-ENDED_SHOWN] if len(over) > ENDED_SHOWN else []
        dropped = {r["id"] for r in over}
        rows = [r for r in rows if r["id"] not in dropped]
    stats = await asyncio.to_thread(sample, daemon, [r["id"] for r in rows if r["status"] == "running"])
    return [{**session_view(r), "stats": stats.get(r["id"])} for r in rows]


@bp.get("/feed/sessions")
async def sessions_feed(request: Request):
    d = daemon_of(request)
    ended = params.flag(request, "ended")
    response = await open_stream(request)
    seen_seq, sent_at = -1, 0.0
    while not d.stopping:
        seq = await d.journal.last_seq()
        now = time.monotonic()
        if seq != seen_seq or now - sent_at >= STATS_S:
            rows = await snapshot(d, ended)
            await response.send(sse("sessions", {"seq": seq, "now": datetime.now(UTC).isoformat(),
                                                 "sessions": rows}))
            seen_seq, sent_at = seq, now
        await asyncio.sleep(POLL_S)
    await response.eof()


def resume_after(request: Request) -> int:
    text = request.headers.get("last-event-id") or request.args.get("after") or "0"
    return int(text) if text.isascii() and text.isdigit() else 0


@bp.get("/feed/sessions/<sid>")
async def session_feed(request: Request, sid: str):
    d = daemon_of(request)
    await session_row(d, sid)   # 404 before the stream opens
    after = resume_after(request)
    replay = timeline.Replay()
    cursor = 0
    response = await open_stream(request)
    last_beat = time.monotonic()
    while not d.stopping:
        batch = await d.journal.events(after_seq=cursor, stream_id=sid, limit=1000)
        changed: dict[str, timeline.Entry] = {}
        for event in batch:
            entry, _ = replay.apply(event)
            if entry is not None and event.seq > after:
                changed[entry.key] = entry
        if batch:
            cursor = batch[-1].seq
        if changed:
            shown = await asyncio.to_thread(outputs, d, sid, list(changed.values()))
            for key, entry in changed.items():
                html = fragment("_entry.html", item=entry_context(sid, entry, shown.get(key)))
                await response.send(sse("entry", {"key": key, "html": html}, cursor))
            row = await d.journal.session(sid)
            if row is not None:
                await response.send(sse("head", {"html": fragment("_session_head.html", s=session_view(row))},
                                        cursor))
            after = cursor
            last_beat = time.monotonic()
        elif time.monotonic() - last_beat > HEARTBEAT_S:
            await response.send(": keepalive\n\n")
            last_beat = time.monotonic()
        if len(batch) < 1000:
            await asyncio.sleep(POLL_S)
    await response.eof()
