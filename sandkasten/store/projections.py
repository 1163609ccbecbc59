"""Read tables from events: `apply(conn, event)` updates `sessions`, `execs`, `workspaces`.

Synchronous: runs on the journal's writer thread, inside the append's transaction (live)
and inside `Journal.rebuild` (replay), so
both paths produce the same rows by construction. Only the event and the rows already
written by earlier events are used — never the clock, never the kernel.
"""

from __future__ import annotations

from typing import Any, Callable

import sqlalchemy as sa

from sandkasten.domain import events as ev
from sandkasten.domain.session import (DESTROYED, DESTROYING, FAILED, INITIAL_CWD, LOST, POOL_CLAIMED, POOL_CLAIMING,
                                       POOL_IDLE, REQUESTED, RUNNING)
from sandkasten.store import fastpath, host_projections
from sandkasten.store.schema import execs, processes, sessions, workspaces


def apply(conn: sa.Connection, event: ev.RecordedEvent) -> None:
    project = _PROJECTORS.get(event.type)
    if project is not None:
        project(conn, event)


_STATEMENTS: dict[tuple, sa.Update] = {}


def _update(conn: sa.Connection, table: sa.Table, row_id: str, values: dict[str, Any]) -> None:
    """UPDATE table SET ... WHERE id = :row_id, the statement built once per column set and
    reused with bound parameters (building a statement costs ~5x executing it). Values that
    are SQL expressions stay part of the statement; they must be module constants
    (`_EXEC_COUNT_PLUS_ONE`): the cache knows them by identity."""
    exprs = {k: v for k, v in values.items() if isinstance(v, sa.ColumnElement)}
    params = {k: v for k, v in values.items() if k not in exprs}
    key = (table.name, tuple(sorted(params)), tuple(sorted((k, id(v)) for k, v in exprs.items())))
    stmt = _STATEMENTS.get(key)
    if stmt is None:
        stmt = _STATEMENTS[key] = sa.update(table).where(table.c.id == sa.bindparam("row_id")).values(
            **{k: sa.bindparam(f"v_{k}") for k in params}, **exprs)
    fastpath.execute(conn, stmt, {"row_id": row_id, **{f"v_{k}": v for k, v in params.items()}})


def _update_session(conn: sa.Connection, event: ev.RecordedEvent, **values: Any) -> None:
    values.update(updated_at=event.created_at, version=event.stream_version)
    _update(conn, sessions, event.stream_id, values)


def _update_exec(conn: sa.Connection, event: ev.RecordedEvent, **values: Any) -> None:
    _update(conn, execs, event.payload["exec_id"], values)


def _session_requested(conn: sa.Connection, e: ev.RecordedEvent) -> None:
    p = e.payload
    conn.execute(
        sa.insert(sessions).values(
            id=e.stream_id, status=REQUESTED, image=p["image"], workspace_id=p.get("workspace_id"),
            cpu_limit=p["cpu_limit"], mem_limit_mb=p["mem_limit_mb"], pids_limit=p["pids_limit"],
            network_mode=p["network_mode"], env=dict(p.get("env") or {}), ttl_seconds=p["ttl_seconds"],
            readonly_rootfs=bool(p.get("readonly_rootfs")), created_at=e.created_at, updated_at=e.created_at,
            expires_at=p["expires_at"], ended_at=None, runner_pid=None, runner_start_time=None, cgroup=None,
            pooled=False, cwd=INITIAL_CWD, exec_count=0, last_activity_at=e.created_at, lost_reason=None,
            end_reason=None, actor=e.actor, version=e.stream_version, pool=POOL_IDLE if p.get("pool") else None,
        )
    )
    if p.get("workspace_id"):
        conn.execute(
            sa.update(workspaces).where(workspaces.c.id == p["workspace_id"]).values(last_session_id=e.stream_id)
        )


def _sandbox_started(conn: sa.Connection, e: ev.RecordedEvent) -> None:
    p = e.payload
    _update_session(
        conn, e, status=RUNNING, runner_pid=p["pid"], runner_start_time=p["start_time"],
        cgroup=p.get("cgroup") or None, pooled=bool(p.get("pooled")), lost_reason=None,
    )


def _sandbox_adopted(conn: sa.Connection, e: ev.RecordedEvent) -> None:
    p = e.payload
    _update_session(conn, e, status=RUNNING, runner_pid=p["pid"], runner_start_time=p["start_time"], lost_reason=None)


def _sandbox_failed(conn: sa.Connection, e: ev.RecordedEvent) -> None:
    _update_session(
        conn, e, status=FAILED, end_reason=e.payload.get("reason"), ended_at=e.created_at,
        runner_pid=None, runner_start_time=None,
    )


def _sandbox_lost(conn: sa.Connection, e: ev.RecordedEvent) -> None:
    _update_session(
        conn, e, status=LOST, lost_reason=e.payload.get("reason"), runner_pid=None, runner_start_time=None
    )


def _destroying(conn: sa.Connection, e: ev.RecordedEvent) -> None:
    _update_session(conn, e, status=DESTROYING, end_reason=e.payload.get("reason"))


def _sandbox_stopped(conn: sa.Connection, e: ev.RecordedEvent) -> None:
    _update_session(conn, e, runner_pid=None, runner_start_time=None)


def _session_destroyed(conn: sa.Connection, e: ev.RecordedEvent) -> None:
    _update_session(conn, e, status=DESTROYED, ended_at=e.created_at)


_EXEC_COUNT_PLUS_ONE = sessions.c.exec_count + 1
_INSERT_EXEC = sa.insert(execs).values(
    seq_no=sa.select(sessions.c.exec_count).where(sessions.c.id == sa.bindparam("session_id")).scalar_subquery(),
    **{k: sa.bindparam(k) for k in ("id", "session_id", "cmd", "status", "actor", "request_id",
                                     "idempotency_key", "timeout_ms", "requested_at")})


def _exec_requested(conn: sa.Connection, e: ev.RecordedEvent) -> None:
    p = e.payload
    _update_session(conn, e, exec_count=_EXEC_COUNT_PLUS_ONE, last_activity_at=e.created_at)
    fastpath.execute(conn, _INSERT_EXEC, {
        "id": p["exec_id"], "session_id": e.stream_id, "cmd": p["cmd"], "status": "requested",
        "actor": e.actor, "request_id": e.request_id, "idempotency_key": p.get("idempotency_key"),
        "timeout_ms": p["timeout_ms"], "requested_at": e.created_at})


def _exec_started(conn: sa.Connection, e: ev.RecordedEvent) -> None:
    _update_session(conn, e)
    _update_exec(conn, e, status="running", started_at=e.created_at)


def _exec_finished(conn: sa.Connection, e: ev.RecordedEvent) -> None:
    p = e.payload
    if p.get("cwd"):
        _update_session(conn, e, cwd=p["cwd"], last_activity_at=e.created_at)
    else:
        _update_session(conn, e, last_activity_at=e.created_at)
    _update_exec(
        conn, e, status="finished", finished_at=e.created_at, exit_code=p["exit_code"], cwd=p.get("cwd"),
        duration_ms=p.get("duration_ms"), stdout_bytes=p.get("stdout_bytes"), stderr_bytes=p.get("stderr_bytes"),
        output_sha256=p.get("output_sha256"), truncated=bool(p.get("truncated")), timed_out=bool(p.get("timed_out")),
    )


def _exec_lost(conn: sa.Connection, e: ev.RecordedEvent) -> None:
    _update_session(conn, e)
    _update_exec(conn, e, status="lost", finished_at=e.created_at, lost_reason=e.payload.get("reason"))


def _process_requested(conn: sa.Connection, e: ev.RecordedEvent) -> None:
    p = e.payload
    pty = p.get("pty") or {}
    conn.execute(sa.insert(processes).values(
        id=p["process_id"], session_id=e.stream_id, cmd=p["cmd"], cwd=p.get("cwd"), env=dict(p.get("env") or {}),
        pty_rows=pty.get("rows"), pty_cols=pty.get("cols"), timeout_ms=p.get("timeout_ms"), status="requested",
        actor=e.actor, request_id=e.request_id, idempotency_key=p.get("idempotency_key"),
        requested_at=e.created_at, input_bytes=0, input_count=0))
    _update_session(conn, e, last_activity_at=e.created_at)


def _update_process(conn: sa.Connection, event: ev.RecordedEvent, **values: Any) -> None:
    _update(conn, processes, event.payload["process_id"], values)


def _process_started(conn: sa.Connection, e: ev.RecordedEvent) -> None:
    _update_session(conn, e)
    _update_process(conn, e, status="running", pid=e.payload["pid"], started_at=e.created_at)


_INPUT_BYTES_PLUS = processes.c.input_bytes + sa.bindparam("v_size", type_=sa.Integer)
_INPUT_COUNT_PLUS_ONE = processes.c.input_count + 1


def _process_input(conn: sa.Connection, e: ev.RecordedEvent) -> None:
    p = e.payload
    _update_session(conn, e, last_activity_at=e.created_at)
    values: dict[str, Any] = {"input_count": _INPUT_COUNT_PLUS_ONE}
    if p["kind"] == "stdin":
        values.update(input_bytes=_INPUT_BYTES_PLUS)
    elif p["kind"] == "resize":
        values.update(pty_rows=p["rows"], pty_cols=p["cols"])
    conn.execute(sa.update(processes).where(processes.c.id == p["process_id"]).values(**values),
                 {"v_size": p.get("size") or 0})


def _process_exited(conn: sa.Connection, e: ev.RecordedEvent) -> None:
    p = e.payload
    _update_session(conn, e)
    _update_process(conn, e, status="exited", exited_at=e.created_at, exit_code=p.get("exit_code"),
                    signal=p.get("signal"), timed_out=bool(p.get("timed_out")), duration_ms=p.get("duration_ms"),
                    stdout_bytes=p.get("stdout_bytes"), stderr_bytes=p.get("stderr_bytes"),
                    output_sha256=p.get("output_sha256"), dropped_bytes=p.get("dropped_bytes"))


def _process_lost(conn: sa.Connection, e: ev.RecordedEvent) -> None:
    _update_session(conn, e)
    _update_process(conn, e, status="lost", exited_at=e.created_at, lost_reason=e.payload.get("reason"))


def _workspace_created(conn: sa.Connection, e: ev.RecordedEvent) -> None:
    wid = e.payload["workspace_id"]
    found = conn.execute(
        sa.update(workspaces).where(workspaces.c.id == wid).values(created_at=e.created_at, deleted_at=None)
    )
    if found.rowcount == 0:  # the session that asked for it was projected before it existed
        last = conn.execute(sa.select(sessions.c.id).where(sessions.c.workspace_id == wid)
                            .order_by(sessions.c.created_at.desc()).limit(1)).scalar()
        conn.execute(sa.insert(workspaces).values(id=wid, created_at=e.created_at, last_session_id=last))


def _workspace_deleted(conn: sa.Connection, e: ev.RecordedEvent) -> None:
    conn.execute(
        sa.update(workspaces).where(workspaces.c.id == e.payload["workspace_id"]).values(deleted_at=e.created_at)
    )


def _session_claimed(conn: sa.Connection, e: ev.RecordedEvent) -> None:
    # From the client's point of view the session begins now: created_at, actor and the
    # idle clock move to the claim (the pool member's own birth stays in the journal).
    p = e.payload
    _update_session(
        conn, e, pool=POOL_CLAIMED if p.get("configured") else POOL_CLAIMING,
        ttl_seconds=p["ttl_seconds"], expires_at=p["expires_at"],
        cpu_limit=p["cpu_limit"], mem_limit_mb=p["mem_limit_mb"], pids_limit=p["pids_limit"],
        env=dict(p.get("env") or {}), workspace_id=p.get("workspace_id"), created_at=e.created_at,
        last_activity_at=e.created_at, actor=e.actor,
    )
    if p.get("workspace_id"):
        conn.execute(
            sa.update(workspaces).where(workspaces.c.id == p["workspace_id"]).values(last_session_id=e.stream_id)
        )


def _file_changed(conn: sa.Connection, e: ev.RecordedEvent) -> None:
    if not e.stream_id.startswith(ev.WORKSPACE_STREAM_PREFIX):  # a session's: activity, like an exec
        _update_session(conn, e, last_activity_at=e.created_at)


def _sandbox_configured(conn: sa.Connection, e: ev.RecordedEvent) -> None:
    _update_session(conn, e, pool=POOL_CLAIMED)


_PROJECTORS: dict[str, Callable[[sa.Connection, ev.RecordedEvent], None]] = {
    ev.SESSION_REQUESTED: _session_requested,
    ev.SESSION_CLAIMED: _session_claimed,
    ev.SANDBOX_CONFIGURED: _sandbox_configured,
    ev.SANDBOX_STARTED: _sandbox_started,
    ev.SANDBOX_ADOPTED: _sandbox_adopted,
    ev.SANDBOX_FAILED: _sandbox_failed,
    ev.SANDBOX_LOST: _sandbox_lost,
    ev.SESSION_DESTROY_REQUESTED: _destroying,
    ev.SESSION_EXPIRED: _destroying,
    ev.SANDBOX_STOPPED: _sandbox_stopped,
    ev.SESSION_DESTROYED: _session_destroyed,
    ev.EXEC_REQUESTED: _exec_requested,
    ev.EXEC_STARTED: _exec_started,
    ev.EXEC_FINISHED: _exec_finished,
    ev.EXEC_LOST: _exec_lost,
    ev.PROCESS_REQUESTED: _process_requested,
    ev.PROCESS_STARTED: _process_started,
    ev.PROCESS_INPUT: _process_input,
    ev.PROCESS_EXITED: _process_exited,
    ev.PROCESS_LOST: _process_lost,
    ev.WORKSPACE_CREATED: _workspace_created,
    ev.WORKSPACE_DELETED: _workspace_deleted,
    ev.FILE_WRITTEN: _file_changed,
    ev.FILE_DELETED: _file_changed,
}
_PROJECTORS.update(host_projections.PROJECTORS)  # the cluster's hosts and placements
