"""The journal on real SQLite files and a real PostgreSQL server: appends, read tables, chain,
replay, processes, locks. Tests taking `journal` run once per backend (`journal_target`)."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import textwrap
from datetime import datetime, timedelta, timezone

import pytest

from sandkasten.store import schema

from sandkasten.domain import (
    CreateWorkspace,
    DeleteWorkspace,
    DuplicateIdempotencyKey,
    ExpireSession,
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
    workspace_stream,
)
from sandkasten.errors import IllegalTransition, InvalidRequest, JournalError, SessionNotFound
from sandkasten.store.journal import GENESIS_HASH, Journal

pytestmark = pytest.mark.anyio
EXPIRES = datetime.now(timezone.utc) + timedelta(hours=1)


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
async def journal(journal_target):
    j = await Journal.open(journal_target)
    yield j
    await j.close()


@pytest.fixture
async def sqlite_journal(tmp_path):
    """For what only a SQLite file has (raw sqlite3 access to the file)."""
    j = await Journal.open(tmp_path / "state" / "sandkasten.db")
    yield j
    await j.close()


async def start_session(j: Journal, sid: str, **kw) -> None:
    await j.execute(sid, RequestSession(image="busybox", expires_at=EXPIRES, **kw), actor="api", request_id="r-1")
    await j.execute(sid, RecordSandboxStarted(pid=4242, start_time=777, cgroup=f"sandkasten/{sid}"), actor="reconciler")


async def run_exec(j: Journal, sid: str, eid: str, cwd: str = "/workspace", key: str | None = None) -> None:
    await j.execute(sid, RequestExec(eid, f"echo {eid}", 5000, idempotency_key=key), actor="key-1")
    await j.execute(sid, RecordExecStarted(eid), actor="executor")
    await j.execute(sid, RecordExecFinished(eid, 0, cwd, 12, 5, 0, "ab" * 32), actor="executor")


async def test_open_creates_parent_dir_and_wal(tmp_path):
    path = tmp_path / "a" / "b" / "j.db"
    j = await Journal.open(path, durability="full")
    await j.close()
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("SELECT version_num FROM alembic_version").fetchone()[0] == schema.HEAD_REVISION
    j = await Journal.open(path)  # second open: already at head
    assert await j.last_seq() == 0
    await j.close()


async def test_durability_full_commits_with_synchronous_full_off_the_loop(tmp_path):
    for durability, level in (("normal", 1), ("full", 2)):   # PRAGMA synchronous: NORMAL = 1, FULL = 2
        j = await Journal.open(tmp_path / f"{durability}.db", durability=durability)
        try:
            group = j._db.group
            assert group.conn.execute("PRAGMA synchronous").fetchone()[0] == level
            assert group.inline is (durability == "normal")   # an fsync never runs on the event loop
            await start_session(j, "s-1")
            assert group.commits == 2
        finally:
            await j.close()


async def test_bad_durability_is_refused(tmp_path):
    with pytest.raises(JournalError, match="durability"):
        await Journal.open(tmp_path / "j.db", durability="sometimes")


async def test_append_updates_read_tables(journal):
    await start_session(journal, "s-1", workspace_id="w1")
    recorded = await journal.execute("s-1", RequestExec("e-1", "cd /tmp", 5000), actor="key-1", request_id="r-2")
    assert [(e.seq, e.stream_version, e.type, e.actor, e.request_id) for e in recorded] == [
        (3, 3, "exec.requested", "key-1", "r-2")
    ]
    await journal.execute("s-1", RecordExecStarted("e-1"), actor="executor")
    await journal.execute("s-1", RecordExecFinished("e-1", 0, "/tmp", 12, 5, 0, "ab" * 32), actor="executor")

    session = await journal.session("s-1")
    assert session["status"] == "running"
    assert (session["runner_pid"], session["runner_start_time"], session["cwd"]) == (4242, 777, "/tmp")
    assert (session["exec_count"], session["version"], session["workspace_id"]) == (1, 5, "w1")
    assert session["expires_at"] == EXPIRES.isoformat(timespec="microseconds")
    [row] = await journal.execs("s-1")
    assert (row["seq_no"], row["status"], row["exit_code"], row["cwd"], row["actor"]) == (1, "finished", 0, "/tmp", "key-1")
    assert row["started_at"] and row["finished_at"] and row["truncated"] is False
    assert await journal.exec("e-1") == row
    assert await journal.last_seq() == 5

    state = await journal.state("s-1")
    assert state.status == "running" and state.version == 5 and state.cwd == "/tmp"
    events = await journal.events()
    assert [e.seq for e in events] == [1, 2, 3, 4, 5]
    assert events[0].payload["image"] == "busybox" and events[0].created_at.endswith("+00:00")
    assert [e.seq for e in await journal.events(after_seq=3)] == [4, 5]
    assert [e.seq for e in await journal.events(stream_id="s-1", limit=2)] == [1, 2]


async def test_illegal_transition_appends_nothing(journal):
    await start_session(journal, "s-1")
    await journal.execute("s-1", RequestDestroy(reason="api"), actor="api")
    with pytest.raises(IllegalTransition, match="unable to request exec on session s-1: session is destroying"):
        await journal.execute("s-1", RequestExec("e-1", "ls", 1000), actor="api")
    with pytest.raises(SessionNotFound, match="s-none"):
        await journal.execute("s-none", RequestDestroy(), actor="api")
    assert await journal.last_seq() == 3
    assert await journal.exec("e-1") is None


async def test_idempotency_key_duplicate_names_the_recorded_exec(journal):
    await start_session(journal, "s-1")
    await run_exec(journal, "s-1", "e-1", key="k1")
    with pytest.raises(DuplicateIdempotencyKey) as info:
        await journal.execute("s-1", RequestExec("e-2", "ls", 1000, idempotency_key="k1"), actor="api")
    assert info.value.exec_id == "e-1"
    assert (await journal.exec_by_idempotency_key("s-1", "k1"))["id"] == "e-1"
    assert await journal.exec_by_idempotency_key("s-1", "k2") is None
    # the same key in another session is a different request
    await start_session(journal, "s-2")
    await journal.execute("s-2", RequestExec("e-2", "ls", 1000, idempotency_key="k1"), actor="api")


async def test_exec_ids_are_unique_across_sessions(journal):
    await start_session(journal, "s-1")
    await start_session(journal, "s-2")
    await run_exec(journal, "s-1", "e-1")
    with pytest.raises(IllegalTransition, match="exec id e-1 already exists"):
        await journal.execute("s-2", RequestExec("e-1", "ls", 1000), actor="api")


async def test_lists_for_ps_reconciler_and_workspaces(journal):
    await journal.execute(workspace_stream("w1"), CreateWorkspace("w1"), actor="api")
    await start_session(journal, "s-1", workspace_id="w1")
    await start_session(journal, "s-2")
    await journal.execute("s-1", RequestExec("e-1", "sleep 5", 9000), actor="api")
    await journal.execute("s-2", RequestDestroy(), actor="cli")
    await journal.execute("s-2", RecordSandboxStopped(), actor="reconciler")
    await journal.execute("s-2", RecordSessionDestroyed(), actor="reconciler")
    assert [s["id"] for s in await journal.sessions()] == ["s-1"]
    assert [s["id"] for s in await journal.sessions(include_ended=True)] == ["s-1", "s-2"]
    assert (await journal.session("s-2"))["ended_at"] is not None
    assert [e["id"] for e in await journal.pending_execs()] == ["e-1"]
    [ws] = await journal.workspaces()
    assert (ws["id"], ws["last_session_id"], ws["deleted_at"]) == ("w1", "s-1", None)
    await journal.execute(workspace_stream("w1"), DeleteWorkspace("w1"), actor="api")
    assert (await journal.workspaces())[0]["deleted_at"] is not None


async def test_a_workspace_made_for_a_session_names_it(journal):
    """The executor journals `workspace.created` after the session that asked for it."""
    await start_session(journal, "s-1", workspace_id="w-late")
    await journal.execute(workspace_stream("w-late"), CreateWorkspace("w-late"), actor="executor")
    [ws] = await journal.workspaces()
    assert (ws["id"], ws["last_session_id"]) == ("w-late", "s-1")
    live = await journal.snapshot_read_tables()
    await journal.rebuild()
    assert await journal.snapshot_read_tables() == live


async def test_a_refused_write_never_makes_a_concurrent_read_lose_the_stream(journal):
    """A refused append clears the state cache on the writer thread; a read folding events onto
    the cache at that moment once saw no state at all (the executor then skipped a destroy)."""
    await start_session(journal, "s-1")
    await journal.execute("s-1", RequestDestroy(), actor="api")

    async def refused() -> None:
        with pytest.raises(IllegalTransition):
            await journal.execute("s-1", RecordSandboxStarted(pid=1, start_time=1, cgroup="x"), actor="api")

    for _ in range(150):
        results = await asyncio.gather(*(journal.state("s-1") for _ in range(4)), refused(), refused())
        assert [s.status for s in results[:4]] == ["destroying"] * 4


async def test_chain_links_every_event(sqlite_journal):
    await start_session(sqlite_journal, "s-1")
    await run_exec(sqlite_journal, "s-1", "e-1")
    with sqlite3.connect(sqlite_journal.path) as raw:
        rows = raw.execute("SELECT seq, prev_hash, hash FROM events ORDER BY seq").fetchall()
    assert rows[0][1] == GENESIS_HASH
    for before, after in zip(rows, rows[1:]):
        assert after[1] == before[2]
    result = await sqlite_journal.verify()
    assert (result.ok, result.checked, result.first_bad_seq) == (True, 5, None)


async def test_trigger_refuses_update_and_delete(sqlite_journal):
    await start_session(sqlite_journal, "s-1")
    raw = sqlite3.connect(sqlite_journal.path)
    try:
        with pytest.raises(sqlite3.IntegrityError, match="events are append-only"):
            raw.execute("UPDATE events SET actor = 'mallory' WHERE seq = 1")
        with pytest.raises(sqlite3.IntegrityError, match="events are append-only"):
            raw.execute("DELETE FROM events WHERE seq = 2")
    finally:
        raw.close()


async def test_verify_names_the_tampered_event(sqlite_journal):
    await start_session(sqlite_journal, "s-1")
    await run_exec(sqlite_journal, "s-1", "e-1")
    raw = sqlite3.connect(sqlite_journal.path)
    try:
        raw.execute("DROP TRIGGER events_no_update")
        raw.execute("""UPDATE events SET payload = replace(payload, '"echo e-1"', '"rm -rf /"') WHERE seq = 3""")
        raw.commit()
    finally:
        raw.close()
    result = await sqlite_journal.verify()
    assert (result.ok, result.first_bad_seq, result.checked) == (False, 3, 2)
    assert "event 3" in result.reason and "hash" in result.reason


async def test_verify_notices_a_deleted_event(sqlite_journal):
    await start_session(sqlite_journal, "s-1")
    await run_exec(sqlite_journal, "s-1", "e-1")
    raw = sqlite3.connect(sqlite_journal.path)
    try:
        raw.execute("DROP TRIGGER events_no_delete")
        raw.execute("DELETE FROM events WHERE seq = 2")
        raw.commit()
    finally:
        raw.close()
    result = await sqlite_journal.verify()
    assert (result.ok, result.first_bad_seq) == (False, 3)
    assert "prev_hash" in result.reason


async def test_rebuild_equals_live_tables(journal):
    """A realistic life: workspaces, pooled and lost sandboxes, timeouts, expiry, destroy."""
    await journal.execute(workspace_stream("w1"), CreateWorkspace("w1"), actor="api")
    await journal.execute(workspace_stream("w2"), CreateWorkspace("w2"), actor="api")
    await start_session(journal, "s-1", workspace_id="w1", env={"A": "1"}, cpu_limit=0.5)
    await run_exec(journal, "s-1", "e-1", cwd="/tmp", key="k1")
    await run_exec(journal, "s-1", "e-2", cwd="/etc")
    await journal.execute("s-1", RecordSandboxLost("runner died"), actor="reconciler")
    await journal.execute("s-1", RecordSandboxStarted(pid=99, start_time=5, pooled=True), actor="reconciler")
    await journal.execute("s-1", RecordSandboxAdopted(pid=99, start_time=5), actor="reconciler")
    await journal.execute("s-1", RequestExec("e-3", "sleep 99", 100), actor="api")
    await journal.execute("s-1", RecordExecLost("e-3", "daemon restart"), actor="reconciler")
    await journal.execute("s-1", RequestExec("e-4", "sleep 99", 100), actor="api")
    await journal.execute("s-1", ExpireSession(reason="ttl", at=EXPIRES + timedelta(seconds=1)), actor="reconciler")
    await journal.execute("s-1", RecordSandboxStopped(), actor="reconciler")
    await journal.execute("s-1", RecordSessionDestroyed(), actor="reconciler")  # e-4 becomes lost
    await journal.execute("s-2", RequestSession(image="alpine", expires_at=EXPIRES), actor="cli")
    await journal.execute("s-2", RecordSandboxFailed("no such image"), actor="reconciler")
    await start_session(journal, "s-3", workspace_id="w2")
    await run_exec(journal, "s-3", "e-5")
    await journal.execute(workspace_stream("w1"), DeleteWorkspace("w1"), actor="cli")

    live = await journal.snapshot_read_tables()
    assert len(live["sessions"]) == 3 and len(live["execs"]) == 5 and len(live["workspaces"]) == 2
    assert {e["id"]: e["status"] for e in live["execs"]} == {
        "e-1": "finished", "e-2": "finished", "e-3": "lost", "e-4": "lost", "e-5": "finished"}
    count = await journal.rebuild()
    assert count == await journal.last_seq()
    assert await journal.snapshot_read_tables() == live
    assert (await journal.verify()).ok


async def test_cached_state_catches_up_with_another_writer(journal_target):
    a, b = await Journal.open(journal_target), await Journal.open(journal_target)
    try:
        await start_session(a, "s-1")
        await a.execute("s-1", RequestExec("e-1", "ls", 1000), actor="api")  # a caches s-1 at v3
        await run_exec(b, "s-1", "e-2")  # b appends v4..v6
        await a.execute("s-1", RecordExecFinished("e-1", 0), actor="api")  # a must catch up first
        state = await a.state("s-1")
        assert state.version == 7 and state.execs == {} and state.exec_count == 2
        assert (await a.verify()).ok
    finally:
        await a.close()
        await b.close()


WORKER = textwrap.dedent(
    """
    import asyncio, sys
    from datetime import datetime, timedelta, timezone
    from pathlib import Path
    from sandkasten.domain import RequestExec, RequestSession, RecordSandboxStarted
    from sandkasten.store.journal import Journal

    async def main(path, name, n):
        j = await Journal.open(path if "://" in path else Path(path))
        try:
            own = "s-" + name
            await j.execute(own, RequestSession(image="busybox", expires_at=datetime.now(timezone.utc) + timedelta(hours=1)), actor=name)
            await j.execute(own, RecordSandboxStarted(pid=1, start_time=1), actor=name)
            for i in range(n):
                await j.execute(own, RequestExec(f"{name}-own-{i}", "true", 1000), actor=name)
                await j.execute("s-shared", RequestExec(f"{name}-shared-{i}", "true", 1000), actor=name)
        finally:
            await j.close()

    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
    """
)


async def test_processes_append_concurrently(journal, journal_target):
    """Two processes on one SQLite file; three (as three daemons would) on one PostgreSQL
    database: the chain stays one line, every stream's versions stay dense."""
    await start_session(journal, "s-shared")
    n = 60
    names = ("p1", "p2") if journal.url is None else ("p1", "p2", "p3")
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(journal_target), name, str(n)], stderr=subprocess.PIPE)
        for name in names
    ]
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=240)
            assert proc.returncode == 0, err.decode()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stderr.close()
    k = len(names)
    assert await journal.last_seq() == 2 + k * (2 + 2 * n)
    assert [e.seq for e in await journal.events(limit=10_000)] == list(range(1, 3 + k * (2 + 2 * n)))
    shared = await journal.execs("s-shared")
    assert len(shared) == k * n and sorted(e["seq_no"] for e in shared) == list(range(1, k * n + 1))
    for name in names:
        assert len(await journal.execs(f"s-{name}")) == n
    versions = [e.stream_version for e in await journal.events(stream_id="s-shared", limit=10_000)]
    assert versions == list(range(1, k * n + 3))
    assert (await journal.verify()).ok
    live = await journal.snapshot_read_tables()
    await journal.rebuild()
    assert await journal.snapshot_read_tables() == live


async def test_locked_database_gives_journal_error(tmp_path):
    path = tmp_path / "j.db"
    j = await Journal.open(path, busy_timeout_s=0.2)
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        await start_session(j, "s-1")
        holder.execute("BEGIN EXCLUSIVE")
        with pytest.raises(JournalError, match="locked") as info:
            await j.execute("s-1", RequestExec("e-1", "ls", 1000), actor="api")
        assert str(path) in info.value.message
        holder.execute("ROLLBACK")
        await j.execute("s-1", RequestExec("e-1", "ls", 1000), actor="api")  # usable again
    finally:
        holder.close()
        await j.close()


async def test_corrupt_file_gives_journal_error(tmp_path):
    path = tmp_path / "j.db"
    path.write_bytes(b"this is not a database at all" * 200)
    with pytest.raises(JournalError, match="corrupt") as info:
        await Journal.open(path)
    assert str(path) in info.value.message


async def test_command_must_match_its_stream(journal):
    with pytest.raises(InvalidRequest):
        await journal.execute("s-1", RequestSession(image="busybox", expires_at=EXPIRES, session_id="s-2"), actor="api")
    with pytest.raises(InvalidRequest):
        await journal.execute("w1", CreateWorkspace("w1"), actor="api")
    assert await journal.last_seq() == 0


async def test_cancelled_caller_leaves_a_whole_append(journal):
    await start_session(journal, "s-1")
    task = asyncio.create_task(journal.execute("s-1", RequestExec("e-1", "ls", 1000), actor="api"))
    await asyncio.sleep(0)
    task.cancel()
    try:   # (an append made on the event loop at once may be whole before the cancel arrives)
        await task
    except asyncio.CancelledError:
        pass
    await journal.execute("s-1", RequestExec("e-2", "ls", 1000), actor="api")  # queued behind it
    state = await journal.state("s-1")
    assert state.version == await journal.last_seq()
    assert set(state.execs) in ({"e-2"}, {"e-1", "e-2"})
    assert len(await journal.execs("s-1")) == len(state.execs)
    assert (await journal.verify()).ok


async def test_concurrent_appends_share_commits_and_the_chain_stays_one_line(sqlite_journal):
    j = sqlite_journal
    sids = [f"s-g{i}" for i in range(8)]
    for sid in sids:
        await start_session(j, sid)
    commits = j._db.group.commits

    async def work(sid: str) -> None:
        for k in range(20):
            await j.execute(sid, RequestExec(f"{sid}-{k}", "true", 1000), actor="api")
            await j.execute_all(sid, [RecordExecStarted(f"{sid}-{k}"), RecordExecFinished(f"{sid}-{k}", 0)],
                                actor="executor")

    await asyncio.gather(*(work(sid) for sid in sids))
    appended = 8 * 20 * 2
    assert j._db.group.commits - commits < appended        # appends that came together shared a COMMIT
    events = await j.events(limit=10_000)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert (await j.verify()).ok
    for sid in sids:
        assert [e.stream_version for e in await j.events(stream_id=sid, limit=10_000)] == list(range(1, 2 + 60 + 1))
    live = await j.snapshot_read_tables()
    await j.rebuild()
    assert await j.snapshot_read_tables() == live


async def test_a_refused_append_in_a_batch_takes_only_itself_back(sqlite_journal):
    j = sqlite_journal
    await start_session(j, "s-1")
    await start_session(j, "s-2")
    await j.execute("s-2", RequestDestroy(reason="api"), actor="api")
    ok1, refused, ok2 = await asyncio.gather(
        j.execute("s-1", RequestExec("e-1", "ls", 1000), actor="api"),
        j.execute("s-2", RequestExec("e-2", "ls", 1000), actor="api"),   # the session is being destroyed
        j.execute("s-1", RequestExec("e-3", "ls", 1000), actor="api"), return_exceptions=True)
    assert isinstance(refused, IllegalTransition)
    assert [e.payload["exec_id"] for e in ok1 + ok2] == ["e-1", "e-3"]
    assert {e["id"] for e in await j.execs("s-1")} == {"e-1", "e-3"} and await j.execs("s-2") == []
    assert (await j.verify()).ok and (await j.state("s-1")).version == 4


async def test_an_end_deferred_behind_the_answer_is_written_on_flush(tmp_path):
    j = await Journal.open(tmp_path / "j.db")
    seen = []
    j.listeners.append(lambda recorded: seen.extend(e.type for e in recorded))
    try:
        await start_session(j, "s-1")
        await j.execute("s-1", RequestExec("e-1", "ls", 1000), actor="api")
        at = "2026-01-01T00:00:00.000001+00:00"
        future, planned = j.defer_all("s-1", [RecordExecStarted("e-1"), RecordExecFinished("e-1", 3, "/tmp")],
                                      actor="executor", at=at)
        assert [e.type for e in planned] == ["exec.started", "exec.finished"] and planned[-1].payload["exit_code"] == 3
        assert (await j.exec("e-1"))["status"] == "requested" and not future.done()
        j.flush()   # (an HTTP handler does this once its answer is out)
        recorded = await future
        assert [e.created_at for e in recorded] == [at, at]
        row = await j.exec("e-1")
        assert row["status"] == "finished" and row["exit_code"] == 3 and row["finished_at"] == at
        assert seen[-2:] == ["exec.started", "exec.finished"]
        # only where nothing can change the outcome: not for an exec that is not pending
        assert j.defer_all("s-1", [RecordExecFinished("e-1", 0)], actor="executor", at=at) is None
    finally:
        await j.close()
    full = await Journal.open(tmp_path / "full.db", durability="full")
    try:
        await start_session(full, "s-1")
        await full.execute("s-1", RequestExec("e-1", "ls", 1000), actor="api")
        assert full.defer_all("s-1", [RecordExecFinished("e-1", 0)], actor="executor", at=at) is None
    finally:
        await full.close()


async def test_lists_read_through_the_driver_equal_sqlalchemy_rows(journal):
    import sqlalchemy as sa

    from sandkasten.store import postgres
    from sandkasten.store.schema import sessions

    await start_session(journal, "s-1", env={"A": "1"}, readonly_rootfs=True)
    await start_session(journal, "s-2", pool=True)
    await run_exec(journal, "s-1", "e-1")

    def read_with_sqlalchemy() -> list[dict]:   # SQLAlchemy's own engine, rows and types
        url = postgres.urls(journal.url)[0] if journal.url else f"sqlite:///{journal.path}"
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        try:
            with engine.connect() as conn:
                query = sa.select(sessions).order_by(sessions.c.created_at, sessions.c.id)
                return [dict(row._mapping) for row in conn.execute(query)]
        finally:
            engine.dispose()

    rows = await asyncio.to_thread(read_with_sqlalchemy)
    assert await journal.sessions(include_ended=True) == rows
    assert rows[0]["env"] == {"A": "1"} and rows[0]["readonly_rootfs"] is True
    assert [r["id"] for r in await journal.sessions(include_pool=False)] == ["s-1"]
    assert [r["id"] for r in await journal.idle_pool()] == ["s-2"]
    assert await journal.session("s-1") == rows[0]
    assert [r["id"] for r in await journal.execs("s-1")] == ["e-1"] and await journal.pending_execs() == []
    assert await journal.processes("s-1") == [] and await journal.processes("s-1", include_ended=True) == []
    assert await journal.pending_processes() == [] and await journal.workspaces() == []
    assert await journal.hosts() == []


async def test_holdings_count_sessions_not_ended_and_their_memory(journal):
    """What admission counts: every session not ended (requested, running, lost, destroying),
    with the memory granted to it; failed and destroyed ones hold nothing."""
    assert await journal.holdings() == (0, 0)
    await journal.execute("s-req", RequestSession(image="busybox", mem_limit_mb=100, expires_at=EXPIRES), actor="api")
    await start_session(journal, "s-run", mem_limit_mb=200)
    await start_session(journal, "s-going", mem_limit_mb=400)
    await journal.execute("s-going", RequestDestroy(), actor="api")
    await journal.execute("s-failed", RequestSession(image="busybox", mem_limit_mb=800, expires_at=EXPIRES),
                          actor="api")
    await journal.execute("s-failed", RecordSandboxFailed(reason="no image"), actor="executor")
    await start_session(journal, "s-gone", mem_limit_mb=1600)
    await journal.execute("s-gone", RequestDestroy(), actor="api")
    await journal.execute("s-gone", RecordSessionDestroyed(), actor="executor")
    assert await journal.holdings() == (3, 700)
    live = [s for s in await journal.sessions()]
    assert (len(live), sum(s["mem_limit_mb"] for s in live)) == await journal.holdings()
