"""HTTP routes for sessions and execs (DESIGN.md §5). Handlers append intent to the journal,
then wait for the executor's keyed work; they never touch the kernel themselves."""

from __future__ import annotations

import asyncio
import base64
import json as jsonlib
from datetime import datetime, UTC

from sanic import Request, json

from sandkasten import intake

from sandkasten.control import admission
from sandkasten.api import blueprint, params
from sandkasten.domain import commands as c
from sandkasten.domain.session import UNCLAIMED, DuplicateIdempotencyKey, iso_utc
from sandkasten.errors import (
    ExecNotFound,
    IllegalTransition,
    InvalidRequest,
    NotReady,
    SandboxError,
    SandboxGone,
    SessionEnded,
    SessionNotFound,
    SessionNotRunning,
)
from sandkasten.runtime.spec import SESSION_ID, ExecRequest
from sandkasten.schema.vocabulary import SESSION_ENDED, SessionStatus
from sandkasten.views import session_view

bp = blueprint("sessions", url_prefix="/v1")


def present_exec(row: dict, daemon, raw: bool = False, limit: int | None = None) -> dict:
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


def oom_kills(daemon, row: dict) -> int:
    """Processes the OOM killer ended while a finished exec ran: in its `exec.finished` event when
    there were any, and in the runner's result next to its log (the read table has no column)."""
    if row.get("oom_kills") is not None:
        return row["oom_kills"]
    result = daemon.runtime.read_result(row["session_id"], row["id"])
    return result.oom_kills if result is not None else 0


async def session_row(daemon, sid: str) -> dict:
    row = await daemon.journal.session(sid) if SESSION_ID.match(sid) else None
    if row is None:
        raise SessionNotFound(f"unable to find session {sid!r}", session_id=sid)
    return row


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
    d = request.app.ctx.daemon
    body = json_body(request)
    if isinstance(body, dict) and body.get("egress_allow"):   # host names to resolve: DNS off the event loop
        cmd = await asyncio.to_thread(intake.session_command, d.cfg, d.runtime.images, body)
    else:
        cmd = intake.session_command(d.cfg, d.runtime.images, body)
    pool = getattr(d, "pool", None)
    sid = await pool.claim(cmd, request.ctx.actor, request.ctx.request_id) if pool is not None else None
    if sid is not None:  # a pre-warmed sandbox, already configured as asked ("pooled": true)
        return json(session_view(await session_row(d, sid)), status=201)
    # an id the spawner has a spare for creates faster (not in a cluster: the session may land
    # elsewhere; not bridged: a bridged sandbox never takes a spare, so not a spare's id either)
    spare = d.cluster is None and cmd.network_mode != "bridge"
    sid = (d.runtime.reserve_id() if spare else None) or intake.new_session_id()
    await admission.admitted(d.cfg, d.journal, sid, cmd, actor=request.ctx.actor, request_id=request.ctx.request_id)
    try:
        await settle(d, d.executor.ensure_session(sid), f"session {sid} is created once the daemon is back "
                     f"(GET /v1/sessions/{sid})")
    except (SandboxError, SandboxGone) as e:
        raise SandboxError(f"unable to create session {sid}: {e.message}", session_id=sid) from None
    return json(session_view(await session_row(d, sid)), status=201)


@bp.get("/sessions")
async def list_sessions(request: Request):
    d = request.app.ctx.daemon
    everything = params.flag(request, "all")  # + ended and idle pool
    rows = await d.journal.sessions(include_ended=everything, include_pool=everything)
    return json([session_view(r) for r in rows])


@bp.get("/sessions/<sid>")
async def get_session(request: Request, sid: str):
    return json(session_view(await session_row(request.app.ctx.daemon, sid)))


@bp.delete("/sessions/<sid>")
async def delete_session(request: Request, sid: str):
    d = request.app.ctx.daemon
    row = await session_row(d, sid)
    if row["status"] not in ("destroyed", "destroying"):
        try:
            await d.journal.execute(sid, c.RequestDestroy(reason="api"), actor=request.ctx.actor,
                                    request_id=request.ctx.request_id)
        except IllegalTransition:
            if (await session_row(d, sid))["status"] not in ("destroyed", "destroying"):
                raise
            # a concurrent DELETE got there first: deleting is idempotent, wait for the same end
    await settle(d, d.executor.ensure_destroyed(sid), f"session {sid} is destroyed once the daemon is back")
    return json({"ok": True})


@bp.get("/sessions/<sid>/stats")
async def session_stats(request: Request, sid: str):
    d = request.app.ctx.daemon
    row = await session_row(d, sid)
    if row["status"] != "running":
        raise SessionNotRunning(f"unable to read stats of session {sid}: it is {row['status']}")
    stats = await asyncio.to_thread(d.runtime.cgroups.stats, sid)
    return json({"memory_bytes": stats.memory_bytes, "memory_limit": stats.memory_limit,
                 "cpu_usage_usec": stats.cpu_usage_usec, "pids": stats.pids, "oom_kills": stats.oom_kills})


def _reason(session: dict) -> str:
    return f" (reason: {session['end_reason']})" if session.get("end_reason") else ""


def require_running(row: dict, verb: str) -> None:
    status = row["status"]
    if status in SESSION_ENDED or status == SessionStatus.DESTROYING:
        raise SessionEnded(f"unable to {verb} in session {row['id']}: the session is {status}{_reason(row)}",
                           status=status, reason=row.get("end_reason"))
    if status == SessionStatus.LOST:
        raise SandboxGone(f"unable to {verb} in session {row['id']}: its sandbox was lost "
                          f"({row['lost_reason']})", status=status)
    if status != "running":
        raise SessionNotRunning(f"unable to {verb} in session {row['id']}: the session is {status}",
                                status=status)
    # the reconciler journals it within a second
    if row.get("expires_at") and row["expires_at"] <= iso_utc(datetime.now(UTC)):
        raise SessionEnded(f"unable to {verb} in session {row['id']}: the session expired at {row['expires_at']} "
                           f"(reason: ttl)", status="expired", reason="ttl")
    if row["pool"] in UNCLAIMED:
        raise SessionNotRunning(f"unable to {verb} in session {row['id']}: it is an unclaimed pool session",
                                pool=row["pool"])


@bp.post("/sessions/<sid>/exec")
async def exec_command(request: Request, sid: str):
    d = request.app.ctx.daemon
    exec_id, body, requested = await submit_exec(request, sid)
    if requested is None:  # an earlier request with this Idempotency-Key: its recorded result
        return await _await_exec(d, sid, exec_id, body)
    req = ExecRequest(exec_id=exec_id, cmd=requested.payload["cmd"], timeout_ms=requested.payload["timeout_ms"])
    try:
        finished = await executed(d, sid, exec_id, req, answering=True)
    except SandboxGone:
        finished = None  # journaled as exec.lost; the row says so
    if finished is None:
        return await _await_exec(d, sid, exec_id, body)
    row = {**finished.payload, "id": exec_id, "session_id": sid, "cmd": req.cmd, "status": "finished",
           "requested_at": requested.created_at, "finished_at": finished.created_at, "lost_reason": None}
    response = json(present_exec(row, d, raw=bool(body.get("raw_output")), limit=intake.output_limit(d.cfg, body)))
    asyncio.get_running_loop().call_soon(d.journal.flush)   # exec.finished: once this answer is on its way
    return response


async def submit_exec(request: Request, sid: str):
    """Validate and journal an exec request; (exec_id, body, the exec.requested event).
    A retry with a known Idempotency-Key journals nothing: (its exec_id, body, None); a key
    reused for a different command is refused (409), never answered with the other's result.
    Nothing is read first: `decide` checks the session (and the key) on the journal's state;
    only a refusal reads the rows, to answer precisely as `_refusal` says."""
    d = request.app.ctx.daemon
    key = request.headers.get("idempotency-key")
    try:
        body = json_body(request)
        cmd = intake.exec_command(d.cfg, body, key)
    except InvalidRequest:
        await _refusal(d, sid, key)
        raise
    if not SESSION_ID.match(sid):
        await session_row(d, sid)
    try:
        events = await d.journal.execute(sid, cmd, actor=request.ctx.actor, request_id=request.ctx.request_id)
    except DuplicateIdempotencyKey as e:  # an earlier request with this key, or a concurrent retry
        _check_retry(await d.journal.exec(e.exec_id), cmd, body)
        return e.exec_id, body, None
    except (IllegalTransition, SessionNotFound):
        prior = await _refusal(d, sid, key)
        if prior is None:
            raise
        _check_retry(prior, cmd, body)
        return prior["id"], body, None
    return cmd.exec_id, body, events[0]


async def _refusal(d, sid: str, key: str | None) -> dict | None:
    """What a refused exec request is answered with, in this order: no such session (404), an
    earlier exec with this Idempotency-Key (returned: its result is the answer), the session
    not running (409/410). None when none of these applies (the caller's error stands)."""
    row = await session_row(d, sid)
    if key is not None and intake.TOKEN.match(key):
        prior = await d.journal.exec_by_idempotency_key(sid, key)
        if prior is not None:
            return prior
    require_running(row, "exec")
    return None


def _check_retry(prior: dict | None, cmd: c.RequestExec, body: dict) -> None:
    """A retry must repeat the request it retries: the same cmd (and timeout_ms, if it names one)."""
    if prior is None:
        return
    differs = [name for name, given in (("cmd", cmd.cmd), ("timeout_ms", body.get("timeout_ms")))
               if given is not None and getattr(cmd, name) != prior[name]]
    if differs:
        raise DuplicateIdempotencyKey(
            f"unable to exec: Idempotency-Key {cmd.idempotency_key!r} was already used in this session for "
            f"exec {prior['id']} with a different {' and '.join(differs)} (use a new key for a new command)",
            exec_id=prior["id"], fields=differs)


async def settle(d, task: asyncio.Future, on_stop: str):
    """Await an executor task without owning it: a client that goes away cancels only its
    handler, never the work. A stop of the daemon cancels the task (the sandbox and its command
    carry on; the next daemon finishes the job from the journal): a 503 saying `on_stop`."""
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if d.stopping and not (current is not None and current.cancelling()):
            raise NotReady(f"the daemon is stopping: {on_stop}") from None
        raise


async def executed(d, sid: str, exec_id: str, req: ExecRequest | None = None, answering: bool = False):
    return await settle(d, d.executor.ensure_exec(sid, exec_id, req, answering),
                        f"exec {exec_id} runs on in its sandbox; repeat the request with the same Idempotency-Key "
                        f"or GET /v1/sessions/{sid}/execs/{exec_id} for its result once the daemon is back")


async def _await_exec(d, sid: str, exec_id: str, body) -> object:
    try:
        await executed(d, sid, exec_id)
    except SandboxGone:
        pass  # journaled as exec.lost; the row below says so
    await d.journal.written()   # its end may be deferred behind another request's answer
    row = await d.journal.exec(exec_id)
    body = body if isinstance(body, dict) else {}
    result = present_exec(row, d, raw=bool(body.get("raw_output")), limit=intake.output_limit(d.cfg, body))
    if row["status"] == "lost":
        raise await lost_exec(d, sid, exec_id, row["lost_reason"])
    return json(result)


async def lost_exec(d, sid: str, exec_id: str, reason: str | None) -> SessionEnded | SandboxGone:
    """The error for an exec that did not finish: 410 SESSION_ENDED when its session was
    destroyed meanwhile (a DELETE, a TTL, a deleted workspace), else 410 SANDBOX_LOST."""
    session = await d.journal.session(sid)
    if session is not None and session["status"] in ("destroying", "destroyed"):
        return SessionEnded(f"exec {exec_id} did not finish: session {sid} was destroyed while it ran"
                            f"{_reason(session)}",
                            exec_id=exec_id, status=session["status"])
    return SandboxGone(f"exec {exec_id} in session {sid} was lost: {reason}", exec_id=exec_id)


@bp.get("/sessions/<sid>/execs")
async def list_execs(request: Request, sid: str):
    d = request.app.ctx.daemon
    await session_row(d, sid)
    rows = await d.journal.execs(sid)
    return json([_summary(r) for r in rows])


def _summary(row: dict) -> dict:
    keys = ("id", "cmd", "status", "exit_code", "cwd", "duration_ms", "timed_out", "requested_at",
            "finished_at", "output_sha256", "lost_reason")
    return {("exec_id" if k == "id" else k): row[k] for k in keys}


@bp.get("/sessions/<sid>/execs/<exec_id>")
async def get_exec(request: Request, sid: str, exec_id: str):
    d = request.app.ctx.daemon
    await session_row(d, sid)
    row = await d.journal.exec(exec_id)
    if row is None or row["session_id"] != sid:
        raise ExecNotFound(f"unable to find exec {exec_id!r} in session {sid}")
    raw = params.flag(request, "raw_output")
    return json(present_exec(row, d, raw=raw))
