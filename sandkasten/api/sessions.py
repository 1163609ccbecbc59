"""HTTP routes for sessions and execs (DESIGN.md §5): parse, call the service
(`sandkasten.service`: journal the intent, wait for the executor's keyed work), present."""

from __future__ import annotations

import asyncio
import base64
import json as jsonlib
from typing import TYPE_CHECKING

from sanic import Request, json

from sandkasten import intake
from sandkasten.api import blueprint, caller, daemon_of, params
from sandkasten.errors import ExecNotFound, InvalidRequest, SessionNotRunning
from sandkasten.service.sessions import require_running
from sandkasten.views import session_view

if TYPE_CHECKING:
    from sandkasten.daemon import Daemon

__all__ = ["json_body", "lost_exec", "oom_kills", "present_exec", "require_running", "session_row"]

bp = blueprint("sessions", url_prefix="/v1")


def present_exec(row: dict, daemon: Daemon, raw: bool = False, limit: int | None = None) -> dict:
    out = {
        "exec_id": row["id"], "session_id": row["session_id"], "cmd": row["cmd"], "status": row["status"],
        "exit_code": row["exit_code"], "cwd": row["cwd"], "duration_ms": row["duration_ms"],
        "timed_out": bool(row["timed_out"]), "truncated": bool(row["truncated"]),
        "requested_at": row["requested_at"], "finished_at": row["finished_at"],
        "stdout_bytes": row["stdout_bytes"], "stderr_bytes": row["stderr_bytes"],
        "output_sha256": row["output_sha256"], "lost_reason": row["lost_reason"],
    }
    if row["status"] == "finished":
        if row["stdout_bytes"] == 0 and row["stderr_bytes"] == 0:   # nothing was written: no log to read
            stdout = stderr = both = b""
            cut = False
        else:
            stdout, stderr, both, cut = daemon.runtime.read_output(
                row["session_id"], row["id"], limit or daemon.cfg.defaults.max_output_bytes)
        out["truncated"] = out["truncated"] or cut
        out["oom_kills"] = oom_kills(daemon, row)
        if raw:
            out.update(output_base64=base64.b64encode(both).decode(),
                       stdout_base64=base64.b64encode(stdout).decode(),
                       stderr_base64=base64.b64encode(stderr).decode())
        else:
            out.update(output=both.decode("utf-8", "replace"), stdout=stdout.decode("utf-8", "replace"),
                       stderr=stderr.decode("utf-8", "replace"))
    return out


def oom_kills(daemon: Daemon, row: dict) -> int:
    """Processes the OOM killer ended while a finished exec ran: in its `exec.finished` event when
    there were any, and in the runner's result next to its log (the read table has no column)."""
    if row.get("oom_kills") is not None:
        return row["oom_kills"]
    result = daemon.runtime.read_result(row["session_id"], row["id"])
    return result.oom_kills if result is not None else 0


async def session_row(daemon: Daemon, sid: str) -> dict:
    return await daemon.service.sessions.row(sid)


def json_body(request: Request):
    if not request.body:
        return None
    try:
        body = request.json
    except Exception:  # noqa: BLE001 - Sanic raises its own BadRequest; we want our error shape
        raise InvalidRequest("invalid JSON body") from None
    try:  # JSON may carry lone surrogates ("\udc80"): no command, path or name can hold one
        jsonlib.dumps(body, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise InvalidRequest("invalid JSON body: a string holds a lone surrogate, not valid Unicode") from None
    return body


@bp.post("/sessions")
async def create_session(request: Request):
    d = daemon_of(request)
    body = json_body(request)
    if isinstance(body, dict) and body.get("egress_allow"):   # host names to resolve: DNS off the event loop
        cmd = await asyncio.to_thread(intake.session_command, d.cfg, d.runtime.images, body)
    else:
        cmd = intake.session_command(d.cfg, d.runtime.images, body)
    return json(session_view(await d.service.sessions.create(cmd, caller(request))), status=201)


@bp.get("/sessions")
async def list_sessions(request: Request):
    d = daemon_of(request)
    everything = params.flag(request, "all")  # + ended and idle pool
    rows = await d.journal.sessions(include_ended=everything, include_pool=everything)
    return json([session_view(r) for r in rows])


@bp.get("/sessions/<sid>")
async def get_session(request: Request, sid: str):
    return json(session_view(await session_row(daemon_of(request), sid)))


@bp.delete("/sessions/<sid>")
async def delete_session(request: Request, sid: str):
    await daemon_of(request).service.sessions.destroy(sid, "api", caller(request))
    return json({"ok": True})


@bp.get("/sessions/<sid>/stats")
async def session_stats(request: Request, sid: str):
    d = daemon_of(request)
    row = await session_row(d, sid)
    if row["status"] != "running":
        raise SessionNotRunning(f"unable to read stats of session {sid}: it is {row['status']}")
    stats = await asyncio.to_thread(d.runtime.cgroups.stats, sid)
    return json({"memory_bytes": stats.memory_bytes, "memory_limit": stats.memory_limit,
                 "cpu_usage_usec": stats.cpu_usage_usec, "pids": stats.pids, "oom_kills": stats.oom_kills})


@bp.post("/sessions/<sid>/exec")
async def exec_command(request: Request, sid: str):
    d = daemon_of(request)
    sessions = d.service.sessions
    submitted = await sessions.submit_exec(sid, lambda: json_body(request), request.headers.get("idempotency-key"),
                                           caller(request))
    row, deferred = await sessions.settled_exec(sid, submitted, answering=True)
    body = submitted.body if isinstance(submitted.body, dict) else {}
    result = present_exec(row, d, raw=bool(body.get("raw_output")), limit=intake.output_limit(d.cfg, body))
    if row["status"] == "lost":
        raise await sessions.lost_exec(sid, row["id"], row["lost_reason"])
    response = json(result)
    if deferred:
        asyncio.get_running_loop().call_soon(d.journal.flush)   # exec.finished: once this answer is on its way
    return response


async def lost_exec(d: Daemon, sid: str, exec_id: str, reason: str | None):
    return await d.service.sessions.lost_exec(sid, exec_id, reason)


@bp.get("/sessions/<sid>/execs")
async def list_execs(request: Request, sid: str):
    d = daemon_of(request)
    await session_row(d, sid)
    rows = await d.journal.execs(sid)
    return json([_summary(r) for r in rows])


def _summary(row: dict) -> dict:
    keys = ("id", "cmd", "status", "exit_code", "cwd", "duration_ms", "timed_out", "requested_at",
            "finished_at", "output_sha256", "lost_reason")
    return {("exec_id" if k == "id" else k): row[k] for k in keys}


@bp.get("/sessions/<sid>/execs/<exec_id>")
async def get_exec(request: Request, sid: str, exec_id: str):
    d = daemon_of(request)
    await session_row(d, sid)
    row = await d.journal.exec(exec_id)
    if row is None or row["session_id"] != sid:
        raise ExecNotFound(f"unable to find exec {exec_id!r} in session {sid}")
    raw = params.flag(request, "raw_output")
    return json(present_exec(row, d, raw=raw))
