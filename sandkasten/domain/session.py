"""A session's life as pure functions: `decide(state, command) -> events`, `evolve(state, event)`.

Statuses: requested -> running (sandbox.started) -> destroying -> destroyed;
running -> lost (sandbox.lost) -> running again (sandbox.started/adopted) or destroying;
requested|lost -> failed (sandbox.failed). Every non-destroyed, non-destroying session can
be destroyed (session.destroy_requested) or expired (session.expired); both move it to
"destroying", and `end_reason` says why ("api", "cli", "ttl", "idle", …).
Exec statuses: requested -> running -> finished | lost (requested -> finished/lost too).

Pool members (`session.requested` with `pool: true`) live the same life, plus a `pool`
marker: "idle" (made ahead, nobody's yet; no execs) -> "claiming" (session.claimed: handed
to a client with the client's limits, env, workspace and TTL; legal once, only while
running) -> "claimed" (sandbox.configured: the executor applied the claim to the sandbox).
A claim that changes nothing in the sandbox (same limits, no env, no workspace) says
`configured: true` and goes straight to "claimed".

The state keeps only the non-terminal execs (evolve stays O(1) per event). Facts about
earlier execs that `decide` needs (is this exec id taken? which exec used this
idempotency key?) are looked up by the store before deciding and passed in as `PriorExecs`.
No I/O and no clock reads here: timestamps come in the commands.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, UTC
from types import MappingProxyType
from typing import Any
from collections.abc import Mapping

from sandkasten.domain import commands as c
from sandkasten.domain import events as ev
from sandkasten.domain import host as h
from sandkasten.domain import processes as proc
from sandkasten.domain.processes import ProcessState
from sandkasten.domain.workspace import WorkspaceState, decide_workspace, evolve_workspace, file_event
from sandkasten.errors import IllegalTransition, InvalidRequest, SessionNotFound
from sandkasten.schema.vocabulary import POOL_UNCLAIMED, SESSION_ENDED, ExecStatus, PoolState, SessionStatus

try:  # the lead may move this error into sandkasten.errors; use theirs when it exists
    from sandkasten.errors import DuplicateIdempotencyKey  # type: ignore[attr-defined]
except ImportError:

    class DuplicateIdempotencyKey(IllegalTransition):  # type: ignore[no-redef]
        """An exec with this idempotency key was already requested in the session."""

        code = "DUPLICATE_IDEMPOTENCY_KEY"

        def __init__(self, message: str, exec_id: str, **details: Any) -> None:
            super().__init__(message, exec_id=exec_id, **details)
            self.exec_id = exec_id


# the statuses are defined once, in sandkasten.schema.vocabulary; these names are its members
REQUESTED = SessionStatus.REQUESTED
RUNNING = SessionStatus.RUNNING
LOST = SessionStatus.LOST
FAILED = SessionStatus.FAILED
DESTROYING = SessionStatus.DESTROYING
DESTROYED = SessionStatus.DESTROYED
ENDED_STATUSES = SESSION_ENDED  # sessions() hides these unless asked

EXEC_REQUESTED = ExecStatus.REQUESTED
EXEC_RUNNING = ExecStatus.RUNNING
EXEC_FINISHED = ExecStatus.FINISHED
EXEC_LOST = ExecStatus.LOST

INITIAL_CWD = "/workspace"

POOL_IDLE = PoolState.IDLE
POOL_CLAIMING = PoolState.CLAIMING
POOL_CLAIMED = PoolState.CLAIMED
UNCLAIMED = POOL_UNCLAIMED  # not (yet) a client's session


@dataclass(frozen=True)
class ExecState:
    status: str  # "requested" | "running" (terminal execs leave the state)
    idempotency_key: str | None = None


@dataclass(frozen=True)
class SessionState:
    session_id: str
    version: int
    status: str
    image: str
    cpu_limit: float
    mem_limit_mb: int
    pids_limit: int
    network_mode: str
    env: Mapping[str, str]
    ttl_seconds: int
    workspace_id: str | None
    readonly_rootfs: bool
    expires_at: str
    runner_pid: int | None = None
    runner_start_time: int | None = None
    cgroup: str | None = None
    pooled: bool = False
    sandbox_stopped: bool = False
    cwd: str = INITIAL_CWD
    lost_reason: str | None = None
    end_reason: str | None = None
    execs: Mapping[str, ExecState] = field(default_factory=lambda: MappingProxyType({}))
    exec_count: int = 0
    finished_count: int = 0
    lost_count: int = 0
    egress_allow: tuple[str, ...] = ()
    pool: str | None = None  # None (an ordinary session) | "idle" | "claiming" | "claimed"
    host_id: str | None = None  # cluster: the host it is placed on, and that host's epoch (domain.host)
    host_epoch: int | None = None
    processes: Mapping[str, ProcessState] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def pending_exec_ids(self) -> list[str]:
        return list(self.execs)


@dataclass(frozen=True)
class PriorExecs:
    """Facts about earlier execs, loaded by the store before a RequestExec is decided."""

    exec_id_taken: bool = False
    key_exec_id: str | None = None  # the exec that already used the command's idempotency key


State = SessionState | WorkspaceState | h.HostState

# what each command tries to do, for messages: "unable to <verb> s-ab12: session is destroyed"
_VERBS: dict[type, str] = {
    c.RequestSession: "request session",
    c.ClaimSession: "claim pool session",
    c.RecordSandboxConfigured: "record the claimed configuration of session",
    c.RecordSandboxStarted: "record sandbox start for session",
    c.RecordSandboxFailed: "record sandbox failure for session",
    c.RecordSandboxAdopted: "adopt sandbox of session",
    c.RecordSandboxLost: "record sandbox loss for session",
    c.RequestDestroy: "destroy session",
    c.ExpireSession: "expire session",
    c.RecordSandboxStopped: "record sandbox stop for session",
    c.RecordSessionDestroyed: "record destruction of session",
    c.RequestExec: "request exec on session",
    c.RecordExecStarted: "start exec on session",
    c.RecordExecFinished: "finish exec on session",
    c.RecordExecLost: "record lost exec on session",
    c.RequestProcess: "start a process in session",
    c.RecordProcessStarted: "record process start in session",
    c.RecordProcessInput: "send input to a process in session",
    c.RecordProcessExited: "record process exit in session",
    c.RecordProcessLost: "record lost process in session",
    c.RecordFileChange: "record a file change in session",
}

# command -> statuses in which it is legal
_ALLOWED: dict[type, frozenset[str]] = {
    c.ClaimSession: frozenset({RUNNING}),
    c.RecordSandboxConfigured: frozenset({RUNNING}),
    c.RecordSandboxStarted: frozenset({REQUESTED, LOST}),
    c.RecordSandboxFailed: frozenset({REQUESTED, LOST}),
    c.RecordSandboxAdopted: frozenset({RUNNING, LOST}),
    c.RecordSandboxLost: frozenset({RUNNING}),
    c.RequestDestroy: frozenset({REQUESTED, RUNNING, LOST, FAILED}),
    c.ExpireSession: frozenset({REQUESTED, RUNNING, LOST, FAILED}),
    c.RecordSandboxStopped: frozenset({DESTROYING}),
    c.RecordSessionDestroyed: frozenset({DESTROYING}),
    c.RequestExec: frozenset({RUNNING}),
    c.RequestProcess: frozenset({RUNNING}),
    c.RecordProcessInput: frozenset({RUNNING}),
    c.RecordFileChange: frozenset({RUNNING}),
}


def decide(
    state: State | None,
    command: c.Command,
    *,
    prior: PriorExecs | None = None,
    stream_id: str | None = None,
) -> list[ev.NewEvent]:
    """The events `command` produces in `state`, or IllegalTransition (and friends)."""
    decider = _DECIDERS.get(type(command))
    if decider is not None and isinstance(state, SessionState):   # the common case, checked first
        allowed = _ALLOWED.get(type(command))
        if allowed is not None and state.status not in allowed:
            raise IllegalTransition(f"unable to {_VERBS[type(command)]} {state.session_id}: session is {state.status}",
                                    session_id=state.session_id, status=state.status)
        return decider(state, command, prior or PriorExecs(), _VERBS[type(command)])
    if isinstance(command, (c.CreateWorkspace, c.DeleteWorkspace)) or (
            isinstance(command, c.RecordFileChange) and isinstance(state, WorkspaceState)):
        if state is not None and not isinstance(state, WorkspaceState):
            raise InvalidRequest(f"unable to apply {type(command).__name__} to session stream")
        return decide_workspace(state, command)
    if isinstance(command, h.HOST_COMMANDS):
        if ((state is not None and not isinstance(state, h.HostState))
                or not (stream_id or "").startswith(h.HOST_STREAM_PREFIX)):
            raise InvalidRequest(f"unable to apply {type(command).__name__}: stream {stream_id} is not a host")
        return h.decide_host(state, command, stream_id or "")
    if isinstance(command, h.PlaceSession):
        if not isinstance(state, SessionState):
            raise SessionNotFound(f"unable to place session {stream_id}: no such session", session_id=stream_id)
        return h.decide_place(state, command, ENDED_STATUSES | {DESTROYED})
    verb = _VERBS.get(type(command))
    if verb is None:
        raise TypeError(f"unknown command {type(command).__name__}")
    if isinstance(command, c.RequestSession):
        if state is not None:
            raise IllegalTransition(f"unable to {verb} {_sid(state, stream_id)}: session already exists")
        return [ev.NewEvent(ev.SESSION_REQUESTED, _requested_payload(command))]
    if state is None:
        sid = stream_id or "?"
        raise SessionNotFound(f"unable to {verb} {sid}: no such session", session_id=sid)
    if not isinstance(state, SessionState):
        raise InvalidRequest(f"unable to {verb} {stream_id}: stream is not a session's")
    sid = state.session_id
    allowed = _ALLOWED.get(type(command))
    if allowed is not None and state.status not in allowed:
        raise IllegalTransition(f"unable to {verb} {sid}: session is {state.status}", session_id=sid,
                                status=state.status)
    return _DECIDERS[type(command)](state, command, prior or PriorExecs(), verb)


def _sid(state: Any, stream_id: str | None) -> str:
    return getattr(state, "session_id", None) or stream_id or "?"


def _requested_payload(cmd: c.RequestSession) -> dict[str, Any]:
    if cmd.expires_at is None:
        raise InvalidRequest("unable to request session: expires_at is required")
    pool = {"pool": True} if cmd.pool else {}  # absent for ordinary sessions (payloads stay as they were)
    return {
        **pool,
        "session_id": cmd.session_id,
        "image": cmd.image,
        "cpu_limit": cmd.cpu_limit,
        "mem_limit_mb": cmd.mem_limit_mb,
        "pids_limit": cmd.pids_limit,
        "network_mode": cmd.network_mode,
        **({"egress_allow": list(cmd.egress_allow)} if cmd.egress_allow else {}),  # absent when empty
        "env": dict(cmd.env),
        "ttl_seconds": cmd.ttl_seconds,
        "workspace_id": cmd.workspace_id,
        "readonly_rootfs": cmd.readonly_rootfs,
        "expires_at": iso_utc(cmd.expires_at),
    }


def iso_utc(value: datetime | str) -> str:
    """An aware datetime (or ISO string) as ISO 8601 UTC with microseconds."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError as exc:
            raise InvalidRequest(f"unable to parse timestamp {value!r}: {exc}") from None
    if value.tzinfo is None:
        raise InvalidRequest(f"unable to use timestamp {value.isoformat()}: no timezone")
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def _claim(state: SessionState, cmd: c.ClaimSession, prior: PriorExecs, verb: str) -> list[ev.NewEvent]:
    if state.pool != POOL_IDLE:
        what = "it was claimed already" if state.pool else "it is not a pool session"
        raise IllegalTransition(f"unable to {verb} {state.session_id}: {what}", session_id=state.session_id)
    unchanged = (not cmd.env and not cmd.workspace_id and (cmd.cpu_limit, cmd.mem_limit_mb, cmd.pids_limit)
                 == (state.cpu_limit, state.mem_limit_mb, state.pids_limit))
    return [ev.NewEvent(ev.SESSION_CLAIMED, {
        "ttl_seconds": cmd.ttl_seconds, "expires_at": iso_utc(cmd.expires_at), "cpu_limit": cmd.cpu_limit,
        "mem_limit_mb": cmd.mem_limit_mb, "pids_limit": cmd.pids_limit, "env": dict(cmd.env),
        "workspace_id": cmd.workspace_id, "configured": unchanged,
    })]


def _configured(state: SessionState, cmd: c.RecordSandboxConfigured, prior: PriorExecs, verb: str) -> list[ev.NewEvent]:
    if state.pool != POOL_CLAIMING:
        raise IllegalTransition(f"unable to {verb} {state.session_id}: no claim is pending",
                                session_id=state.session_id)
    return [ev.NewEvent(ev.SANDBOX_CONFIGURED, {})]


def _started(state: SessionState, cmd: c.RecordSandboxStarted, prior: PriorExecs, verb: str) -> list[ev.NewEvent]:
    return [ev.NewEvent(ev.SANDBOX_STARTED, {"pid": cmd.pid, "start_time": cmd.start_time, "cgroup": cmd.cgroup,
                                             "pooled": cmd.pooled})]


def _failed(state: SessionState, cmd: c.RecordSandboxFailed, prior: PriorExecs, verb: str) -> list[ev.NewEvent]:
    # failed is terminal: nothing can report on execs still pending, so they are lost
    return [*_lose_pending(state, "sandbox failed"), *proc.lose_all(state, "sandbox failed"),
            ev.NewEvent(ev.SANDBOX_FAILED, {"reason": cmd.reason})]


def _adopted(state: SessionState, cmd: c.RecordSandboxAdopted, prior: PriorExecs, verb: str) -> list[ev.NewEvent]:
    return [ev.NewEvent(ev.SANDBOX_ADOPTED, {"pid": cmd.pid, "start_time": cmd.start_time})]


def _lost(state: SessionState, cmd: c.RecordSandboxLost, prior: PriorExecs, verb: str) -> list[ev.NewEvent]:
    return [ev.NewEvent(ev.SANDBOX_LOST, {"reason": cmd.reason})]


def _destroy(state: SessionState, cmd: c.RequestDestroy, prior: PriorExecs, verb: str) -> list[ev.NewEvent]:
    return [ev.NewEvent(ev.SESSION_DESTROY_REQUESTED, {"reason": cmd.reason})]


def _expire(state: SessionState, cmd: c.ExpireSession, prior: PriorExecs, verb: str) -> list[ev.NewEvent]:
    if cmd.reason == "ttl" and cmd.at is not None and iso_utc(cmd.at) < state.expires_at:
        raise IllegalTransition(
            f"unable to {verb} {state.session_id}: it expires at {state.expires_at}", session_id=state.session_id
        )
    return [ev.NewEvent(ev.SESSION_EXPIRED, {"reason": cmd.reason})]


def _stopped(state: SessionState, cmd: c.RecordSandboxStopped, prior: PriorExecs, verb: str) -> list[ev.NewEvent]:
    if state.sandbox_stopped:
        raise IllegalTransition(f"unable to {verb} {state.session_id}: sandbox already stopped")
    return [ev.NewEvent(ev.SANDBOX_STOPPED, {})]


def _destroyed(state: SessionState, cmd: c.RecordSessionDestroyed, prior: PriorExecs, verb: str) -> list[ev.NewEvent]:
    return [*_lose_pending(state, "session destroyed"), *proc.lose_all(state, "session destroyed"),
            ev.NewEvent(ev.SESSION_DESTROYED, {})]


def _lose_pending(state: SessionState, reason: str) -> list[ev.NewEvent]:
    return [ev.NewEvent(ev.EXEC_LOST, {"exec_id": eid, "reason": reason}) for eid in state.execs]


def _request_exec(state: SessionState, cmd: c.RequestExec, prior: PriorExecs, verb: str) -> list[ev.NewEvent]:
    if state.pool in UNCLAIMED:  # a pool member must reach its client untouched
        raise IllegalTransition(f"unable to {verb} {state.session_id}: it is an unclaimed pool session",
                                session_id=state.session_id)
    key = cmd.idempotency_key
    if key is not None:
        owner = prior.key_exec_id or next((e for e, x in state.execs.items() if x.idempotency_key == key), None)
        if owner is not None:
            raise DuplicateIdempotencyKey(
                f"unable to {verb} {state.session_id}: idempotency key {key!r} already used by exec {owner}",
                exec_id=owner,
                session_id=state.session_id,
            )
    if prior.exec_id_taken or cmd.exec_id in state.execs:
        raise IllegalTransition(f"unable to {verb} {state.session_id}: exec id {cmd.exec_id} already exists")
    payload = {"exec_id": cmd.exec_id, "cmd": cmd.cmd, "timeout_ms": cmd.timeout_ms, "idempotency_key": key}
    return [ev.NewEvent(ev.EXEC_REQUESTED, payload)]


def _request_process(state: SessionState, cmd: c.RequestProcess, prior: PriorExecs, verb: str) -> list[ev.NewEvent]:
    if state.pool in UNCLAIMED:
        raise IllegalTransition(f"unable to {verb} {state.session_id}: it is an unclaimed pool session",
                                session_id=state.session_id)
    return proc.request(state, cmd, prior, verb, DuplicateIdempotencyKey)


def _process_input(state: SessionState, cmd: c.RecordProcessInput, prior: PriorExecs, verb: str) -> list[ev.NewEvent]:
    return proc.input_(state, cmd, prior, verb, DuplicateIdempotencyKey)


def _pending_exec(state: SessionState, exec_id: str, verb: str) -> ExecState:
    found = state.execs.get(exec_id)
    if found is None:
        raise IllegalTransition(
            f"unable to {verb} {state.session_id}: exec {exec_id} is not pending", session_id=state.session_id,
            exec_id=exec_id,
        )
    return found


def _exec_started(state: SessionState, cmd: c.RecordExecStarted, prior: PriorExecs, verb: str) -> list[ev.NewEvent]:
    if _pending_exec(state, cmd.exec_id, verb).status != EXEC_REQUESTED:
        raise IllegalTransition(f"unable to {verb} {state.session_id}: exec {cmd.exec_id} is already running")
    return [ev.NewEvent(ev.EXEC_STARTED, {"exec_id": cmd.exec_id})]


def _exec_finished(state: SessionState, cmd: c.RecordExecFinished, prior: PriorExecs, verb: str) -> list[ev.NewEvent]:
    _pending_exec(state, cmd.exec_id, verb)
    payload = {
        "exec_id": cmd.exec_id, "exit_code": cmd.exit_code, "cwd": cmd.cwd, "duration_ms": cmd.duration_ms,
        "stdout_bytes": cmd.stdout_bytes, "stderr_bytes": cmd.stderr_bytes, "output_sha256": cmd.output_sha256,
        "truncated": cmd.truncated, "timed_out": cmd.timed_out,
    }
    if cmd.oom_kills:  # only when it happened: older events and readers never see the key
        payload["oom_kills"] = cmd.oom_kills
    return [ev.NewEvent(ev.EXEC_FINISHED, payload)]


def _exec_lost(state: SessionState, cmd: c.RecordExecLost, prior: PriorExecs, verb: str) -> list[ev.NewEvent]:
    _pending_exec(state, cmd.exec_id, verb)
    return [ev.NewEvent(ev.EXEC_LOST, {"exec_id": cmd.exec_id, "reason": cmd.reason})]


def _file_change(state: SessionState, cmd: c.RecordFileChange, prior: PriorExecs, verb: str) -> list[ev.NewEvent]:
    return [file_event(cmd)]


_DECIDERS: dict[type, Any] = {
    c.ClaimSession: _claim,
    c.RecordSandboxConfigured: _configured,
    c.RecordSandboxStarted: _started,
    c.RecordSandboxFailed: _failed,
    c.RecordSandboxAdopted: _adopted,
    c.RecordSandboxLost: _lost,
    c.RequestDestroy: _destroy,
    c.ExpireSession: _expire,
    c.RecordSandboxStopped: _stopped,
    c.RecordSessionDestroyed: _destroyed,
    c.RequestExec: _request_exec,
    c.RecordExecStarted: _exec_started,
    c.RecordExecFinished: _exec_finished,
    c.RecordExecLost: _exec_lost,
    c.RequestProcess: _request_process,
    c.RecordProcessStarted: proc.started,
    c.RecordProcessInput: _process_input,
    c.RecordProcessExited: proc.exited,
    c.RecordProcessLost: proc.lost,
    c.RecordFileChange: _file_change,
}


def _with(state: SessionState, **changes: Any) -> SessionState:
    """`dataclasses.replace` without re-running `__init__` (which only sets the fields): a copy
    of the frozen state with `changes`. `evolve` runs on every append and every replayed event."""
    new = object.__new__(SessionState)
    new.__dict__.update(state.__dict__)
    new.__dict__.update(changes)
    return new


def evolve(state: State | None, event: Any) -> State:
    """Apply one event (NewEvent or RecordedEvent) to a stream's state."""
    if event.type in ev.WORKSPACE_EVENT_TYPES or (
            event.type in ev.FILE_EVENT_TYPES and isinstance(state, WorkspaceState)):
        return evolve_workspace(state if isinstance(state, WorkspaceState) else None, event)
    if event.type in h.HOST_EVENT_TYPES:
        return h.evolve_host(state if isinstance(state, h.HostState) else None, event)
    version = getattr(event, "stream_version", None) or ((state.version if state else 0) + 1)
    p = event.payload
    if event.type == ev.SESSION_REQUESTED:
        return SessionState(
            session_id=p.get("session_id") or getattr(event, "stream_id", "") or "",
            version=version, status=REQUESTED, image=p["image"], cpu_limit=p["cpu_limit"],
            mem_limit_mb=p["mem_limit_mb"], pids_limit=p["pids_limit"], network_mode=p["network_mode"],
            egress_allow=tuple(p.get("egress_allow") or ()),
            env=MappingProxyType(dict(p.get("env") or {})), ttl_seconds=p["ttl_seconds"],
            workspace_id=p.get("workspace_id"), readonly_rootfs=bool(p.get("readonly_rootfs")),
            expires_at=p["expires_at"], pool=POOL_IDLE if p.get("pool") else None,
        )
    if not isinstance(state, SessionState):
        raise ValueError(f"unable to apply event {event.type}: session stream has no session.requested")
    s = state
    t = event.type
    if t in (ev.SANDBOX_STARTED, ev.SANDBOX_ADOPTED):
        extra = {"cgroup": p.get("cgroup") or None, "pooled": bool(p.get("pooled"))} if t == ev.SANDBOX_STARTED else {}
        return _with(s, version=version, status=RUNNING, runner_pid=p["pid"], runner_start_time=p["start_time"],
                     lost_reason=None, **extra)
    if t == ev.SESSION_CLAIMED:
        return _with(s, version=version, pool=POOL_CLAIMED if p.get("configured") else POOL_CLAIMING,
                     ttl_seconds=p["ttl_seconds"], expires_at=p["expires_at"],
                     cpu_limit=p["cpu_limit"], mem_limit_mb=p["mem_limit_mb"], pids_limit=p["pids_limit"],
                     env=MappingProxyType(dict(p.get("env") or {})), workspace_id=p.get("workspace_id"))
    if t == ev.SANDBOX_CONFIGURED:
        return _with(s, version=version, pool=POOL_CLAIMED)
    if t == h.SESSION_PLACED:
        return _with(s, version=version, host_id=p["host_id"], host_epoch=p["host_epoch"])
    if t == ev.SANDBOX_FAILED:
        return _with(s, version=version, status=FAILED, end_reason=p.get("reason"), runner_pid=None,
                     runner_start_time=None)
    if t == ev.SANDBOX_LOST:
        return _with(s, version=version, status=LOST, lost_reason=p.get("reason"), runner_pid=None,
                     runner_start_time=None)
    if t in (ev.SESSION_DESTROY_REQUESTED, ev.SESSION_EXPIRED):
        return _with(s, version=version, status=DESTROYING, end_reason=p.get("reason"))
    if t == ev.SANDBOX_STOPPED:
        return _with(s, version=version, sandbox_stopped=True, runner_pid=None, runner_start_time=None)
    if t == ev.SESSION_DESTROYED:
        return _with(s, version=version, status=DESTROYED)
    if t in ev.FILE_EVENT_TYPES:
        return _with(s, version=version)
    if t == ev.EXEC_REQUESTED:
        execs = {**s.execs, p["exec_id"]: ExecState(EXEC_REQUESTED, p.get("idempotency_key"))}
        return _with(s, version=version, execs=MappingProxyType(execs), exec_count=s.exec_count + 1)
    if t == ev.EXEC_STARTED:
        execs = dict(s.execs)
        execs[p["exec_id"]] = ExecState(EXEC_RUNNING, execs[p["exec_id"]].idempotency_key)
        return _with(s, version=version, execs=MappingProxyType(execs))
    if t in ev.PROCESS_EVENT_TYPES:
        return _with(s, version=version, processes=MappingProxyType(proc.evolve(dict(s.processes), event)))
    if t in (ev.EXEC_FINISHED, ev.EXEC_LOST):
        execs = {k: v for k, v in s.execs.items() if k != p["exec_id"]}
        if t == ev.EXEC_FINISHED:
            return _with(s, version=version, execs=MappingProxyType(execs), finished_count=s.finished_count + 1,
                         cwd=p.get("cwd") or s.cwd)
        return _with(s, version=version, execs=MappingProxyType(execs), lost_count=s.lost_count + 1)
    raise ValueError(f"unable to apply event {t}: unknown event type")
