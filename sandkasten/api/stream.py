"""Exec output as Server-Sent Events (DESIGN.md §5): run a command and watch it, or re-attach.

Who runs this: the daemon's event loop, one handler per connected client. The handler never
owns the command: the executor's keyed task runs it (started here, or by anyone else), the
runner writes its output to the exec log, and the handler only tails that file
(`exec_feed.follow`) until the journal says the exec is settled. A client that goes away cancels
only its handler; the command, its log and its journal rows carry on, so a reconnect — even to a
restarted daemon — resumes from the event id it last saw.

Events: `started` {exec_id, session_id}, `chunk` {chunk, stream, timestamp[, chunk_base64]},
then `done` {exit_code, cwd, duration_ms, timed_out, truncated} or `error` {error_code, message}.
Every id is an `exec_feed.Cursor`: the log offset after the frame (+ any half-sent character).
"""

from __future__ import annotations

import asyncio
import base64
import json as jsonlib
import logging
from typing import TYPE_CHECKING

from sanic import Request

from sandkasten.files import exec_feed
from sandkasten.api import blueprint, caller, daemon_of, params
from sandkasten.api.sessions import json_body, lost_exec, oom_kills, session_row
from sandkasten.errors import ExecNotFound, InvalidRequest, SandboxError, SandkastenError
from sandkasten.files.exec_feed import Cursor, FeedError, TextDecoder
from sandkasten.runtime.spec import EXEC_ID
from sandkasten.schema.vocabulary import EXEC_ENDED

if TYPE_CHECKING:
    from sandkasten.daemon import Daemon

bp = blueprint("stream", url_prefix="/v1")
log = logging.getLogger("sandkasten.api.stream")
HEARTBEAT_S = 10.0


class _Stopping(Exception):
    """The daemon began to stop while a stream was open."""


def resume_cursor(request: Request) -> Cursor:
    text = request.headers.get("last-event-id") or request.args.get("last_event_id")
    try:
        return Cursor.parse(text)
    except FeedError as e:
        raise InvalidRequest(str(e)) from None


@bp.post("/sessions/<sid>/exec/stream")
async def exec_stream(request: Request, sid: str):
    sessions = daemon_of(request).service.sessions
    cursor = resume_cursor(request)
    submitted = await sessions.submit_exec(sid, lambda: json_body(request), request.headers.get("idempotency-key"),
                                           caller(request))
    if submitted.requested is not None:
        cursor = Cursor()   # a Last-Event-ID cannot name a point in an exec that did not exist: send it all
    sessions.begin_exec(sid, submitted)   # not awaited: the command must outlive this connection
    body = submitted.body if isinstance(submitted.body, dict) else {}
    await _stream(request, sid, submitted.exec_id, cursor, raw=bool(body.get("raw_output")))


@bp.get("/sessions/<sid>/execs/<exec_id>/stream")
async def exec_restream(request: Request, sid: str, exec_id: str):
    d = daemon_of(request)
    await session_row(d, sid)
    row = await d.journal.exec(exec_id) if EXEC_ID.match(exec_id) else None
    if row is None or row["session_id"] != sid:
        raise ExecNotFound(f"unable to find exec {exec_id!r} in session {sid}")
    await _stream(request, sid, exec_id, resume_cursor(request), raw=params.flag(request, "raw_output"))


# JSON leaves these raw with ensure_ascii=False; clients that split lines like str.splitlines
# (httpx's iter_lines does) would cut an event at them, so they travel escaped.
_LINE_BREAKERS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def event(kind: str, data: dict, event_id: str) -> str:
    payload = jsonlib.dumps(data, ensure_ascii=False).translate(_LINE_BREAKERS)
    return f"event: {kind}\nid: {event_id}\ndata: {payload}\n\n"


async def _stream(request: Request, sid: str, exec_id: str, cursor: Cursor, raw: bool) -> None:
    d = daemon_of(request)

    async def settled() -> bool:
        row = await d.journal.exec(exec_id)
        return row is None or row["status"] in EXEC_ENDED

    await send_feed(request, d.runtime.paths(sid).logs / f"{exec_id}.log", cursor, raw, settled,
                    lambda offset: _outcome(d, sid, exec_id, offset),
                    {"x-exec-id": exec_id}, {"exec_id": exec_id, "session_id": sid}, f"exec {exec_id}", exec_id)


async def send_feed(request: Request, path, cursor: Cursor, raw: bool, settled, outcome, headers: dict,
                    started: dict, what: str, key: str | None = None) -> None:
    """Send a framed output log as SSE until `settled()` and everything before it was sent,
    then `await outcome(offset)` (the final event). Shared by exec and process streams; `key`
    (the exec or process id) subscribes to its end being committed (`endings`)."""
    d = daemon_of(request)
    try:
        exec_feed.check_offset(path, cursor.offset)
    except FeedError as e:
        raise InvalidRequest(f"unable to resume {what}: {e}") from None
    endings = getattr(d, "endings", None)
    wake = asyncio.Event() if endings is not None and key is not None else None

    async def done() -> bool:
        if d.stopping:   # end without a final event: the client resumes from its last id
            raise _Stopping
        return await settled()

    if wake is not None and endings is not None:
        endings.subscribe(key, wake)
    try:
        await _send_frames(request, d, path, cursor, raw, done, outcome, headers, started, what, wake)
    finally:
        if wake is not None and endings is not None:
            endings.unsubscribe(key, wake)


async def _send_frames(request: Request, d: Daemon, path, cursor: Cursor, raw: bool, done, outcome, headers: dict,
                       started: dict, what: str, wake) -> None:
    response = await request.respond(content_type="text/event-stream; charset=utf-8", headers={
        "cache-control": "no-cache", "x-accel-buffering": "no", **headers})
    await response.send(event("started", started, cursor.format()))
    text = TextDecoder(cursor)
    offset, ts = cursor.offset, None
    try:
        async for frame in exec_feed.follow(path, cursor.offset, done, heartbeat_s=HEARTBEAT_S,
                                            watch=getattr(d, "log_watch", None), wake=wake):
            if frame is None:
                await response.send(": keepalive\n\n")
                continue
            if isinstance(frame, exec_feed.Gap):   # the oldest output was dropped (bounded log)
                offset, text = frame.offset, TextDecoder(Cursor(frame.offset))
                await response.send(event("dropped", {"from_offset": frame.skipped_from, "to_offset": frame.offset},
                                          text.cursor(offset).format()))
                continue
            offset, ts = frame.offset, frame.ts
            data = {"chunk": text.decode(frame), "stream": frame.stream, "timestamp": frame.ts}
            if raw:
                data["chunk_base64"] = base64.b64encode(frame.data).decode()
            await response.send(event("chunk", data, text.cursor(offset).format()))
        for stream, rest in text.flush():   # output ended inside a character
            data = {"chunk": rest, "stream": stream, "timestamp": ts}
            if raw:
                data["chunk_base64"] = ""
            await response.send(event("chunk", data, text.cursor(offset).format()))
        await response.send(await outcome(offset))
    except _Stopping:
        pass
    except (SandkastenError, FeedError, OSError) as e:
        code = e.code if isinstance(e, SandkastenError) else SandboxError.code
        message = e.message if isinstance(e, SandkastenError) else f"unable to read the log of {what}: {e}"
        log.warning("stream of %s: %s", what, message)
        await response.send(event("error", {"error_code": code, "message": message, **started},
                                  text.cursor(offset).format("-error")))
    await response.eof()


async def _outcome(d: Daemon, sid: str, exec_id: str, offset: int) -> str:
    row = await d.journal.exec(exec_id)
    final = Cursor(offset)
    if row is not None and row["status"] == "finished":
        return event("done", {
            "exec_id": exec_id, "exit_code": row["exit_code"], "cwd": row["cwd"],
            "duration_ms": row["duration_ms"], "timed_out": bool(row["timed_out"]),
            "truncated": bool(row["truncated"]), "oom_kills": oom_kills(d, row)}, final.format("-done"))
    error = await lost_exec(d, sid, exec_id, row["lost_reason"] if row is not None else "its journal row is gone")
    return event("error", {"error_code": error.code, "exec_id": exec_id, "message": error.message},
                 final.format("-error"))
