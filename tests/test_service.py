"""The service layer (`sandkasten.service`) as the CLI uses it, with no daemon: intents are
journaled and stay queued, nothing waits; and polling waits for what a daemon journals.
Then, against a real daemon: a workspace delete goes through the journal, and the executor
(not the HTTP handler) removes the directory, also after a crash in between."""

from __future__ import annotations

import asyncio
import json
import signal
from datetime import UTC, datetime, timedelta

import pytest

from sandkasten import config
from sandkasten.domain import commands as c
from sandkasten.domain.session import DuplicateIdempotencyKey
from sandkasten.errors import SessionNotFound, SessionNotRunning
from sandkasten.service import Caller, Polling, Sessions
from sandkasten.store.journal import Journal

CLI = Caller("cli")
SID = "s-0123456789ab"


def run_with_journal(tmp_path, work, alive=lambda: False):
    cfg = config.load(None, env={"SANDKASTEN_DATA_DIR": str(tmp_path / "data")})
    cfg.data_dir.mkdir(parents=True, exist_ok=True)

    async def go():
        journal = await Journal.open(cfg.journal_target)
        try:
            return await work(journal, Sessions(cfg, journal, Polling(journal, alive, wait_s=5)))
        finally:
            await journal.close()

    return asyncio.run(go())


def started(sid: str = SID) -> list[tuple[c.Command, str]]:
    return [(c.RequestSession(image="base", expires_at=datetime.now(UTC) + timedelta(hours=1)), "api"),
            (c.RecordSandboxStarted(pid=4242, start_time=1), "executor")]


def test_with_no_daemon_intents_are_queued_and_nothing_waits(tmp_path):
    async def work(journal, sessions: Sessions):
        cmd = c.RequestSession(image="base", expires_at=datetime.now(UTC) + timedelta(hours=1))
        created = await sessions.create(cmd, CLI)
        assert created["status"] == "requested"
        with pytest.raises(SessionNotRunning, match="the session is requested"):   # not running yet
            await sessions.submit_exec(created["id"], lambda: {"cmd": "ls"}, None, CLI)

        for command, actor in started():
            await journal.execute(SID, command, actor=actor)
        first = await sessions.submit_exec(SID, lambda: {"cmd": "ls"}, "k1", CLI)
        assert first.requested is not None
        row, deferred = await sessions.settled_exec(SID, first)   # nobody runs it: returns at once
        assert (row["status"], row["cmd"], deferred) == ("requested", "ls", False)
        retry = await sessions.submit_exec(SID, lambda: {"cmd": "ls"}, "k1", CLI)
        assert (retry.exec_id, retry.requested) == (first.exec_id, None)   # idempotent: nothing journaled
        with pytest.raises(DuplicateIdempotencyKey, match="different cmd"):
            await sessions.submit_exec(SID, lambda: {"cmd": "rm -rf /"}, "k1", CLI)

        await sessions.destroy(SID, "cli", CLI)
        await sessions.destroy(SID, "cli", CLI)   # again: idempotent
        assert (await journal.session(SID))["status"] == "destroying"
        with pytest.raises(SessionNotFound, match="unable to remove session 's-nope': no such session"):
            await sessions.request_destroy("s-nope", "cli", CLI, verb="remove")
        events = await journal.events(after_seq=0, stream_id=SID, limit=100)
        return [(e.type, e.actor) for e in events]

    assert run_with_journal(tmp_path, work) == [
        ("session.requested", "api"), ("sandbox.started", "executor"), ("exec.requested", "cli"),
        ("session.destroy_requested", "cli")]


def test_polling_waits_for_what_the_daemon_journals(tmp_path):
    async def work(journal, sessions: Sessions):
        for command, actor in started():
            await journal.execute(SID, command, actor=actor)
        submitted = await sessions.submit_exec(SID, lambda: {"cmd": "echo hi"}, None, CLI)

        async def daemon_finishes_it():
            await asyncio.sleep(0.3)
            await journal.execute(SID, c.RecordExecFinished(exec_id=submitted.exec_id, exit_code=7, cwd="/tmp"),
                                  actor="executor")

        finishing = asyncio.ensure_future(daemon_finishes_it())
        row, _ = await sessions.settled_exec(SID, submitted)
        await finishing
        return row

    row = run_with_journal(tmp_path, work, alive=lambda: True)
    assert (row["status"], row["exit_code"], row["cwd"]) == ("finished", 7, "/tmp")


def test_workspace_delete_is_journaled_and_the_executor_removes_it(daemon):
    c_ = daemon.client
    assert c_.post("/v1/workspaces/doomed/fs/write", json={"path": "a.txt", "text": "a"}).status_code == 200
    assert c_.delete("/v1/workspaces/doomed").json() == {"ok": True, "destroyed_sessions": []}
    assert not (daemon.data_dir / "workspaces" / "doomed").exists()
    out = daemon.cli("audit", "export")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["kind"] for r in rows if r["session"] == "ws:doomed"] == ["file"]   # the write is audited
    events = asyncio.run(_events(daemon, "ws:doomed"))
    assert [t for t, _ in events] == ["workspace.created", "file.written", "workspace.deleted"]
    assert events[-1][1].startswith("api:")

    # a crash after `workspace.deleted` was journaled, before the directory went: the next start removes it
    assert c_.post("/v1/workspaces/left/fs/write", json={"path": "b.txt", "text": "b"}).status_code == 200
    daemon.kill(signal.SIGTERM)
    asyncio.run(_append(daemon, "ws:left", c.DeleteWorkspace(workspace_id="left")))
    assert (daemon.data_dir / "workspaces" / "left" / "b.txt").exists()
    daemon.start()
    for _ in range(100):
        if not (daemon.data_dir / "workspaces" / "left").exists():
            break
        asyncio.run(asyncio.sleep(0.05))
    assert not (daemon.data_dir / "workspaces" / "left").exists()
    assert "left" not in [w["id"] for w in c_.get("/v1/workspaces").json()]


async def _events(daemon, stream: str) -> list[tuple[str, str]]:
    journal = await Journal.open(daemon.data_dir / "sandkasten.db")
    try:
        return [(e.type, e.actor) for e in await journal.events(after_seq=0, stream_id=stream, limit=100)]
    finally:
        await journal.close()


async def _append(daemon, stream: str, command) -> None:
    journal = await Journal.open(daemon.data_dir / "sandkasten.db")
    try:
        await journal.execute(stream, command, actor="api")
    finally:
        await journal.close()
