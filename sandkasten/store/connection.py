"""The one way the journal talks to its database: which connection, on which thread, in which
transaction; foreign errors become `JournalError` here (`Guard`).

Who uses this: `store.journal` opens a `SqliteDatabase` (one host) or a `PostgresDatabase` (a
cluster) and hands it to the event store, the command handler and the reads, which run their
statements (store/statements.py) on the connections it lends them. Nothing else opens the
journal's database, besides short-lived connections of their own for the preflight `check`
below, alembic's migrations (store/schema.py) and SQLite's page checks (store/integrity.py).

Which thread owns what, on SQLite (three connections, each with one owner at a time):

- the **write connection** belongs to whoever writes the current batch of the group commit
  (store/group_commit.py): the event loop (`durability: normal`, the write lock free) or the
  writer thread (an fsync, a busy lock, a large batch). The group commit writes one batch at a
  time — the loop starts none while one is on the thread, and takes over only once the
  thread's future is done — so the connection, `_data_version` and the command handler's open
  transaction (store/commands.py) are only ever touched by one thread at a time.
- the **point connection** is the event loop's alone: point reads and lists bounded by one
  session run right on the loop (a read in WAL mode never waits for a writer). It is made with
  `check_same_thread`, so a use from any other thread fails loudly instead of racing.
- the **reader connection** is the reader thread's alone (made there, `check_same_thread`):
  lists, verify, snapshots, and the passive WAL checkpoints (`_checkpoint`, asked for by the
  group commit on the loop; `_checkpointing` is a lock, not a flag, so its hand-over from the
  loop to the reader thread is safe).

On PostgreSQL the writer thread owns the writing connection (one write at a time: an asyncio
lock on the loop, one worker thread) and the reader thread a pooled engine; point reads run on
the reader thread too. Appends serialise across hosts by an advisory lock (store/postgres.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, TypeVar
from collections.abc import AsyncIterator, Callable, Iterator

import sqlalchemy as sa

from sandkasten.errors import JournalError, SandkastenError
from sandkasten.store import integrity, postgres, schema, statements
from sandkasten.store.group_commit import GroupCommit

T = TypeVar("T")
DURABILITIES = {"normal": "NORMAL", "full": "FULL"}
Work = Callable[[Any], T]   # work(conn): run on a connection this module lends


class Transactions(Protocol):
    """What the journal does at the edges of every write transaction (store/commands.py), on
    the thread that writes it."""

    def begin(self, others_wrote: bool) -> None:
        """After BEGIN: `others_wrote` — another process (or host) may have appended since
        this journal's last transaction."""

    def committed(self, ok: bool) -> None:
        """After COMMIT (ok) or ROLLBACK."""


class Database(Protocol):
    """Where the journal's SQL runs: SQLite (`SqliteDatabase`) or PostgreSQL (`PostgresDatabase`)."""

    path: Path | str       # the file, or the URL as shown (password hidden)
    url: str | None        # the PostgreSQL URL; None on SQLite
    guard: Guard

    async def write(self, action: str, work: Work[T], *, heavy: bool = False) -> T:
        """`work(conn)` inside a write transaction (between `Transactions.begin` and
        `committed`); errors translated. A cancelled caller does not cut the work short."""
        ...

    def deferrable(self) -> bool:
        """Whether a write queued until `flush` (or shortly after) would have the outcome it has
        now: no fsync owed, nothing queued ahead."""
        ...

    def defer(self, work: Work[T]) -> asyncio.Future[T]:
        """`work` queued until `flush` (or shortly after); only when `deferrable()`."""
        ...

    def flush(self) -> None: ...

    async def written(self) -> None:
        """Everything submitted so far is written."""
        ...

    async def read(self, action: str, fn: Work[T]) -> T:
        """`fn(conn)` on the reader thread in one read transaction; errors translated."""
        ...

    async def rows(self, stmt: sa.ClauseElement, params: dict[str, Any], *, inline: bool = True,
                   action: str = "read") -> list[Any]:
        """Rows of a long-lived statement: `inline` on the loop where that never waits (SQLite),
        else on the reader thread."""
        ...

    async def close(self) -> None: ...


# --- SQLite ---------------------------------------------------------------------------------

class SqliteDatabase:
    def __init__(self, path: Path, durability: str, busy_timeout_s: float, writer: sqlite3.Connection,
                 point: sqlite3.Connection, tx: Transactions) -> None:
        self.path: Path | str = path
        self.url: str | None = None
        self.guard = Guard(path, busy_timeout_s)
        self._tx = tx
        self._point = point                      # the event loop's
        self._data_version: int | None = None    # the writer's (whoever writes the current batch)
        self._reader = _ReaderThread(lambda: connect(path, busy_timeout_s, DURABILITIES[durability], shared=False),
                                     _sqlite_read_txn, _close_quietly)
        self._checkpointing = threading.Lock()
        self.group = GroupCommit(writer, inline=durability == "normal", busy_timeout_s=busy_timeout_s,
                                 begin=self._begin, committed=tx.committed, checkpoint=self._checkpoint)

    def _begin(self, conn: sqlite3.Connection) -> None:
        """First thing in every write transaction: has another process written since ours?"""
        version = conn.execute("PRAGMA data_version").fetchone()[0]
        others_wrote, self._data_version = version != self._data_version, version
        self._tx.begin(others_wrote)

    async def write(self, action: str, work: Work[T], *, heavy: bool = False) -> T:
        try:
            return await self.group.submit(work, heavy=heavy)
        except SandkastenError:
            raise
        except (sqlite3.Error, sa.exc.SQLAlchemyError, OSError) as exc:
            raise self.guard.error(action, exc) from exc

    def deferrable(self) -> bool:
        return self.group.inline and self.group.idle()

    def defer(self, work: Work[T]) -> asyncio.Future[T]:
        return self.group.submit(work, defer=True)

    def flush(self) -> None:
        self.group.flush()

    async def written(self) -> None:
        self.group.flush()
        await self.group.drain()

    async def read(self, action: str, fn: Work[T]) -> T:
        async with self.guard(action):
            return await self._reader.run(fn)

    async def rows(self, stmt: sa.ClauseElement, params: dict[str, Any], *, inline: bool = True,
                   action: str = "read") -> list[Any]:
        if not inline:
            return await self.read(action, lambda conn: statements.execute(conn, stmt, params))
        try:
            return statements.execute(self._point, stmt, params)
        except (sqlite3.Error, OSError) as exc:
            raise self.guard.error(action, exc) from exc

    def _checkpoint(self) -> None:
        """Copy the WAL back into the database on the reader thread (PASSIVE: writers go on).
        Called on the loop by the group commit; one at a time."""
        if not self._checkpointing.acquire(blocking=False):
            return

        def run() -> None:
            try:
                self._reader.on_thread(lambda conn: conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall(),
                                       transaction=False)
            except sqlite3.Error:
                pass   # the next one tries again; SQLite also checkpoints when the last connection closes
            finally:
                self._checkpointing.release()

        self._reader.submit(run)

    async def close(self) -> None:
        await self.group.drain()
        self.group.close()
        await self._reader.close()
        self._point.close()


async def open_sqlite(db_path: Path, durability: str, busy_timeout_s: float, tx: Transactions) -> SqliteDatabase:
    """Create the parent dir, migrate (alembic, in a thread, only when behind), connect."""
    guard = Guard(db_path, busy_timeout_s)
    _check_durability(db_path, durability)
    sync = DURABILITIES[durability]
    async with guard("migrate"):
        db_path.parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(schema.upgrade, db_path, busy_timeout_s)
        restrict(db_path)
        writer = connect(db_path, busy_timeout_s, sync, shared=True)
        writer.execute("PRAGMA wal_autocheckpoint = 0")   # checkpoints run off the commit path
        point = connect(db_path, busy_timeout_s, sync, shared=False)
    return SqliteDatabase(db_path, durability, busy_timeout_s, writer, point, tx)


def connect(db_path: Path, busy_timeout_s: float, sync: str, *, shared: bool) -> sqlite3.Connection:
    """A driver connection of our own: autocommit (we say BEGIN), WAL, our pragmas. Not
    `shared`: usable only on the thread that made it."""
    conn = sqlite3.connect(db_path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=not shared)
    cursor = conn.cursor()
    for pragma in (f"busy_timeout = {int(busy_timeout_s * 1000)}", "journal_mode = WAL", "foreign_keys = ON",
                   f"synchronous = {sync}"):
        cursor.execute(f"PRAGMA {pragma}")
    cursor.close()
    return conn


@contextlib.contextmanager
def _sqlite_read_txn(conn: sqlite3.Connection) -> Iterator[None]:
    conn.execute("BEGIN")
    yield
    conn.execute("COMMIT")


def _close_quietly(conn: sqlite3.Connection) -> None:
    with contextlib.suppress(sqlite3.Error):
        conn.close()


def restrict(db_path: Path) -> None:
    """The journal holds every command, its actor and the sessions' env: owner-only, like its
    WAL and shared-memory files (SQLite gives new ones the database file's mode)."""
    for path in (db_path, db_path.with_name(db_path.name + "-wal"), db_path.with_name(db_path.name + "-shm")):
        try:
            os.chmod(path, 0o600)
        except (FileNotFoundError, PermissionError):  # not there yet; or not ours to change
            pass


def check(db_path: Path | str, busy_timeout_s: float = 10.0, full: bool = True) -> None:
    """Blocking preflight (see `Journal.check`): migrate, read once, let SQLite check every page."""
    if postgres.is_url(db_path):
        try:
            postgres.check(str(db_path))
        except (sa.exc.SQLAlchemyError, OSError) as exc:
            where = postgres.label(str(db_path))
            raise JournalError(f"unable to open journal {where}: {Guard(where, busy_timeout_s).cause(exc)}",
                               path=where) from None
        return
    db_path = Path(db_path).absolute()
    try:
        db_path.parent.mkdir(parents=True, exist_ok=True)
        schema.upgrade(db_path, busy_timeout_s)
        restrict(db_path)
        conn = sqlite3.connect(db_path, timeout=busy_timeout_s)
        try:
            conn.execute("SELECT seq FROM events ORDER BY seq DESC LIMIT 1").fetchone()   # O(log n)
        finally:
            conn.close()
    except (sa.exc.SQLAlchemyError, sqlite3.Error, OSError) as exc:
        cause = Guard(db_path, busy_timeout_s).cause(exc)
        raise JournalError(f"unable to open journal {db_path}: {cause}", path=str(db_path)) from None
    found = integrity.problems(db_path, full=full, busy_timeout_s=busy_timeout_s)
    if found:
        raise JournalError(f"unable to open journal {db_path}: the file is damaged ({integrity.summary(found)}); "
                           f"with the daemon stopped, `sandkasten journal rebuild` rebuilds the read tables "
                           f"and every index, else restore a backup", path=str(db_path), problems=found)


# --- PostgreSQL -----------------------------------------------------------------------------

class PostgresDatabase:
    def __init__(self, url: str, busy_timeout_s: float, writer: sa.Engine, reader: sa.Engine,
                 tx: Transactions) -> None:
        self.url: str | None = url
        self.path: Path | str = postgres.label(url)
        self.guard = Guard(self.path, busy_timeout_s)
        self._tx = tx
        self._writer = writer
        self._writer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal-writer")
        self._writer_conn: sa.Connection | None = None     # the writer thread's
        self._write_lock = asyncio.Lock()                   # the loop's: one write at a time
        self._reader_engine = reader
        self._reader = _ReaderThread(reader.connect, lambda conn: conn.begin(), lambda conn: conn.invalidate())

    async def write(self, action: str, work: Work[T], *, heavy: bool = False) -> T:
        def call() -> T:
            if self._writer_conn is None:
                self._writer_conn = self._writer.connect()
            conn = self._writer_conn
            try:
                with conn.begin():        # (its first statement takes the append lock: store/postgres.py)
                    self._tx.begin(True)  # another host may have appended at any time
                    result = work(conn)
            except BaseException:
                if conn.in_transaction():
                    conn.rollback()
                self._tx.committed(False)
                raise
            self._tx.committed(True)
            return result

        async with self._write_lock, self.guard(action):
            return await asyncio.shield(asyncio.get_running_loop().run_in_executor(self._writer_thread, call))

    def deferrable(self) -> bool:
        return False   # (a commit here is a round trip to the server either way)

    def defer(self, work: Work[T]) -> asyncio.Future[T]:
        raise NotImplementedError("unable to defer a write to a PostgreSQL journal: it is never deferrable")

    def flush(self) -> None:
        pass

    async def written(self) -> None:
        pass

    async def read(self, action: str, fn: Work[T]) -> T:
        async with self.guard(action):
            return await self._reader.run(fn)

    async def rows(self, stmt: sa.ClauseElement, params: dict[str, Any], *, inline: bool = True,
                   action: str = "read") -> list[Any]:
        return await self.read(action, lambda conn: statements.execute(conn, stmt, params))

    async def close(self) -> None:
        await self._reader.close()
        self._reader_engine.dispose()

        def close_writer() -> None:
            if self._writer_conn is not None:
                self._writer_conn.close()
            self._writer.dispose()

        await asyncio.get_running_loop().run_in_executor(self._writer_thread, close_writer)
        self._writer_thread.shutdown(wait=True)


async def open_postgres(url: str, durability: str, busy_timeout_s: float, tx: Transactions) -> PostgresDatabase:
    """The shared journal of a cluster: migrated (one host at a time), then connected.
    Durability is the server's (synchronous_commit)."""
    where = postgres.label(url)
    _check_durability(where, durability)
    async with Guard(where, busy_timeout_s)("migrate"):
        await asyncio.to_thread(postgres.upgrade, url)
    writer, reader = postgres.engines(url)
    return PostgresDatabase(url, busy_timeout_s, writer, reader, tx)


# --- the reader thread ----------------------------------------------------------------------

class _ReaderThread:
    """One thread and the one connection only it uses (made lazily there; after an error
    dropped and made anew)."""

    def __init__(self, connect: Callable[[], Any], transaction: Callable[[Any], contextlib.AbstractContextManager],
                 discard: Callable[[Any], None]) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal-reader")
        self._connect, self._transaction, self._discard = connect, transaction, discard
        self._conn: Any = None   # touched only on the reader thread

    async def run(self, fn: Work[T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.on_thread, fn)

    def submit(self, fn: Callable[[], None]) -> Future:
        return self._pool.submit(fn)

    def on_thread(self, fn: Work[T], transaction: bool = True) -> T:
        """(On the reader thread.) `fn(conn)`, in one read transaction unless told otherwise."""
        conn = self._conn
        if conn is None:
            conn = self._conn = self._connect()
        try:
            if not transaction:
                return fn(conn)
            with self._transaction(conn):
                return fn(conn)
        except BaseException:
            self._conn = None
            self._discard(conn)
            raise

    async def close(self) -> None:
        def close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await asyncio.get_running_loop().run_in_executor(self._pool, close)
        self._pool.shutdown(wait=True)


# --- errors ---------------------------------------------------------------------------------

def _check_durability(where: Path | str, durability: str) -> None:
    if durability not in DURABILITIES:
        raise JournalError(f"unable to open journal {where}: durability {durability!r} is not normal|full")


class Guard:
    """The one place foreign errors (sqlite, SQLAlchemy, OS) become JournalError."""

    def __init__(self, path: Path | str, busy_timeout_s: float) -> None:   # (str: a PostgreSQL URL)
        self.path, self.busy_timeout_s = path, busy_timeout_s

    @contextlib.asynccontextmanager
    async def __call__(self, action: str) -> AsyncIterator[None]:
        try:
            yield
        except SandkastenError:
            raise
        except (sa.exc.SQLAlchemyError, sqlite3.Error, OSError) as exc:
            raise self.error(action, exc) from exc

    def error(self, action: str, exc: BaseException) -> JournalError:
        return JournalError(f"unable to {action} journal {self.path}: {self.cause(exc)}", path=str(self.path))

    def cause(self, exc: BaseException) -> str:
        text = str(getattr(exc, "orig", None) or exc).strip()
        low = text.lower()
        if "locked" in low or "busy" in low:
            return f"database is locked (another process held the write lock for more than {self.busy_timeout_s:g}s)"
        if "disk is full" in low or "no space" in low:
            return f"disk full ({text})"
        if "not a database" in low or "malformed" in low or "corrupt" in low:
            return f"database file is corrupt ({text})"
        return text.splitlines()[0] if text else type(exc).__name__
