"""Sessions and execs: journal the intent, have it done, wait (DESIGN.md §2, §5).

Who runs this: the HTTP handlers (`sandkasten.api`) and the CLI (`sandkasten create/exec/rm`),
each with its own `Waiter` (the executor's tasks in the daemon, polling the journal in the
CLI). Validation is `sandkasten.intake`'s; presenting a result is the caller's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from sandkasten import intake
from sandkasten.config import Config
from sandkasten.control import admission
from sandkasten.domain import commands as c
from sandkasten.domain.events import RecordedEvent
from sandkasten.domain.session import UNCLAIMED, DuplicateIdempotencyKey, iso_utc
from sandkasten.errors import (
    IllegalTransition,
    InvalidRequest,
    SandboxError,
    SandboxGone,
    SessionEnded,
    SessionNotFound,
    SessionNotRunning,
)
from sandkasten.runtime.spec import SESSION_ID, ExecRequest
from sandkasten.schema.vocabulary import SESSION_ENDED, SessionStatus
from sandkasten.service.waiting import Waiter
from sandkasten.store.journal import Journal

GOING = (SessionStatus.DESTROYED, SessionStatus.DESTROYING)


@dataclass(frozen=True)
class Caller:
    """Who asks (journaled as each event's actor) and the request's id, if it has one."""

    actor: str
    request_id: str | None = None


class Claims(Protocol):
    """The pre-warmed pool: a running sandbox configured as asked, or None."""

    async def claim(self, cmd: c.RequestSession, actor: str, request_id: str | None) -> str | None: ...


@dataclass(frozen=True)
class Submitted:
    """An exec request as journaled: its id, the request body, and its `exec.requested` event
    (None for a retry with a known Idempotency-Key: nothing new was journaled)."""

    exec_id: str
    body: Any
    requested: RecordedEvent | None

    @property
    def request(self) -> ExecRequest | None:
        if self.requested is None:
            return None
        p = self.requested.payload
        return ExecRequest(exec_id=self.exec_id, cmd=p["cmd"], timeout_ms=p["timeout_ms"])


class Sessions:
    def __init__(self, cfg: Config, journal: Journal, waiter: Waiter, *, pool: Claims | None = None,
                 reserve_id: Callable[[c.RequestSession], str | None] | None = None):
        self.cfg = cfg
        self.journal = journal
        self.waiter = waiter
        self.pool = pool
        self.reserve_id = reserve_id

    async def row(self, sid: str, verb: str | None = None) -> dict:
        """The session's row; SessionNotFound (404) when there is none."""
        row = await self.journal.session(sid) if SESSION_ID.match(sid) else None
        if row is None:
            message = f"unable to find session {sid!r}" if verb is None else \
                f"unable to {verb} session {sid!r}: no such session"
            raise SessionNotFound(message, session_id=sid)
        return row

    # -- create ----------------------------------------------------------------------------

    async def create(self, cmd: c.RequestSession, caller: Caller) -> dict:
        """A session as asked: a pool member claimed, or a new one admitted, journaled and
        waited for. Its row (still "requested" when nobody is there to start it)."""
        sid = await self.pool.claim(cmd, caller.actor, caller.request_id) if self.pool is not None else None
        if sid is not None:   # a pre-warmed sandbox, already configured as asked ("pooled": true)
            return await self.row(sid)
        sid = (self.reserve_id(cmd) if self.reserve_id is not None else None) or intake.new_session_id()
        await admission.admitted(self.cfg, self.journal, sid, cmd, actor=caller.actor, request_id=caller.request_id)
        try:
            await self.waiter.created(sid, fresh=True)
        except (SandboxError, SandboxGone) as e:
            raise SandboxError(f"unable to create session {sid}: {e.message}", session_id=sid) from None
        return await self.row(sid)

    # -- destroy ---------------------------------------------------------------------------

    async def request_destroy(self, sid: str, reason: str, caller: Caller, verb: str | None = None) -> None:
        """Journal the destroy unless it is destroyed or being destroyed already (idempotent)."""
        row = await self.row(sid, verb)
        if row["status"] in GOING:
            return
        try:
            await self.journal.execute(sid, c.RequestDestroy(reason=reason), actor=caller.actor,
                                       request_id=caller.request_id)
        except IllegalTransition:
            if (await self.row(sid, verb))["status"] not in GOING:
                raise
            # a concurrent destroy got there first: wait for the same end

    async def destroy(self, sid: str, reason: str, caller: Caller) -> None:
        await self.request_destroy(sid, reason, caller)
        await self.waiter.destroyed(sid)

    # -- exec ------------------------------------------------------------------------------

    async def submit_exec(self, sid: str, body: Callable[[], Any], key: str | None, caller: Caller) -> Submitted:
        """Validate (`body()` gives the request body) and journal an exec request. A retry with a
        known Idempotency-Key journals nothing; a key reused for a different command is refused
        (409), never answered with the other's result. Nothing is read first: `decide` checks the
        session (and the key) on the journal's state; only a refusal reads the rows, to answer
        precisely as `refusal` says."""
        try:
            given = body()
            cmd = intake.exec_command(self.cfg, given, key)
        except InvalidRequest:
            await self.refusal(sid, key)
            raise
        if not SESSION_ID.match(sid):
            await self.row(sid)
        try:
            events = await self.journal.execute(sid, cmd, actor=caller.actor, request_id=caller.request_id)
        except DuplicateIdempotencyKey as e:  # an earlier request with this key, or a concurrent retry
            check_retry(await self.journal.exec(e.exec_id), cmd, given)
            return Submitted(e.exec_id, given, None)
        except (IllegalTransition, SessionNotFound):
            prior = await self.refusal(sid, key)
            if prior is None:
                raise
            check_retry(prior, cmd, given)
            return Submitted(prior["id"], given, None)
        return Submitted(cmd.exec_id, given, events[0])

    async def refusal(self, sid: str, key: str | None) -> dict | None:
        """What a refused exec request is answered with, in this order: no such session (404), an
        earlier exec with this Idempotency-Key (returned: its result is the answer), the session
        not running (409/410). None when none of these applies (the caller's error stands)."""
        row = await self.row(sid)
        if key is not None and intake.TOKEN.match(key):
            prior = await self.journal.exec_by_idempotency_key(sid, key)
            if prior is not None:
                return prior
        require_running(row, "exec")
        return None

    def begin_exec(self, sid: str, submitted: Submitted) -> None:
        """Have the exec run without waiting for it (an SSE stream follows its output)."""
        self.waiter.begin_exec(sid, submitted.exec_id, submitted.request)

    async def settled_exec(self, sid: str, submitted: Submitted, answering: bool = False) -> tuple[dict, bool]:
        """(the exec's row once it finished, was lost or nobody runs it; whether its end is still
        to be journaled: the caller flushes the journal once it answered). An exec this caller
        just requested and the daemon ran for it is built from what the executor observed,
        without reading the journal (the exec hot path)."""
        req = submitted.request
        if req is not None:
            try:
                finished = await self.waiter.executed(sid, submitted.exec_id, req, answering)
            except SandboxGone:
                finished = None   # journaled as exec.lost; the row says so
            if finished is not None:
                assert submitted.requested is not None
                return {**finished.payload, "id": submitted.exec_id, "session_id": sid, "cmd": req.cmd,
                        "timeout_ms": req.timeout_ms, "status": "finished",
                        "requested_at": submitted.requested.created_at, "finished_at": finished.created_at,
                        "lost_reason": None}, answering
        try:
            await self.waiter.executed(sid, submitted.exec_id)
        except SandboxGone:
            pass   # journaled as exec.lost; the row below says so
        await self.journal.written()   # its end may be deferred behind another request's answer
        row = await self.journal.exec(submitted.exec_id)
        if row is None:
            raise SandboxError(f"unable to find exec {submitted.exec_id} in the journal")
        return row, False

    async def lost_exec(self, sid: str, exec_id: str, reason: str | None) -> SessionEnded | SandboxGone:
        """The error for an exec that did not finish: 410 SESSION_ENDED when its session was
        destroyed meanwhile (a DELETE, a TTL, a deleted workspace), else 410 SANDBOX_LOST."""
        session = await self.journal.session(sid)
        if session is not None and session["status"] in GOING:
            return SessionEnded(f"exec {exec_id} did not finish: session {sid} was destroyed while it ran"
                                f"{end_reason(session)}", exec_id=exec_id, status=session["status"])
        return SandboxGone(f"exec {exec_id} in session {sid} was lost: {reason}", exec_id=exec_id)


def end_reason(session: Mapping[str, Any]) -> str:
    return f" (reason: {session['end_reason']})" if session.get("end_reason") else ""


def require_running(row: dict, verb: str) -> None:
    """Refuse to `verb` in a session that is not running (and claimed, and not expired)."""
    status = row["status"]
    if status in SESSION_ENDED or status == SessionStatus.DESTROYING:
        raise SessionEnded(f"unable to {verb} in session {row['id']}: the session is {status}{end_reason(row)}",
                           status=status, reason=row.get("end_reason"))
    if status == SessionStatus.LOST:
        raise SandboxGone(f"unable to {verb} in session {row['id']}: its sandbox was lost "
                          f"({row['lost_reason']})", status=status)
    if status != SessionStatus.RUNNING:
        raise SessionNotRunning(f"unable to {verb} in session {row['id']}: the session is {status}",
                                status=status)
    # the reconciler journals it within a second
    if row.get("expires_at") and row["expires_at"] <= iso_utc(datetime.now(UTC)):
        raise SessionEnded(f"unable to {verb} in session {row['id']}: the session expired at {row['expires_at']} "
                           f"(reason: ttl)", status="expired", reason="ttl")
    if row["pool"] in UNCLAIMED:
        raise SessionNotRunning(f"unable to {verb} in session {row['id']}: it is an unclaimed pool session",
                                pool=row["pool"])


def check_retry(prior: dict | None, cmd: c.RequestExec, body: Any) -> None:
    """A retry must repeat the request it retries: the same cmd (and timeout_ms, if it names one)."""
    if prior is None:
        return
    given_timeout = body.get("timeout_ms") if isinstance(body, dict) else None
    differs = [name for name, given in (("cmd", cmd.cmd), ("timeout_ms", given_timeout))
               if given is not None and getattr(cmd, name) != prior[name]]
    if differs:
        raise DuplicateIdempotencyKey(
            f"unable to exec: Idempotency-Key {cmd.idempotency_key!r} was already used in this session for "
            f"exec {prior['id']} with a different {' and '.join(differs)} (use a new key for a new command)",
            exec_id=prior["id"], fields=differs)

