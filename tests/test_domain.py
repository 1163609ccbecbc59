"""decide/evolve rules of sessions, execs and workspaces (pure, no database)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from sandkasten.domain import (
    CreateWorkspace,
    DeleteWorkspace,
    DuplicateIdempotencyKey,
    ExpireSession,
    PriorExecs,
    RecordExecFinished,
    RecordExecLost,
    RecordExecStarted,
    RecordSandboxAdopted,
    RecordSandboxFailed,
    RecordSandboxLost,
    RecordSandboxStarted,
    RecordSandboxStopped,
    RecordSessionDestroyed,
    RequestDestroy,
    RequestExec,
    RequestSession,
    SessionState,
    WorkspaceState,
    decide,
    evolve,
)
from sandkasten.domain.events import upcast, register_upcaster, UPCASTERS
from sandkasten.errors import IllegalTransition, InvalidRequest, SessionNotFound, WorkspaceNotFound

NOW = datetime(2025, 1, 1, 12, 0, tzinfo=timezone.utc)
SID = "s-ab12cd34ef56"


def run(state, *commands, prior=None):
    """Decide and evolve each command in turn; return the final state."""
    for command in commands:
        for event in decide(state, command, prior=prior, stream_id=SID):
            state = evolve(state, event)
    return state


def requested() -> SessionState:
    return run(None, RequestSession(image="busybox", ttl_seconds=60, expires_at=NOW + timedelta(minutes=1), session_id=SID))


def running() -> SessionState:
    return run(requested(), RecordSandboxStarted(pid=42, start_time=1000, cgroup="sandkasten/" + SID))


def test_request_session_records_limits_and_expiry():
    state = requested()
    assert state.status == "requested"
    assert state.session_id == SID
    assert state.version == 1
    assert state.image == "busybox"
    assert state.expires_at == "2025-01-01T12:01:00.000000+00:00"
    assert state.cwd == "/workspace"


def test_request_session_needs_an_aware_expiry():
    with pytest.raises(InvalidRequest):
        decide(None, RequestSession(image="busybox"))
    with pytest.raises(InvalidRequest):
        decide(None, RequestSession(image="busybox", expires_at=datetime(2025, 1, 1)))


def test_request_session_twice_is_refused():
    with pytest.raises(IllegalTransition, match="already exists"):
        decide(requested(), RequestSession(image="busybox", expires_at=NOW))


def test_commands_on_a_missing_session_say_not_found():
    with pytest.raises(SessionNotFound, match=f"unable to request exec on session {SID}: no such session"):
        decide(None, RequestExec("e-1", "ls", 1000), stream_id=SID)


def test_started_then_lost_then_recreated():
    state = running()
    assert (state.status, state.runner_pid, state.runner_start_time) == ("running", 42, 1000)
    state = run(state, RecordSandboxLost(reason="runner died"))
    assert (state.status, state.runner_pid, state.lost_reason) == ("lost", None, "runner died")
    state = run(state, RecordSandboxStarted(pid=43, start_time=2000))
    assert (state.status, state.runner_pid, state.lost_reason) == ("running", 43, None)


def test_adopted_keeps_running_with_the_observed_pid():
    state = run(running(), RecordSandboxAdopted(pid=42, start_time=1000))
    assert state.status == "running" and state.version == 3


def test_failed_from_requested_then_destroyed():
    state = run(requested(), RecordSandboxFailed(reason="image missing"))
    assert (state.status, state.end_reason) == ("failed", "image missing")
    with pytest.raises(IllegalTransition, match="session is failed"):
        decide(state, RequestExec("e-1", "ls", 1000))
    state = run(state, RequestDestroy(reason="api"), RecordSessionDestroyed())
    assert state.status == "destroyed"


def test_destroy_path_and_terminal_state():
    state = run(running(), RequestDestroy(reason="cli"))
    assert (state.status, state.end_reason) == ("destroying", "cli")
    with pytest.raises(IllegalTransition, match="session is destroying"):
        decide(state, RequestDestroy())
    state = run(state, RecordSandboxStopped())
    with pytest.raises(IllegalTransition, match="already stopped"):
        decide(state, RecordSandboxStopped())
    state = run(state, RecordSessionDestroyed())
    assert state.status == "destroyed"
    with pytest.raises(IllegalTransition, match=f"unable to request exec on session {SID}: session is destroyed"):
        decide(state, RequestExec("e-1", "ls", 1000))
    for command in (RequestDestroy(), ExpireSession(), RecordSandboxStarted(1, 1), RecordSandboxLost("x")):
        with pytest.raises(IllegalTransition):
            decide(state, command)


def test_expiry_moves_to_destroying_and_checks_the_clock_in_the_command():
    with pytest.raises(IllegalTransition, match="expires at"):
        decide(running(), ExpireSession(reason="ttl", at=NOW))
    state = run(running(), ExpireSession(reason="ttl", at=NOW + timedelta(minutes=2)))
    assert (state.status, state.end_reason) == ("destroying", "ttl")
    state = run(running(), ExpireSession(reason="idle", at=NOW))
    assert (state.status, state.end_reason) == ("destroying", "idle")


def test_sandbox_events_out_of_order_are_refused():
    with pytest.raises(IllegalTransition):
        decide(requested(), RecordSandboxLost("x"))
    with pytest.raises(IllegalTransition):
        decide(running(), RecordSandboxStarted(1, 1))
    with pytest.raises(IllegalTransition):
        decide(requested(), RecordSessionDestroyed())
    with pytest.raises(IllegalTransition):
        decide(requested(), RecordSandboxAdopted(1, 1))


def test_exec_lifecycle_keeps_only_pending_execs():
    state = run(running(), RequestExec("e-1", "cd /tmp", 1000), RecordExecStarted("e-1"))
    assert dict(state.execs)["e-1"].status == "running"
    state = run(state, RecordExecFinished("e-1", exit_code=0, cwd="/tmp", duration_ms=3))
    assert state.execs == {} and state.cwd == "/tmp"
    assert (state.exec_count, state.finished_count) == (1, 1)
    state = run(state, RequestExec("e-2", "sleep 9", 1000), RecordExecLost("e-2", reason="runner died"))
    assert state.execs == {} and (state.exec_count, state.lost_count) == (2, 1)


def test_exec_may_finish_without_started_and_after_sandbox_lost():
    state = run(running(), RequestExec("e-1", "true", 1000), RecordSandboxLost("gone"))
    state = run(state, RecordExecFinished("e-1", exit_code=0))
    assert state.execs == {}


def test_exec_rules():
    state = run(running(), RequestExec("e-1", "ls", 1000, idempotency_key="k1"))
    with pytest.raises(IllegalTransition, match="exec id e-1 already exists"):
        decide(state, RequestExec("e-1", "ls", 1000))
    with pytest.raises(IllegalTransition, match="exec id e-9 already exists"):
        decide(state, RequestExec("e-9", "ls", 1000), prior=PriorExecs(exec_id_taken=True))
    with pytest.raises(IllegalTransition, match="not pending"):
        decide(state, RecordExecFinished("e-2", exit_code=0))
    with pytest.raises(IllegalTransition, match="already running"):
        decide(run(state, RecordExecStarted("e-1")), RecordExecStarted("e-1"))
    finished = run(state, RecordExecFinished("e-1", exit_code=0))
    with pytest.raises(IllegalTransition, match="not pending"):
        decide(finished, RecordExecLost("e-1", "late"))
    with pytest.raises(IllegalTransition, match="session is requested"):
        decide(requested(), RequestExec("e-3", "ls", 1000))


def test_duplicate_idempotency_key_names_the_existing_exec():
    state = run(running(), RequestExec("e-1", "ls", 1000, idempotency_key="k1"))
    with pytest.raises(DuplicateIdempotencyKey) as pending:
        decide(state, RequestExec("e-2", "ls", 1000, idempotency_key="k1"))
    assert pending.value.exec_id == "e-1"
    assert isinstance(pending.value, IllegalTransition)
    finished = run(state, RecordExecFinished("e-1", exit_code=0))
    with pytest.raises(DuplicateIdempotencyKey) as earlier:
        decide(finished, RequestExec("e-2", "ls", 1000, idempotency_key="k1"), prior=PriorExecs(key_exec_id="e-1"))
    assert earlier.value.exec_id == "e-1"


def test_destroyed_and_failed_lose_pending_execs():
    state = run(running(), RequestExec("e-1", "sleep 100", 1000), RequestDestroy())
    events = decide(state, RecordSessionDestroyed())
    assert [e.type for e in events] == ["exec.lost", "session.destroyed"]
    state = run(state, RecordSessionDestroyed())
    assert state.execs == {} and state.lost_count == 1
    lost = run(running(), RequestExec("e-2", "sleep 100", 1000), RecordSandboxLost("x"))
    assert [e.type for e in decide(lost, RecordSandboxFailed("cannot recreate"))] == ["exec.lost", "sandbox.failed"]


def test_version_counts_events():
    state = run(running(), RequestExec("e-1", "ls", 1000), RecordExecStarted("e-1"), RecordExecFinished("e-1", 0))
    assert state.version == 5


def test_workspace_create_delete_recreate():
    state = run(None, CreateWorkspace("w1"))
    assert isinstance(state, WorkspaceState) and state.status == "active"
    with pytest.raises(IllegalTransition):
        decide(state, CreateWorkspace("w1"))
    state = run(state, DeleteWorkspace("w1"))
    assert state.status == "deleted"
    with pytest.raises(WorkspaceNotFound):
        decide(state, DeleteWorkspace("w1"))
    with pytest.raises(WorkspaceNotFound):
        decide(None, DeleteWorkspace("w2"))
    assert run(state, CreateWorkspace("w1")).status == "active"


def test_upcast_lifts_old_payloads_step_by_step():
    register_upcaster("test.thing", 1, lambda p: {**p, "b": 2})
    register_upcaster("test.thing", 2, lambda p: {**p, "c": p["b"] + 1})
    try:
        assert upcast("test.thing", 1, {"a": 1}) == (3, {"a": 1, "b": 2, "c": 3})
        assert upcast("exec.started", 1, {"exec_id": "e"}) == (1, {"exec_id": "e"})
    finally:
        UPCASTERS.pop(("test.thing", 1))
        UPCASTERS.pop(("test.thing", 2))
