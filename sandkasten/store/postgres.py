"""The journal in PostgreSQL: one shared journal for several hosts (a cluster).

Who uses this: `Journal.open`/`Journal.check` when the journal target is a
`postgresql://`, `postgresql+psycopg://` or `postgresql+asyncpg://` URL (config
`journal.url` or `database_url`). The journal code is the same SQLAlchemy Core as on SQLite;
what differs lives here:

- **Appends serialise across daemons.** Every write transaction first takes one
  transaction-scoped advisory lock (`pg_advisory_xact_lock(APPEND_LOCK)`), then reads the head
  of the journal and assigns `seq = head + 1` under that lock, so the hash chain stays one line
  whichever host writes. It is PostgreSQL's counterpart of SQLite's `BEGIN IMMEDIATE`.
- **Followers are woken, not polling.** The same transaction runs `NOTIFY sandkasten_events`,
  which PostgreSQL delivers to every `LISTEN`er when (and only if) it commits.
- **Migrations take turns** on a session-level advisory lock (PostgreSQL has transactional DDL,
  so alembic's whole upgrade commits or not at all).
- Writes and reads go through psycopg (sync), on the journal's writer and reader threads
  (an `asyncpg` URL names the same database).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any
from collections.abc import AsyncIterator, Callable

import sqlalchemy as sa
from sqlalchemy.engine import make_url

log = logging.getLogger("sandkasten.store.postgres")

APPEND_LOCK = 0x5A4B_0001       # pg_advisory_xact_lock key of every journal write
MIGRATE_LOCK = 0x5A4B_0002      # pg_advisory_lock key of `alembic upgrade`
CHANNEL = "sandkasten_events"
_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg", "postgresql+asyncpg", "postgresql+psycopg2")


def is_url(target: Any) -> bool:
    return isinstance(target, str) and target.split("://", 1)[0] in _SCHEMES and "://" in target


def urls(target: str) -> tuple[str, str]:
    """(sync URL for psycopg, async URL for the driver asked for) of a journal URL."""
    url = make_url(target.replace("postgres://", "postgresql://", 1) if target.startswith("postgres://") else target)
    sync = url.set(drivername="postgresql+psycopg")
    driver = url.drivername.split("+", 1)[1] if "+" in url.drivername else "psycopg"
    asyn = url.set(drivername="postgresql+asyncpg" if driver == "asyncpg" else "postgresql+psycopg")
    return sync.render_as_string(hide_password=False), asyn.render_as_string(hide_password=False)


def label(target: str) -> str:
    """The URL as shown in messages: the password hidden."""
    try:
        return make_url(target).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return target


def engines(target: str) -> tuple[sa.Engine, sa.Engine]:
    """(writer engine, reader engine), both sync (psycopg), each used by one thread."""
    sync_url, _ = urls(target)
    writer = sa.create_engine(sync_url, poolclass=sa.pool.StaticPool)
    reader = sa.create_engine(sync_url, pool_size=1, max_overflow=2, pool_pre_ping=True)
    sa.event.listen(writer, "begin", _serialise_appends)
    return writer, reader


def _serialise_appends(conn: sa.Connection) -> None:
    """First statement of every write transaction: wait for the journal's one append lock
    (released by commit or rollback)."""
    conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({APPEND_LOCK})")


_NOTIFY = sa.text("SELECT pg_notify(:channel, :payload)")


def notify(conn: sa.Connection, appender: str, owner: str) -> None:
    """Inside an append's transaction: wake the followers when (and only if) it commits.
    The payload says who appended (a host id; "" for a CLI) and whose work it may be: the host
    the stream's session is placed on, "" for a session nobody has placed yet, "-" for streams
    no executor acts on (hosts, workspaces). Identical payloads in one transaction collapse."""
    conn.execute(_NOTIFY, {"channel": CHANNEL, "payload": f"{appender}|{owner}"})


def upgrade(target: str) -> None:
    """`alembic upgrade head`, one process at a time (blocking: call it from a thread)."""
    from alembic import command

    from sandkasten.store import schema

    engine = sa.create_engine(urls(target)[0], poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(f"SELECT pg_advisory_lock({MIGRATE_LOCK})")
            conn.commit()
            try:
                if _revision(conn) != schema.HEAD_REVISION:
                    cfg = schema.alembic_config(urls(target)[0])
                    cfg.attributes["connection"] = conn
                    command.upgrade(cfg, "head")
                    conn.commit()
            finally:
                conn.exec_driver_sql(f"SELECT pg_advisory_unlock({MIGRATE_LOCK})")
                conn.commit()
    finally:
        engine.dispose()


def _revision(conn: sa.Connection) -> str | None:
    if not sa.inspect(conn).has_table("alembic_version"):
        conn.rollback()
        return None
    row = conn.exec_driver_sql("SELECT version_num FROM alembic_version").first()
    conn.rollback()
    return row[0] if row else None


def check(target: str) -> None:
    """Blocking preflight: migrate and read the events table once."""
    upgrade(target)
    engine = sa.create_engine(urls(target)[0], poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT count(*) FROM events").scalar()
    finally:
        engine.dispose()


@contextlib.asynccontextmanager
async def notifications(target: str) -> AsyncIterator[Callable[..., Any]]:
    """LISTEN on the journal's channel; yields `wait(timeout, wanted=None) -> bool`: True once
    an append committed whose payload ("appender|owner", see `notify`) `wanted` accepts (any,
    without it), False at the timeout. The caller re-reads the journal on True: a missed
    notification costs only latency until the next timeout."""
    import psycopg

    dsn = make_url(urls(target)[0]).set(drivername="postgresql")
    conn = await psycopg.AsyncConnection.connect(dsn.render_as_string(hide_password=False), autocommit=True)
    try:
        await conn.execute(f"LISTEN {CHANNEL}")

        async def wait(timeout: float, wanted: Callable[[str], bool] | None = None) -> bool:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while (left := deadline - loop.time()) > 0:
                async for note in conn.notifies(timeout=left, stop_after=1):
                    if wanted is None or wanted(note.payload):
                        return True
            return False

        yield wait
    finally:
        await conn.close()
