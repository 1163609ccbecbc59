"""What only the PostgreSQL journal has: its trigger, tampering seen by verify, the append
lock and NOTIFY, both drivers, migrations, and a clear error for a server that is not there.
The tests shared with SQLite are in test_journal.py (parametrised over both backends)."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import psycopg
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from sandkasten.domain import RecordSandboxStarted, RequestExec, RequestSession
from sandkasten.domain.host import PlaceSession
from sandkasten.errors import IllegalTransition, JournalError
from sandkasten.store import postgres, schema
from sandkasten.store.journal import Journal
from tests.pg import free_port

pytestmark = pytest.mark.anyio
EXPIRES = datetime.now(timezone.utc) + timedelta(hours=1)


@pytest.fixture
def anyio_backend():
    return "asyncio"


def raw(url: str) -> psycopg.Connection:
    return psycopg.connect(sa.engine.make_url(url).set(drivername="postgresql").render_as_string(False))


async def start_session(j: Journal, sid: str) -> None:
    await j.execute(sid, RequestSession(image="busybox", expires_at=EXPIRES), actor="api")
    await j.execute(sid, RecordSandboxStarted(pid=1, start_time=1), actor="executor")
    await j.execute(sid, RequestExec(f"e-{sid}", "echo hi", 1000), actor="api")


async def test_trigger_refuses_update_and_delete(pg_database):
    j = await Journal.open(pg_database)
    try:
        await start_session(j, "s-1")
    finally:
        await j.close()
    with raw(pg_database) as conn:
        with pytest.raises(psycopg.errors.RaiseException, match="events are append-only"):
            conn.execute("UPDATE events SET actor = 'mallory' WHERE seq = 1")
        conn.rollback()
        with pytest.raises(psycopg.errors.RaiseException, match="events are append-only"):
            conn.execute("DELETE FROM events WHERE seq = 2")


async def test_verify_names_the_tampered_event(pg_database):
    j = await Journal.open(pg_database)
    try:
        await start_session(j, "s-1")
        with raw(pg_database) as conn:
            conn.execute("ALTER TABLE events DISABLE TRIGGER events_no_update")
            conn.execute("""UPDATE events SET payload = replace(payload, '"echo hi"', '"rm -rf /"') WHERE seq = 3""")
        result = await j.verify()
        assert (result.ok, result.first_bad_seq, result.checked) == (False, 3, 2)
        assert "hash" in result.reason
    finally:
        await j.close()


async def test_asyncpg_url_reads_what_psycopg_wrote(pg_server):
    url = pg_server.database(driver="asyncpg")
    j = await Journal.open(url)
    try:
        await start_session(j, "s-1")
        assert (await j.session("s-1"))["status"] == "running"
        assert [e.seq for e in await j.events()] == [1, 2, 3]
        assert (await j.verify()).ok
    finally:
        await j.close()


async def test_an_append_wakes_a_listener_saying_who_appended_and_whose_work_it_is(pg_database):
    j = await Journal.open(pg_database)
    seen: list[str] = []
    try:
        async with postgres.notifications(pg_database) as wait:
            assert await wait(0.2) is False  # nothing committed yet
            task = asyncio.ensure_future(wait(10))
            await asyncio.sleep(0.1)
            await j.execute("s-1", RequestSession(image="busybox", expires_at=EXPIRES), actor="api")
            assert await asyncio.wait_for(task, 10) is True
            j.fence = ("b", 1)  # a cluster host's journal
            await j.execute("s-1", PlaceSession(host_id="c", epoch=2), actor="host:b")
            assert await wait(10, lambda p: seen.append(p) or p.startswith("b|")) is True
            with pytest.raises(IllegalTransition):  # refused: rolled back, nobody is woken
                await j.execute("s-1", PlaceSession(host_id="d", epoch=2), actor="host:b")
            assert await wait(0.3) is False
    finally:
        await j.close()
    assert seen == ["b|c"]  # appended by b, a session placed on c: c's executor acts on it


async def test_a_held_append_lock_makes_writers_wait_not_fork_the_chain(pg_database):
    """Another transaction holding the append lock: our append waits for it (it does not read
    a stale head and fork the chain), then goes through once it is released."""
    j = await Journal.open(pg_database)
    try:
        await start_session(j, "s-1")
        with raw(pg_database) as holder:
            holder.execute(f"SELECT pg_advisory_xact_lock({postgres.APPEND_LOCK})")
            task = asyncio.ensure_future(j.execute("s-1", RequestExec("e-2", "ls", 1000), actor="api"))
            await asyncio.sleep(0.5)
            assert not task.done()
            holder.rollback()  # releases the lock
            [event] = await asyncio.wait_for(task, 10)
        assert event.seq == 4 and (await j.verify()).ok
    finally:
        await j.close()


async def test_unreachable_server_gives_journal_error_without_the_password():
    url = f"postgresql+psycopg://sk:s3cret@127.0.0.1:{free_port()}/nothing"
    with pytest.raises(JournalError) as info:
        await Journal.open(url)
    assert "unable to migrate journal postgresql+psycopg://sk:***@127.0.0.1" in info.value.message
    assert "s3cret" not in info.value.message
    with pytest.raises(JournalError, match="unable to open journal") as info:
        Journal.check(url)
    assert "s3cret" not in info.value.message


def test_migrated_database_equals_the_models(pg_database):
    postgres.upgrade(pg_database)
    postgres.upgrade(pg_database)  # repeatable
    engine = sa.create_engine(postgres.urls(pg_database)[0])
    try:
        with engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), schema.metadata) == []
            version = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
            assert version == schema.HEAD_REVISION
    finally:
        engine.dispose()
