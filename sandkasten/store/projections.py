"""Read tables from events: `apply(conn, event)` updates `sessions`, `execs`, `workspaces`;
`rebuild(conn)` empties them and replays every event.

Synchronous: runs inside the append's transaction (live: on the event loop or the journal's
writer thread, see store/connection.py) and inside `Journal.rebuild` (replay), so both paths
produce the same rows by construction. Every statement is prebuilt (module constants or
`_update`'s cache, which every journal's writer shares: entries are added under `_building`
and never changed) and run through store/statements.py. Only the event and the rows already
written by earlier events are used — never the clock, never the kernel.
"""

from __future__ import annotations

import threading
from typing import Any
from collections.abc import Callable

import sqlalchemy as sa

from sandkasten.domain import events as ev
from sandkasten.domain.session import (DESTROYED, DESTROYING, FAILED, INITIAL_CWD, LOST, POOL_CLAIMED, POOL_CLAIMING,
                                       POOL_IDLE, REQUESTED, RUNNING)
from sandkasten.store import events, host_projections, statements
from sandkasten.store.schema import READ_TABLES, execs, processes, sessions, workspaces


def apply(conn: Any, event: ev.RecordedEvent) -> None:
    project = _PROJECTORS.get(event.type)
    if project is not None:
        project(conn, event)


_CLEAR = [sa.delete(table) for table in READ_TABLES]


def rebuild(conn: Any) -> int:
    """Inside a write transaction: empty the read tables and replay every event into them;
    how many events were replayed."""
    for clear in _CLEAR:
        statements.execute(conn, clear, {})
    count = 0
    for rows in events.pages(conn):
        for row in rows:
            apply(conn, events.recorded(row))
        count += len(rows)
    return count


_STATEMENTS: dict[tuple, tuple[sa.Update, tuple[str, ...]]] = {}
_building = threading.Lock()


def _update(conn: Any, table: sa.Table, row_id: str, values: dict[str, Any]) -> None:
    """UPDATE table SET ... WHERE id = :row_id, the statement built once per column list and
    reused with bound parameters (building a statement costs ~5x executing it). Values that
    are SQL expressions stay part of the statement; they must be module constants
    (`_EXEC_COUNT_PLUS_ONE`): the cache knows them by identity."""
    key = (table.name, *[(k, id(v)) if isinstance(v, sa.ColumnElement) else k for k, v in values.items()])
    entry = _STATEMENTS.get(key)
    if entry is None:
        exprs = {k: v for k, v in values.items() if isinstance(v, sa.ColumnElement)}
        names = tuple(k for k in values if k not in exprs)
        stmt = sa.update(table).where(table.c.id == sa.bindparam("row_id")).values(
            **{k: sa.bindparam(f"v_{k}") for k in names}, **exprs)
        with _building:   # the first one built is the one kept (statements' cache knows it by identity)
            entry = _STATEMENTS.setdefault(key, (stmt, names))
    stmt, names = entry
    params = {f"v_{k}": values[k] for k in names}
    params["row_id"] = row_id
    statements.execute(conn, stmt, params)


def _update_session(conn: Any, event: ev.RecordedEvent, **values: Any) -> None:
    values.update(updated_at=event.created_at, version=event.stream_version)
    _update(conn, sessions, event.stream_id, values)


def _update_exec(conn: Any, event: ev.RecordedEvent, **values: Any) -> None:
    _update(conn, execs, event.payload["exec_id"], values)


_INSERT_SESSION = sa.insert(sessions)
_LAST_SESSION_OF_WORKSPACE = sa.update(workspaces).where(workspaces.c.id == sa.bindparam("row_id")).values(
    last_session_id=sa.bindparam("v_last_session_id"))


def _session_requested(conn: Any, e: ev.RecordedEvent) -> None:
    p = e.payload
    statements.execute(conn, _INSERT_SESSION, dict(
        id=e.stream_id, status=REQUESTED, image=p["image"], workspace_id=p.get("workspace_id"),
        cpu_limit=p["cpu_limit"], mem_limit_mb=p["mem_limit_mb"], pids_limit=p["pids_limit"],
        network_mode=p["network_mode"], env=dict(p.get("env") or {}), ttl_seconds=p["ttl_seconds"],
        readonly_rootfs=bool(p.get("readonly_rootfs")), created_at=e.created_at, updated_at=e.created_at,
        expires_at=p["expires_at"], ended_at=None, runner_pid=None, runner_start_time=None, cgroup=None,
        pooled=False, cwd=INITIAL_CWD, exec_count=0, last_activity_at=e.created_at, lost_reason=None,
        end_reason=None, actor=e.actor, version=e.stream_version, pool=POOL_IDLE if p.get("pool") else None,
        host_id=None, host_epoch=None,
    ))
    if p.get("workspace_id"):
        statements.execute(conn, _LAST_SESSION_OF_WORKSPACE, {"row_id": p["workspace_id"],
                                                              "v_last_session_id": e.stream_id})


def _sandbox_started(conn: Any, e: ev.RecordedEvent) -> None:
    p = e.payload
    _update_session(
        conn, e, status=RUNNING, runner_pid=p["pid"], runner_start_time=p["start_time"],
        cgroup=p.get("cgroup") or None, pooled=bool(p.get("pooled")), lost_reason=None,
    )


def _sandbox_adopted(conn: Any, e: ev.RecordedEvent) -> None:
    p = e.payload
    _update_session(conn, e, status=RUNNING, runner_pid=p["pid"], runner_start_time=p["start_time"], lost_reason=None)


def _sandbox_failed(conn: Any, e: ev.RecordedEvent) -> None:
    _update_session(
        conn, e, status=FAILED, end_reason=e.payload.get("reason"), ended_at=e.created_at,
        runner_pid=None, runner_start_time=None,
    )


def _sandbox_lost(conn: Any, e: ev.RecordedEvent) -> None:
    _update_session(
        conn, e, status=LOST, lost_reason=e.payload.get("reason"), runner_pid=None, runner_start_time=None
    )


def _destroying(conn: Any, e: ev.RecordedEvent) -> None:
    _update_session(conn, e, status=DESTROYING, end_reason=e.payload.get("reason"))


def _sandbox_stopped(conn: Any, e: ev.RecordedEvent) -> None:
    _update_session(conn, e, runner_pid=None, runner_start_time=None)


def _session_destroyed(conn: Any, e: ev.RecordedEvent) -> None:
    _update_session(conn, e, status=DESTROYED, ended_at=e.created_at)


_EXEC_COUNT_PLUS_ONE = sessions.c.exec_count + 1
_INSERT_EXEC = sa.insert(execs).values(
    seq_no=sa.select(sessions.c.exec_count).where(sessions.c.id == sa.bindparam("session_id")).scalar_subquery(),
    **{k: sa.bindparam(k) for k in ("id", "session_id", "cmd", "status", "actor", "request_id",
                                     "idempotency_key", "timeout_ms", "requested_at")})


def _exec_requested(conn: Any, e: ev.RecordedEvent) -> None:
    p = e.payload
    _update_session(conn, e, exec_count=_EXEC_COUNT_PLUS_ONE, last_activity_at=e.created_at)
    statements.execute(conn, _INSERT_EXEC, {
        "id": p["exec_id"], "session_id": e.stream_id, "cmd": p["cmd"], "status": "requested",
        "actor": e.actor, "request_id": e.request_id, "idempotency_key": p.get("idempotency_key"),
        "timeout_ms": p["timeout_ms"], "requested_at": e.created_at})


def _exec_started(conn: Any, e: ev.RecordedEvent) -> None:
    _update_session(conn, e)
    _update_exec(conn, e, status="running", started_at=e.created_at)


def _exec_finished(conn: Any, e: ev.RecordedEvent) -> None:
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


def _exec_lost(conn: Any, e: ev.RecordedEvent) -> None:
    _update_session(conn, e)
    _update_exec(conn, e, status="lost", finished_at=e.created_at, lost_reason=e.payload.get("reason"))


_INSERT_PROCESS = sa.insert(processes)


def _process_requested(conn: Any, e: ev.RecordedEvent) -> None:
    p = e.payload
    pty = p.get("pty") or {}
    statements.execute(conn, _INSERT_PROCESS, dict(
        id=p["process_id"], session_id=e.stream_id, cmd=p["cmd"], cwd=p.get("cwd"), env=dict(p.get("env") or {}),
        pty_rows=pty.get("rows"), pty_cols=pty.get("cols"), timeout_ms=p.get("timeout_ms"), status="requested",
        pid=None, actor=e.actor, request_id=e.request_id, idempotency_key=p.get("idempotency_key"),
        requested_at=e.created_at, started_at=None, exited_at=None, exit_code=None, signal=None, timed_out=None,
        duration_ms=None, stdout_bytes=None, stderr_bytes=None, output_sha256=None, dropped_bytes=None,
        input_bytes=0, input_count=0, lost_reason=None))
    _update_session(conn, e, last_activity_at=e.created_at)


def _update_process(conn: Any, event: ev.RecordedEvent, **values: Any) -> None:
    _update(conn, processes, event.payload["process_id"], values)


def _process_started(conn: Any, e: ev.RecordedEvent) -> None:
    _update_session(conn, e)
    _update_process(conn, e, status="running", pid=e.payload["pid"], started_at=e.created_at)


_INPUT_COUNT_PLUS_ONE = processes.c.input_count + 1
_STDIN = sa.update(processes).where(processes.c.id == sa.bindparam("row_id")).values(
    input_count=_INPUT_COUNT_PLUS_ONE, input_bytes=processes.c.input_bytes + sa.bindparam("v_size", type_=sa.Integer))


def _process_input(conn: Any, e: ev.RecordedEvent) -> None:
    p = e.payload
    _update_session(conn, e, last_activity_at=e.created_at)
    if p["kind"] == "stdin":
        statements.execute(conn, _STDIN, {"row_id": p["process_id"], "v_size": p.get("size") or 0})
    elif p["kind"] == "resize":
        _update_process(conn, e, input_count=_INPUT_COUNT_PLUS_ONE, pty_rows=p["rows"], pty_cols=p["cols"])
    else:
        _update_process(conn, e, input_count=_INPUT_COUNT_PLUS_ONE)


def _process_exited(conn: Any, e: ev.RecordedEvent) -> None:
    p = e.payload
    _update_session(conn, e)
    _update_process(conn, e, status="exited", exited_at=e.created_at, exit_code=p.get("exit_code"),
                    signal=p.get("signal"), timed_out=bool(p.get("timed_out")), duration_ms=p.get("duration_ms"),
                    stdout_bytes=p.get("stdout_bytes"), stderr_bytes=p.get("stderr_bytes"),
                    output_sha256=p.get("output_sha256"), dropped_bytes=p.get("dropped_bytes"))


def _process_lost(conn: Any, e: ev.RecordedEvent) -> None:
    _update_session(conn, e)
    _update_process(conn, e, status="lost", exited_at=e.created_at, lost_reason=e.payload.get("reason"))


_WORKSPACE_CREATED = sa.update(workspaces).where(workspaces.c.id == sa.bindparam("row_id")).values(
    created_at=sa.bindparam("v_created_at"), deleted_at=None)
_LAST_SESSION_USING = (sa.select(sessions.c.id).where(sessions.c.workspace_id == sa.bindparam("wid"))
                       .order_by(sessions.c.created_at.desc()).limit(1))
_INSERT_WORKSPACE = sa.insert(workspaces)


def _workspace_created(conn: Any, e: ev.RecordedEvent) -> None:
    wid = e.payload["workspace_id"]
    if statements.changed(conn, _WORKSPACE_CREATED, {"row_id": wid, "v_created_at": e.created_at}) == 0:
        # the session that asked for it was projected before it existed
        last = statements.execute(conn, _LAST_SESSION_USING, {"wid": wid})
        statements.execute(conn, _INSERT_WORKSPACE, {"id": wid, "created_at": e.created_at, "deleted_at": None,
                                                     "last_session_id": last[0].id if last else None})


def _workspace_deleted(conn: Any, e: ev.RecordedEvent) -> None:
    _update(conn, workspaces, e.payload["workspace_id"], {"deleted_at": e.created_at})


def _session_claimed(conn: Any, e: ev.RecordedEvent) -> None:
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
        statements.execute(conn, _LAST_SESSION_OF_WORKSPACE, {"row_id": p["workspace_id"],
                                                              "v_last_session_id": e.stream_id})


def _file_changed(conn: Any, e: ev.RecordedEvent) -> None:
    if not e.stream_id.startswith(ev.WORKSPACE_STREAM_PREFIX):  # a session's: activity, like an exec
        _update_session(conn, e, last_activity_at=e.created_at)


def _sandbox_configured(conn: Any, e: ev.RecordedEvent) -> None:
    _update_session(conn, e, pool=POOL_CLAIMED)


_PROJECTORS: dict[str, Callable[[Any, ev.RecordedEvent], None]] = {
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
