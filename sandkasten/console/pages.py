"""The console's pages about sessions: the live table, one session's replayed history with its
processes, a process's terminal, and the persistent workspaces.

Who runs this: the daemon's event loop. Everything shown comes from the journal (sessions, the
session's events, workspaces) and from the exec logs on disk; state changes (destroy, run a
command, start a shell, upload) are made by the pages' scripts through the JSON API, so the
console has no write path of its own."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from sanic import Request
from sanic.response import raw

from sandkasten.api import blueprint, daemon_of
from sandkasten.api.processes import process_row
from sandkasten.api.sessions import session_row
from sandkasten.api.workspaces import listing as workspace_listing
from sandkasten.console import assets, timeline
from sandkasten.console.render import page
from sandkasten.domain import events as ev
from sandkasten.errors import ExecNotFound
from sandkasten.runtime.spec import EXEC_ID
from sandkasten.views import session_view

bp = blueprint("console_pages", url_prefix="/console")
PAGE_OUTPUT_BYTES = 32 * 1024   # output shown inline per command; the rest is a download away
TIMELINE_ENTRIES = 300          # newest entries shown unless ?all=true


@dataclass(frozen=True)
class Output:
    text: str
    cut: bool
    on_disk: bool


@bp.get("/sessions")
async def sessions_page(request: Request):
    return page(request, "sessions.html", section="sessions")


async def read_stream(daemon, sid: str) -> list[ev.RecordedEvent]:
    """Every event of a session's stream, oldest first."""
    out: list[ev.RecordedEvent] = []
    after = 0
    while True:
        batch = await daemon.journal.events(after_seq=after, stream_id=sid, limit=2000)
        if not batch:
            return out
        out.extend(batch)
        after = batch[-1].seq


def outputs(daemon, sid: str, entries: list) -> dict[str, Output]:
    """What each command printed, from its log on disk (runs in a worker thread)."""
    shown: dict[str, Output] = {}
    for entry in entries:
        if entry.kind != "exec" or entry.status != "finished":
            continue
        _, _, both, cut = daemon.runtime.read_output(sid, entry.exec_id, PAGE_OUTPUT_BYTES)
        printed = (entry.stdout_bytes or 0) + (entry.stderr_bytes or 0)
        shown[entry.exec_id] = Output(both.decode("utf-8", "replace"), cut, on_disk=bool(both) or printed == 0)
    return shown


def entry_context(sid: str, entry, output: Output | None = None) -> dict:
    """What _entry.html needs to draw one timeline entry."""
    return {"sid": sid, "e": entry, "out": output, "limit": PAGE_OUTPUT_BYTES}


@bp.get("/sessions/<sid>")
async def session_page(request: Request, sid: str):
    d = daemon_of(request)
    row = await session_row(d, sid)
    events = await read_stream(d, sid)
    entries = timeline.fold(events)
    everything = request.args.get("all") == "true"
    hidden = 0 if everything else max(0, len(entries) - TIMELINE_ENTRIES)
    entries = entries[hidden:]
    shown = await asyncio.to_thread(outputs, d, sid, entries)
    return page(request, "session.html", section="sessions", s=session_view(row),
                entries=[entry_context(sid, e, shown.get(e.key)) for e in entries],
                hidden=hidden, after=events[-1].seq if events else 0)


@bp.get("/sessions/<sid>/execs/<exec_id>/output")
async def exec_output(request: Request, sid: str, exec_id: str):
    """The output of one command as a text download (up to limits.max_file_bytes)."""
    d = daemon_of(request)
    await session_row(d, sid)
    row = await d.journal.exec(exec_id) if EXEC_ID.match(exec_id) else None
    if row is None or row["session_id"] != sid:
        raise ExecNotFound(f"unable to find exec {exec_id!r} in session {sid}")
    _, _, both, _ = await asyncio.to_thread(d.runtime.read_output, sid, exec_id, d.cfg.limits.max_file_bytes)
    return raw(both, content_type="text/plain; charset=utf-8",
               headers={"content-disposition": f'attachment; filename="{sid}-{exec_id}.log"'})


@bp.get("/sessions/<sid>/processes/<process_id>")
async def terminal_page(request: Request, sid: str, process_id: str):
    d = daemon_of(request)
    row = await session_row(d, sid)
    await process_row(d, sid, process_id)   # 404 for a process this session never had
    return page(request, "terminal.html", section="sessions", s=session_view(row), process_id=process_id,
                missing=assets.missing(), hint=assets.INSTALL_HINT)


@bp.get("/workspaces")
async def workspaces_page(request: Request):
    d = daemon_of(request)
    return page(request, "workspaces.html", section="workspaces", workspaces=await workspace_listing(d),
                enabled=d.cfg.workspace.enabled)
