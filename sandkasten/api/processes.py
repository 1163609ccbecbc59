"""HTTP routes for processes beside the shell: start, list, feed, resize, signal, kill, watch.

Handlers journal the intent first (`process.requested`, `process.input`), then reach the
runner through `ProcessControl`; they never touch the kernel themselves. Output is the
runner's log of the process, sent as SSE (`…/stream`, the same frames as exec streams, resumable
with Last-Event-ID, also across a daemon restart) or read by offset (`…/output`).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from dataclasses import replace
from typing import TYPE_CHECKING

from sanic import Request, json

from sandkasten import intake

from sandkasten.files import exec_feed
from sandkasten.api import blueprint, daemon_of, params
from sandkasten.api.sessions import json_body, require_running, session_row
from sandkasten.api.stream import event, resume_cursor, send_feed
from sandkasten.domain import commands as c
from sandkasten.domain.session import DuplicateIdempotencyKey
from sandkasten.errors import (IllegalTransition, InvalidRequest, ProcessExited, ProcessNotFound, SandboxError,
                               SandboxGone, SandkastenError, SessionEnded, SessionNotFound)
from sandkasten.runtime.spec import EXEC_ID
from sandkasten.schema.vocabulary import PROCESS_ENDED as ENDED
from sandkasten.service.waiting import settle
from sandkasten.views import process_view

if TYPE_CHECKING:
    from sandkasten.daemon import Daemon

bp = blueprint("processes", url_prefix="/v1")
OUTPUT_DEFAULT_BYTES = 64 * 1024
KILL_WAIT_S = 5.0


async def process_row(d: Daemon, sid: str, process_id: str) -> dict:
    await session_row(d, sid)
    row = await d.journal.process(process_id) if EXEC_ID.match(process_id) else None
    if row is None or row["session_id"] != sid:
        raise ProcessNotFound(f"unable to find process {process_id!r} in session {sid}", process_id=process_id)
    return row


async def _live(d: Daemon, sid: str, process_id: str) -> dict | None:
    """The runner's record of a running process (byte counts so far); None if unreachable."""
    try:
        return await d.runtime.aprocess(sid, {"op": "proc_status", "id": process_id}, timeout=2)
    except (SandkastenError, OSError, ValueError):
        return None


@bp.post("/sessions/<sid>/processes")
async def start_process(request: Request, sid: str):
    d = daemon_of(request)
    row = await session_row(d, sid)
    body = json_body(request)
    key = request.headers.get("idempotency-key")
    if key is not None:
        prior = await d.journal.process_by_idempotency_key(sid, key)
        if prior is not None:
            return json(process_view(_same_request(prior, intake.process_command(d.cfg, body, key))), status=201)
    require_running(row, "start a process")
    cmd = intake.process_command(d.cfg, body, key)
    try:
        await d.journal.execute(sid, cmd, actor=request.ctx.actor, request_id=request.ctx.request_id)
    except DuplicateIdempotencyKey as e:   # a concurrent retry with the same key won the race
        return json(process_view(_same_request(await _journaled(d, sid, e.exec_id), cmd)), status=201)
    try:
        await settle(lambda: d.stopping, d.processes.ensure_started(sid, cmd.process_id),
                     f"process {cmd.process_id} is started once the daemon is back "
                     f"(GET /v1/sessions/{sid}/processes/{cmd.process_id})")
    except (SandboxGone, SandboxError):
        pass   # journaled as process.lost; the row says why
    row = await _journaled(d, sid, cmd.process_id)
    if row["status"] == "lost":
        raise SandboxGone(f"unable to start process {cmd.process_id} in session {sid}: {row['lost_reason']}",
                          process_id=cmd.process_id)
    return json(process_view(row), status=201)


async def _journaled(d: Daemon, sid: str, process_id: str) -> dict:
    row = await d.journal.process(process_id)
    if row is None:   # (it was journaled: only a rebuilt journal could lose it)
        raise ProcessNotFound(f"unable to find process {process_id!r} in session {sid}", process_id=process_id)
    return row


def _same_request(prior: dict, cmd: c.RequestProcess) -> dict:
    if prior["cmd"] != cmd.cmd:
        raise DuplicateIdempotencyKey(
            f"unable to start process: Idempotency-Key {cmd.idempotency_key!r} was already used in this session "
            f"for process {prior['id']} with a different cmd (use a new key for a new process)",
            exec_id=prior["id"], fields=["cmd"])
    return prior


@bp.get("/sessions/<sid>/processes")
async def list_processes(request: Request, sid: str):
    d = daemon_of(request)
    session = await session_row(d, sid)
    rows = await d.journal.processes(sid, include_ended=params.flag(request, "all"))
    live: dict[str, dict] = {}
    if session["status"] == "running" and any(r["status"] == "running" for r in rows):
        try:
            reply = await d.runtime.aprocess(sid, {"op": "proc_list"}, timeout=2)
            live = {p["id"]: p for p in reply.get("processes", [])}
        except (SandkastenError, OSError, ValueError):
            pass
    return json([process_view(r, live.get(r["id"])) for r in rows])


@bp.get("/sessions/<sid>/processes/<process_id>")
async def get_process(request: Request, sid: str, process_id: str):
    d = daemon_of(request)
    row = await process_row(d, sid, process_id)
    live = await _live(d, sid, process_id) if row["status"] == "running" else None
    return json(process_view(row, live))


async def _running(d: Daemon, sid: str, process_id: str, verb: str) -> dict:
    """The process row, if the process can take input: its session runs and it has not ended."""
    require_running(await session_row(d, sid), verb)
    row = await process_row(d, sid, process_id)
    if row["status"] in ENDED:
        how = f"exited with {_ending(row)}" if row["status"] == "exited" else f"was lost ({row['lost_reason']})"
        raise ProcessExited(f"unable to {verb}: process {process_id} {how}", process_id=process_id,
                            status=row["status"], exit_code=row["exit_code"])
    if row["status"] != "running":
        await settle(lambda: d.stopping, d.processes.ensure_started(sid, process_id),
                     f"process {process_id} starts once the daemon is back")
        row = await process_row(d, sid, process_id)
        if row["status"] != "running":
            raise ProcessExited(f"unable to {verb}: process {process_id} is {row['status']}", process_id=process_id)
    return row


def _ending(row: dict) -> str:
    return f"signal {row['signal']}" if row["signal"] else f"exit code {row['exit_code']}"


async def _journal_input(request: Request, sid: str, process_id: str, verb: str, *commands: c.RecordProcessInput):
    """Journal input to a process. `decide` checks that the session runs and the process has not
    ended, on the journal's cached state: no read on a keystroke's way. Only a refusal reads the
    rows, to say precisely why (no such session, session ended, process exited with …)."""
    d = daemon_of(request)

    async def append():
        return await d.journal.execute_all(sid, list(commands), actor=request.ctx.actor,
                                           request_id=request.ctx.request_id)
    try:
        return await append()
    except DuplicateIdempotencyKey:
        raise
    except (IllegalTransition, SessionNotFound):
        await _running(d, sid, process_id, verb)   # raises the precise error ...
        return await append()                      # ... or the process has started meanwhile


@bp.post("/sessions/<sid>/processes/<process_id>/stdin")
async def write_stdin(request: Request, sid: str, process_id: str):
    d = daemon_of(request)
    data, eof = intake.stdin_data(json_body(request))
    key = request.headers.get("idempotency-key")
    if key is not None and not intake.TOKEN.match(key):
        raise InvalidRequest("invalid Idempotency-Key: expected 1-200 printable ASCII characters")
    inputs = []
    if data:
        recorded = base64.b64encode(data).decode() if d.cfg.audit.record_input else None
        inputs.append(c.RecordProcessInput(process_id=process_id, kind="stdin", size=len(data),
                                           sha256=hashlib.sha256(data).hexdigest(), data_base64=recorded,
                                           idempotency_key=key))
    if eof:
        inputs.append(c.RecordProcessInput(process_id=process_id, kind="eof",
                                           idempotency_key=None if data else key))
    try:
        events = await _journal_input(request, sid, process_id, "write to stdin", *inputs)
    except DuplicateIdempotencyKey:   # a retry of input already journaled: make sure it arrived, once
        await d.processes.deliver_pending(sid, process_id)
        return json({"ok": True, "bytes": len(data), "duplicate": True})
    if not d.cfg.audit.record_input:   # the journal has no bytes to send: hand over these ones
        events = [replace(e, payload={**e.payload, "data_base64": base64.b64encode(data).decode()})
                  if e.payload["kind"] == "stdin" else e for e in events]
    await d.processes.deliver(sid, process_id, events)
    return json({"ok": True, "bytes": len(data)})


@bp.post("/sessions/<sid>/processes/<process_id>/resize")
async def resize(request: Request, sid: str, process_id: str):
    d = daemon_of(request)
    rows, cols = intake.resize_request(json_body(request))
    await _journal_input(request, sid, process_id, "resize",
                         c.RecordProcessInput(process_id=process_id, kind="resize", rows=rows, cols=cols))
    await d.processes.send(sid, process_id, {"op": "proc_resize", "rows": rows, "cols": cols})
    return json({"ok": True, "rows": rows, "cols": cols})


@bp.post("/sessions/<sid>/processes/<process_id>/signal")
async def send_signal(request: Request, sid: str, process_id: str):
    d = daemon_of(request)
    number, name = intake.signal_number(json_body(request))
    await _journal_input(request, sid, process_id, f"send {name}",
                         c.RecordProcessInput(process_id=process_id, kind="signal", signal=name))
    await d.processes.send(sid, process_id, {"op": "proc_signal", "signal": number})
    return json({"ok": True, "signal": name})


@bp.delete("/sessions/<sid>/processes/<process_id>")
async def kill_process(request: Request, sid: str, process_id: str):
    """SIGKILL to its process group; waits (briefly) for the exit to be journaled. Killing a
    process that has ended already is fine: the answer is its final state."""
    d = daemon_of(request)
    row = await process_row(d, sid, process_id)
    if row["status"] not in ENDED:
        try:
            await _journal_input(request, sid, process_id, "kill",
                                 c.RecordProcessInput(process_id=process_id, kind="signal", signal="SIGKILL"))
            await d.processes.send(sid, process_id, {"op": "proc_signal", "signal": 9})
            watched = d.processes.ensure_watched(sid, process_id)
            await asyncio.wait_for(settle(lambda: d.stopping, watched, "the process was killed; its exit is "
                                          "journaled once the daemon is back"), KILL_WAIT_S)
        except (TimeoutError, ProcessExited, SessionEnded, SandboxGone):
            pass   # it ended meanwhile, or the session did: the row says how
        row = await process_row(d, sid, process_id)
    return json({"ok": True, "process": process_view(row)})


@bp.get("/sessions/<sid>/processes/<process_id>/stream")
async def stream_process(request: Request, sid: str, process_id: str):
    d = daemon_of(request)
    await process_row(d, sid, process_id)
    cursor = resume_cursor(request)

    async def settled() -> bool:
        row = await d.journal.process(process_id)
        return row is None or row["status"] in ENDED

    async def outcome(offset: int) -> str:
        row = await d.journal.process(process_id)
        final = exec_feed.Cursor(offset)
        if row is not None and row["status"] == "exited":
            return event("done", {"process_id": process_id, "exit_code": row["exit_code"], "signal": row["signal"],
                                  "timed_out": bool(row["timed_out"]), "duration_ms": row["duration_ms"],
                                  "dropped_bytes": row["dropped_bytes"] or 0}, final.format("-done"))
        reason = row["lost_reason"] if row is not None else "its journal row is gone"
        return event("error", {"error_code": SandboxGone.code, "process_id": process_id,
                               "message": f"process {process_id} in session {sid} was lost: {reason}"},
                     final.format("-error"))

    await send_feed(request, d.runtime.paths(sid).logs / f"{process_id}.log", cursor,
                    params.flag(request, "raw_output"), settled, outcome, {"x-process-id": process_id},
                    {"process_id": process_id, "session_id": sid}, f"process {process_id}", process_id)


@bp.get("/sessions/<sid>/processes/<process_id>/output")
async def process_output(request: Request, sid: str, process_id: str):
    """Output by offset, for clients that poll: whole frames from `offset` (a `next_offset` this
    route gave, or 0) up to about `max_bytes` of output."""
    d = daemon_of(request)
    row = await process_row(d, sid, process_id)
    offset = params.count(request, "offset") or 0
    limit = params.count(request, "max_bytes") or OUTPUT_DEFAULT_BYTES
    if limit > d.cfg.limits.max_file_bytes:
        raise InvalidRequest(f"invalid max_bytes {limit}: the maximum is {d.cfg.limits.max_file_bytes}")
    path = d.runtime.paths(sid).logs / f"{process_id}.log"
    try:
        exec_feed.check_offset(path, offset)
        chunk = await asyncio.to_thread(_read_output, path, offset, max(limit, 1))
    except exec_feed.FeedError as e:
        raise InvalidRequest(f"unable to read output of process {process_id}: {e}") from None
    start, frames, end = chunk
    data = b"".join(f.data for f in frames)
    ended = row["status"] in ENDED
    return json({"process_id": process_id, "offset": start, "next_offset": end,
                 "dropped": start > offset, "output": data.decode("utf-8", "replace"),
                 "output_base64": base64.b64encode(data).decode(), "status": row["status"],
                 "exit_code": row["exit_code"], "signal": row["signal"],
                 "eof": ended and end >= _size(path)})


def _size(path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _read_output(path, offset: int, limit: int) -> tuple[int, list[exec_feed.Frame], int]:
    """(where reading began — past a dropped part, if any —, whole frames, the offset after them)."""
    try:
        with open(path, "rb") as f:
            head = f.read(1) if f.seek(offset) == offset else b""
    except FileNotFoundError:
        return offset, [], offset
    if head == b"\0":
        offset = exec_feed.data_start(path, offset) or offset
    with open(path, "rb") as f:
        f.seek(offset)
        buf = f.read(limit + exec_feed.FRAME.size + 65536)
    frames, _ = exec_feed.parse_frames(buf, offset)
    taken: list[exec_feed.Frame] = []
    total = 0
    for frame in frames:
        if taken and total + len(frame.data) > limit:
            break
        taken.append(frame)
        total += len(frame.data)
    return offset, taken, taken[-1].offset if taken else offset
