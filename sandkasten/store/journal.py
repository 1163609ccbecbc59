"""The journal: append events through `decide`, keep read tables in step, verify the chain.

Who runs this: the daemon (HTTP handlers, executor, reconciler) and the CLI, as separate
processes on the same SQLite file. Every write is one `BEGIN IMMEDIATE` transaction —
load the stream's state, decide, append with the hash chain, update read tables, commit —
so two processes take turns on the write lock (busy_timeout) instead of failing.
Within one process an asyncio lock queues writers so they do not spin in SQLite's busy
handler. Foreign exceptions are translated to `JournalError` in `_guard`, nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import sqlite3
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Callable, Iterable, TypeVar

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_random

from sandkasten.domain import commands as c
from sandkasten.domain import events as ev
from sandkasten.domain import host
from sandkasten.domain.events import RecordedEvent
from sandkasten.domain.session import (DESTROYING, ENDED_STATUSES, POOL_IDLE, UNCLAIMED, PriorExecs, State, decide, evolve)
from sandkasten.errors import ConcurrencyConflict, InvalidRequest, JournalError, SandkastenError
from sandkasten.store import fastpath, integrity, postgres, projections, schema
from sandkasten.store.schema import events, execs, processes, sessions, workspaces

T = TypeVar("T")
GENESIS_HASH = "0" * 64
DURABILITIES = {"normal": "NORMAL", "full": "FULL"}
_STATE_CACHE_SIZE = 10_000
_PAGE = 2_000
_APPEND_ATTEMPTS = 5
# Statements on the append path are built once and run with bound parameters: building
# a SQLAlchemy statement costs several times more than executing it.
_INSERT_EVENT = sa.insert(events)
_STREAM_TAIL = sa.select(events).where(events.c.stream_id == sa.bindparam("sid"),
                                       events.c.stream_version > sa.bindparam("v"))
_CATCH_UP = _STREAM_TAIL.order_by(events.c.seq)
_PRIOR_EXECS = sa.select(execs.c.id, execs.c.session_id, execs.c.idempotency_key).where(
    (execs.c.id == sa.bindparam("id")) | ((execs.c.session_id == sa.bindparam("sid"))
                                          & (execs.c.idempotency_key == sa.bindparam("key"))))
_PRIOR_PROCESSES = sa.select(processes.c.id, processes.c.session_id, processes.c.idempotency_key).where(
    (processes.c.id == sa.bindparam("id")) | ((processes.c.session_id == sa.bindparam("sid"))
                                              & (processes.c.idempotency_key == sa.bindparam("key"))))
_PROCESS_BY_ID = sa.select(processes).where(processes.c.id == sa.bindparam("id"))
_PROCESS_BY_KEY = sa.select(processes).where(processes.c.session_id == sa.bindparam("sid"),
                                             processes.c.idempotency_key == sa.bindparam("key"))
_SESSION_BY_ID = sa.select(sessions).where(sessions.c.id == sa.bindparam("id"))
_EXEC_BY_ID = sa.select(execs).where(execs.c.id == sa.bindparam("id"))
_EXEC_BY_KEY = sa.select(execs).where(execs.c.session_id == sa.bindparam("sid"),
                                      execs.c.idempotency_key == sa.bindparam("key"))
_CATCH_UP_WITH_HEAD = sa.union_all(
    _STREAM_TAIL, sa.select(sa.select(events).order_by(events.c.seq.desc()).limit(1).subquery())
).order_by(sa.column("seq"))

__all__ = ["Journal", "RecordedEvent", "VerifyResult", "GENESIS_HASH", "canonical_json", "chain_hash"]


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    checked: int
    first_bad_seq: int | None
    reason: str


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def chain_hash(prev_hash: str, row: dict[str, Any]) -> str:
    """sha256(prev_hash + canonical JSON of the event's identifying fields)."""
    body = {k: row[k] for k in ("seq", "stream_id", "stream_version", "type", "schema_version", "actor", "request_id", "created_at")}
    body["payload"] = row["payload"]
    return hashlib.sha256((prev_hash + canonical_json(body)).encode()).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _recorded(row: Any) -> RecordedEvent:
    version, payload = ev.upcast(row.type, row.schema_version, json.loads(row.payload))
    return RecordedEvent(
        seq=row.seq, stream_id=row.stream_id, stream_version=row.stream_version, type=row.type,
        schema_version=version, payload=payload, actor=row.actor, request_id=row.request_id,
        created_at=row.created_at, hash=row.hash,
    )


class Journal:
    def __init__(self, db_path: Path, engine: AsyncEngine, writer: sa.Engine, reader: sa.Engine,
                 durability: str, busy_timeout_s: float) -> None:
        self.path = db_path
        self.url: str | None = None        # the PostgreSQL URL of a shared journal; None on SQLite
        # cluster: (host_id, epoch) of the daemon appending; sandbox observations on sessions
        # placed elsewhere are refused (domain.host.fenced). None on a single host.
        self.fence: tuple[str, int] | None = None
        self.durability = durability
        self.busy_timeout_s = busy_timeout_s
        self._engine = engine              # reads: async (aiosqlite), several at once under WAL
        self._writer = writer              # writes: sync, one dedicated thread, BEGIN IMMEDIATE
        self._reader = reader              # hot point reads: sync, one dedicated thread
        self._writer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal-writer")
        self._writer_conn: sa.Connection | None = None
        self._reader_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal-reader")
        self._reader_local = threading.local()
        self._write_lock = asyncio.Lock()
        self._states: OrderedDict[str, State] = OrderedDict()

    # --- lifecycle ------------------------------------------------------------------------

    @classmethod
    async def open(cls, db_path: Path | str, durability: str = "normal", *, busy_timeout_s: float = 10.0) -> "Journal":
        """Create the parent dir, migrate (alembic, in a thread), open one small async engine.
        A `postgresql…://` URL instead of a path opens the shared journal of a cluster."""
        if postgres.is_url(db_path):
            return await cls._open_postgres(str(db_path), durability, busy_timeout_s)
        db_path = Path(db_path).absolute()
        if durability not in DURABILITIES:
            raise JournalError(f"unable to open journal {db_path}: durability {durability!r} is not normal|full")
        guard = _Guard(db_path, busy_timeout_s)
        async with guard("migrate"):
            db_path.parent.mkdir(parents=True, exist_ok=True)
            await asyncio.to_thread(schema.upgrade, db_path, busy_timeout_s)
            _restrict(db_path)
        engine = create_async_engine(f"sqlite+aiosqlite:///{db_path}", pool_size=4, max_overflow=4)
        # One thread hop per transaction instead of one per statement: the whole append
        # (load, decide, insert, project, commit) runs as one call on the writer thread.
        writer = sa.create_engine(f"sqlite:///{db_path}", poolclass=sa.pool.StaticPool,
                                  connect_args={"check_same_thread": False})
        sync = DURABILITIES[durability]

        def _connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # SQLAlchemy emits BEGIN (see _begin)
            cursor = dbapi_conn.cursor()
            for pragma in (f"busy_timeout = {int(busy_timeout_s * 1000)}", "journal_mode = WAL",
                           "foreign_keys = ON", f"synchronous = {sync}"):
                cursor.execute(f"PRAGMA {pragma}")
            cursor.close()

        reader = sa.create_engine(f"sqlite:///{db_path}", poolclass=sa.pool.SingletonThreadPool)
        for e in (engine.sync_engine, writer, reader):
            sa.event.listen(e, "connect", _connect)
        sa.event.listen(reader, "begin", lambda conn: conn.exec_driver_sql("BEGIN"))
        # writers take the write lock up front so read-then-write never deadlocks
        sa.event.listen(writer, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
        sa.event.listen(engine.sync_engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN"))
        return cls(db_path, engine, writer, reader, durability, busy_timeout_s)

    @classmethod
    async def _open_postgres(cls, url: str, durability: str, busy_timeout_s: float) -> "Journal":
        """The same journal on PostgreSQL: appends serialised by an advisory lock (see
        store/postgres.py); durability is the server's (synchronous_commit)."""
        where = postgres.label(url)
        if durability not in DURABILITIES:
            raise JournalError(f"unable to open journal {where}: durability {durability!r} is not normal|full")
        async with _Guard(where, busy_timeout_s)("migrate"):
            await asyncio.to_thread(postgres.upgrade, url)
        engine, writer, reader = postgres.engines(url)
        journal = cls(where, engine, writer, reader, durability, busy_timeout_s)  # type: ignore[arg-type]
        journal.url = url
        return journal

    @classmethod
    def check(cls, db_path: Path | str, busy_timeout_s: float = 10.0, full: bool = True) -> None:
        """Blocking preflight for the daemon: migrate the file, read its schema once and let
        SQLite check every page (`integrity`), so a corrupt, locked or unwritable journal stops
        the start with one clear line — before anything is written on top of the damage.
        A PostgreSQL journal is migrated and read once (the server guards its own pages)."""
        if postgres.is_url(db_path):
            try:
                postgres.check(str(db_path))
            except (sa.exc.SQLAlchemyError, OSError) as exc:
                where = postgres.label(str(db_path))
                raise JournalError(f"unable to open journal {where}: {_Guard(where, busy_timeout_s)._cause(exc)}",
                                   path=where) from None
            return
        db_path = Path(db_path).absolute()
        try:
            db_path.parent.mkdir(parents=True, exist_ok=True)
            schema.upgrade(db_path, busy_timeout_s)
            _restrict(db_path)
            conn = sqlite3.connect(db_path, timeout=busy_timeout_s)
            try:
                conn.execute("SELECT count(*) FROM events").fetchone()
            finally:
                conn.close()
        except (sa.exc.SQLAlchemyError, sqlite3.Error, OSError) as exc:
            cause = _Guard(db_path, busy_timeout_s)._cause(exc)
            raise JournalError(f"unable to open journal {db_path}: {cause}", path=str(db_path)) from None
        found = integrity.problems(db_path, full=full, busy_timeout_s=busy_timeout_s)
        if found:
            raise JournalError(f"unable to open journal {db_path}: the file is damaged ({integrity.summary(found)}); "
                               f"with the daemon stopped, `sandkasten journal rebuild` rebuilds the read tables "
                               f"and every index, else restore a backup", path=str(db_path), problems=found)

    async def close(self) -> None:
        def _close() -> None:
            if self._writer_conn is not None:
                self._writer_conn.close()
            self._writer.dispose()

        def _close_reader() -> None:
            conn = getattr(self._reader_local, "conn", None)
            if conn is not None:
                conn.close()
            self._reader.dispose()

        await asyncio.get_running_loop().run_in_executor(self._reader_thread, _close_reader)
        self._reader_thread.shutdown(wait=True)
        await asyncio.get_running_loop().run_in_executor(self._writer_thread, _close)
        self._writer_thread.shutdown(wait=True)
        await self._engine.dispose()

    async def _on_writer(self, action: str, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(conn, *args)` on the writer thread, one at a time, errors translated."""
        def call() -> T:
            if self._writer_conn is None:
                self._writer_conn = self._writer.connect()
            conn = self._writer_conn
            try:
                with conn.begin():
                    return fn(conn, *args)
            except BaseException:
                if conn.in_transaction():
                    conn.rollback()
                # states cached during the failed transaction may be ahead of the file
                self._states.clear()
                raise

        async with self._write_lock, self._guard(action):
            return await asyncio.get_running_loop().run_in_executor(self._writer_thread, call)

    def _guard(self, action: str) -> "_Guard":
        return _Guard(self.path, self.busy_timeout_s)(action)  # type: ignore[return-value]

    # --- the write path ---------------------------------------------------------------------

    async def execute(
        self, stream_id: str, command: c.Command, *, actor: str, request_id: str | None = None
    ) -> list[RecordedEvent]:
        """decide + append + project in one transaction; retries a lost version race."""
        if isinstance(command, c.RequestSession) and command.session_id is None:
            command = replace(command, session_id=stream_id)
        _check_stream(stream_id, command)
        retrying = AsyncRetrying(
            stop=stop_after_attempt(_APPEND_ATTEMPTS), wait=wait_random(0, 0.02),
            retry=retry_if_exception_type(ConcurrencyConflict), reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                # shielded: a caller cancelled mid-write (client gone) must not cut the
                # transaction in half; the append finishes or rolls back on its own
                return await asyncio.shield(self._execute_once(stream_id, command, actor, request_id))
        raise AssertionError("unreachable")  # pragma: no cover

    async def execute_all(self, stream_id: str, commands: list[c.Command], *, actor: str,
                          request_id: str | None = None) -> list[RecordedEvent]:
        """Several commands on one stream in one transaction (one commit): all or nothing."""
        return await self.execute_many([(stream_id, command) for command in commands], actor=actor,
                                       request_id=request_id)

    async def execute_many(self, items: list[tuple[str, c.Command]], *, actor: str,
                           request_id: str | None = None) -> list[RecordedEvent]:
        """(stream, command) pairs in one transaction, in order: all or nothing. For batches
        like the reconciler's `sandbox.adopted` of every live session after a restart."""
        for stream_id, command in items:
            _check_stream(stream_id, command)

        def append_all(conn: sa.Connection) -> list[RecordedEvent]:
            return [e for stream_id, command in items
                    for e in self._append(conn, stream_id, command, actor, request_id)]

        return await asyncio.shield(self._on_writer("append to", append_all))

    async def _execute_once(self, stream_id: str, command: c.Command, actor: str, request_id: str | None) -> list[RecordedEvent]:
        return await self._on_writer("append to", self._append, stream_id, command, actor, request_id)

    def _append(self, conn: sa.Connection, stream_id: str, command: c.Command, actor: str,
                request_id: str | None) -> list[RecordedEvent]:
        """On the writer thread, inside BEGIN IMMEDIATE: load, decide, append, project."""
        query, params, base = self._catch_up_query(stream_id, head=True)
        state, seq, prev_hash = self._fold(stream_id, base, fastpath.execute(conn, query, params))
        prior = self._prior_execs(conn, stream_id, command)
        refusal = host.fenced(state, command, self.fence)
        if refusal is not None:
            raise host.HostFenced(f"unable to record {type(command).__name__} for {stream_id}: {refusal}",
                                  session_id=stream_id)
        new_events = decide(state, command, prior=prior, stream_id=stream_id)
        version = state.version if state else 0
        created_at = _now()
        recorded = []
        for new in new_events:
            seq, version = seq + 1, version + 1
            row = {"seq": seq, "stream_id": stream_id, "stream_version": version, "type": new.type,
                   "schema_version": new.schema_version, "payload": dict(new.payload), "actor": actor,
                   "request_id": request_id, "created_at": created_at}
            row_hash = chain_hash(prev_hash, row)
            self._insert(conn, {**row, "payload": canonical_json(row["payload"]),
                                "prev_hash": prev_hash, "hash": row_hash})
            prev_hash = row_hash
            event = RecordedEvent(hash=row_hash, **row)
            projections.apply(conn, event)
            state = evolve(state, event)
            recorded.append(event)
        if state is not None:
            self._remember(stream_id, state)
        if self.url is not None and recorded:  # PostgreSQL: wake the other hosts' followers at commit
            postgres.notify(conn, self.fence[0] if self.fence else "", _owner(state))
        return recorded

    def _insert(self, conn: sa.Connection, row: dict[str, Any]) -> None:
        try:
            fastpath.execute(conn, _INSERT_EVENT, row)
        except (sa.exc.IntegrityError, sqlite3.IntegrityError) as exc:
            if "events" not in str(getattr(exc, "orig", exc)):
                raise
            self._states.pop(row["stream_id"], None)
            raise ConcurrencyConflict(
                f"unable to append to stream {row['stream_id']}: version {row['stream_version']} already exists"
            ) from exc

    async def _load(self, conn: AsyncConnection, stream_id: str) -> State | None:
        """The cached state of a stream, caught up on events newer than the cached version."""
        query, params, base = self._catch_up_query(stream_id, head=False)
        return self._fold(stream_id, base, (await conn.execute(query, params)).all())[0]

    def _catch_up_query(self, stream_id: str, head: bool) -> tuple[sa.Executable, dict[str, Any], State | None]:
        """The stream's events newer than its cached state (returned too: the base to fold them
        onto, whatever another thread does to the cache meanwhile) and, with `head`, in the
        same query, the journal's last event, whose seq and hash the next append chains to."""
        base = self._states.get(stream_id)
        stmt = _CATCH_UP_WITH_HEAD if head else _CATCH_UP
        return stmt, {"sid": stream_id, "v": base.version if base else 0}, base

    def _fold(self, stream_id: str, base: State | None, rows: Iterable[Any]) -> tuple[State | None, int, str]:
        state = base
        seq, prev_hash, seen = 0, GENESIS_HASH, set()
        for row in rows:
            seq, prev_hash = max((seq, prev_hash), (row.seq, row.hash))
            if row.stream_id == stream_id and row.seq not in seen and (state is None or row.stream_version > state.version):
                seen.add(row.seq)
                state = evolve(state, _recorded(row))
        if state is not None:
            self._remember(stream_id, state)
        return state, seq, prev_hash

    def _remember(self, stream_id: str, state: State) -> None:
        cached = self._states.get(stream_id)
        if cached is None or cached.version <= state.version:  # a slower reader never rolls it back
            self._states[stream_id] = state
        self._states.move_to_end(stream_id)
        while len(self._states) > _STATE_CACHE_SIZE:
            self._states.popitem(last=False)

    def _prior_execs(self, conn: sa.Connection, stream_id: str, command: c.Command) -> PriorExecs | None:
        """Facts about earlier execs that the state does not keep (see domain.session)."""
        if isinstance(command, c.RequestExec):
            own_id, query = command.exec_id, _PRIOR_EXECS
        elif isinstance(command, c.RequestProcess):
            own_id, query = command.process_id, _PRIOR_PROCESSES
        else:
            return None
        rows = fastpath.execute(conn, query, {"id": own_id, "sid": stream_id, "key": command.idempotency_key})
        taken = any(row.id == own_id for row in rows)
        owner = next((row.id for row in rows if row.session_id == stream_id
                      and row.idempotency_key is not None and row.idempotency_key == command.idempotency_key), None)
        return PriorExecs(exec_id_taken=taken, key_exec_id=owner)

    # --- reads ------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _reading(self, action: str) -> AsyncIterator[AsyncConnection]:
        async with self._guard(action), self._engine.connect() as conn:
            yield conn

    async def state(self, stream_id: str) -> State | None:
        async with self._reading("read") as conn:
            return await self._load(conn, stream_id)

    async def events(
        self, after_seq: int = 0, stream_id: str | None = None, limit: int = 1000, types: Iterable[str] | None = None
    ) -> list[RecordedEvent]:
        query = sa.select(events).where(events.c.seq > after_seq).order_by(events.c.seq).limit(limit)
        if stream_id is not None:
            query = query.where(events.c.stream_id == stream_id)
        if types is not None:
            query = query.where(events.c.type.in_(list(types)))
        async with self._reading("read events from") as conn:
            return [_recorded(row) for row in await conn.execute(query)]

    async def last_seq(self) -> int:
        async with self._reading("read") as conn:
            return (await conn.scalar(sa.select(sa.func.max(events.c.seq)))) or 0

    async def _rows(self, query: sa.Select) -> list[dict[str, Any]]:
        async with self._reading("read") as conn:
            return [dict(row._mapping) for row in await conn.execute(query)]

    async def _row(self, query: sa.Select) -> dict[str, Any] | None:
        rows = await self._rows(query)
        return rows[0] if rows else None

    async def _point_read(self, stmt: sa.Select, params: dict[str, Any]) -> dict[str, Any] | None:
        """One row by a prebuilt statement on the reader thread: the hot reads (a session,
        an exec) cost one thread hop instead of several through the async driver."""
        def read() -> dict[str, Any] | None:
            conn = getattr(self._reader_local, "conn", None)
            if conn is None:
                conn = self._reader_local.conn = self._reader.connect()
            try:
                with conn.begin():
                    row = conn.execute(stmt, params).first()
            except BaseException:
                conn.invalidate()
                self._reader_local.conn = None
                raise
            return dict(row._mapping) if row is not None else None

        async with self._guard("read"):
            return await asyncio.get_running_loop().run_in_executor(self._reader_thread, read)

    async def session(self, sid: str) -> dict[str, Any] | None:
        return await self._point_read(_SESSION_BY_ID, {"id": sid})

    async def sessions(self, include_ended: bool = False, include_pool: bool = True) -> list[dict[str, Any]]:
        """Sessions not ended (or all); `include_pool=False` leaves out pool members nobody
        has claimed yet (what clients list)."""
        query = sa.select(sessions).order_by(sessions.c.created_at, sessions.c.id)
        if not include_ended:
            query = query.where(sessions.c.status.not_in(ENDED_STATUSES))
        if not include_pool:
            query = query.where(sa.or_(sessions.c.pool.is_(None), sessions.c.pool.not_in(UNCLAIMED)))
        return await self._rows(query)

    async def idle_pool(self) -> list[dict[str, Any]]:
        """Unclaimed pool members not ended or being destroyed, oldest first."""
        query = (sa.select(sessions).where(sessions.c.pool == POOL_IDLE,
                                           sessions.c.status.not_in((*ENDED_STATUSES, DESTROYING)))
                 .order_by(sessions.c.created_at, sessions.c.id))
        return await self._rows(query)

    async def execs(self, session_id: str) -> list[dict[str, Any]]:
        return await self._rows(sa.select(execs).where(execs.c.session_id == session_id).order_by(execs.c.seq_no))

    async def exec(self, exec_id: str) -> dict[str, Any] | None:
        return await self._point_read(_EXEC_BY_ID, {"id": exec_id})

    async def exec_by_idempotency_key(self, session_id: str, key: str) -> dict[str, Any] | None:
        return await self._point_read(_EXEC_BY_KEY, {"sid": session_id, "key": key})

    async def pending_execs(self) -> list[dict[str, Any]]:
        """Execs requested or running (for the reconciler), oldest first."""
        query = (sa.select(execs).where(execs.c.status.in_(("requested", "running")))
                 .order_by(execs.c.requested_at, execs.c.session_id, execs.c.seq_no))
        return await self._rows(query)

    async def hosts(self) -> list[dict[str, Any]]:
        """The hosts of a cluster (shared journal), by id; empty on a single host."""
        return await self._rows(sa.select(schema.hosts).order_by(schema.hosts.c.id))

    async def processes(self, session_id: str, include_ended: bool = False) -> list[dict[str, Any]]:
        query = sa.select(processes).where(processes.c.session_id == session_id)
        if not include_ended:
            query = query.where(processes.c.status.in_(("requested", "running")))
        return await self._rows(query.order_by(processes.c.requested_at, processes.c.id))

    async def process(self, process_id: str) -> dict[str, Any] | None:
        return await self._point_read(_PROCESS_BY_ID, {"id": process_id})

    async def process_by_idempotency_key(self, session_id: str, key: str) -> dict[str, Any] | None:
        return await self._point_read(_PROCESS_BY_KEY, {"sid": session_id, "key": key})

    async def pending_processes(self) -> list[dict[str, Any]]:
        """Processes requested or running, oldest first (for the reconciler and the executor)."""
        query = (sa.select(processes).where(processes.c.status.in_(("requested", "running")))
                 .order_by(processes.c.requested_at, processes.c.id))
        return await self._rows(query)

    async def workspaces(self) -> list[dict[str, Any]]:
        return await self._rows(sa.select(workspaces).order_by(workspaces.c.created_at, workspaces.c.id))

    async def snapshot_read_tables(self) -> dict[str, list[dict[str, Any]]]:
        snapshot = {}
        for table in schema.READ_TABLES:
            snapshot[table.name] = await self._rows(sa.select(table).order_by(*table.primary_key.columns))
        return snapshot

    # --- whole-journal operations -------------------------------------------------------

    async def verify(self) -> VerifyResult:
        """Recompute the hash chain from the first event; name the first row that disagrees."""
        prev_hash, checked, after = GENESIS_HASH, 0, 0
        async with self._reading("verify") as conn:
            while True:
                rows = (await conn.execute(sa.select(events).where(events.c.seq > after).order_by(events.c.seq).limit(_PAGE))).all()
                if not rows:
                    return VerifyResult(True, checked, None, f"{checked} events, chain intact")
                for row in rows:
                    reason = _check_row(row, prev_hash)
                    if reason:
                        return VerifyResult(False, checked, row.seq, f"event {row.seq}: {reason}")
                    prev_hash, checked, after = row.hash, checked + 1, row.seq

    async def rebuild(self) -> int:
        """Empty the read tables and replay every event into them (one transaction)."""
        return await self._on_writer("rebuild", self._rebuild)

    def _rebuild(self, conn: sa.Connection) -> int:
        count = 0
        for table in schema.READ_TABLES:
            conn.execute(sa.delete(table))
        after = 0
        while True:
            rows = conn.execute(sa.select(events).where(events.c.seq > after).order_by(events.c.seq).limit(_PAGE)).all()
            if not rows:
                return count
            for row in rows:
                projections.apply(conn, _recorded(row))
            after, count = rows[-1].seq, count + len(rows)


def _restrict(db_path: Path) -> None:
    """The journal holds every command, its actor and the sessions' env: owner-only, like its
    WAL and shared-memory files (SQLite gives new ones the database file's mode)."""
    for path in (db_path, db_path.with_name(db_path.name + "-wal"), db_path.with_name(db_path.name + "-shm")):
        try:
            os.chmod(path, 0o600)
        except (FileNotFoundError, PermissionError):  # not there yet; or not ours to change
            pass


def _owner(state: State | None) -> str:
    """Whose executor a change of this stream may concern (the NOTIFY payload, see postgres.notify)."""
    if state is None or not hasattr(state, "session_id"):
        return "-"
    return getattr(state, "host_id", None) or ""


def _check_stream(stream_id: str, command: c.Command) -> None:
    if isinstance(command, c.RequestSession) and command.session_id != stream_id:
        raise InvalidRequest(f"unable to request session {command.session_id}: stream id is {stream_id}")
    if isinstance(command, host.HOST_COMMANDS) != stream_id.startswith(host.HOST_STREAM_PREFIX):
        raise InvalidRequest(f"unable to apply {type(command).__name__} to stream {stream_id}: host commands "
                             f"go to {host.HOST_STREAM_PREFIX}<host_id> streams, and only they")
    if isinstance(command, (c.CreateWorkspace, c.DeleteWorkspace)) and stream_id != ev.workspace_stream(command.workspace_id):
        raise InvalidRequest(
            f"unable to change workspace {command.workspace_id}: stream must be {ev.workspace_stream(command.workspace_id)}"
        )


def _check_row(row: Any, prev_hash: str) -> str | None:
    if row.prev_hash != prev_hash:
        return "prev_hash does not match the previous event's hash (an event was removed or reordered)"
    try:
        payload = json.loads(row.payload)
    except ValueError:
        return "payload is not valid JSON"
    if canonical_json(payload) != row.payload:
        return "payload is not in canonical form (edited by hand)"
    fields = {k: getattr(row, k) for k in ("seq", "stream_id", "stream_version", "type", "schema_version", "actor", "request_id", "created_at")}
    if chain_hash(prev_hash, {**fields, "payload": payload}) != row.hash:
        return "hash does not match the event's content (the row was changed)"
    return None


class _Guard:
    """The one place foreign errors (sqlite, SQLAlchemy, OS) become JournalError."""

    def __init__(self, path: Path, busy_timeout_s: float) -> None:
        self.path, self.busy_timeout_s = path, busy_timeout_s

    @contextlib.asynccontextmanager
    async def __call__(self, action: str) -> AsyncIterator[None]:
        try:
            yield
        except SandkastenError:
            raise
        except (sa.exc.SQLAlchemyError, sqlite3.Error, OSError) as exc:
            raise JournalError(f"unable to {action} journal {self.path}: {self._cause(exc)}", path=str(self.path)) from exc

    def _cause(self, exc: BaseException) -> str:
        text = str(getattr(exc, "orig", None) or exc).strip()
        low = text.lower()
        if "locked" in low or "busy" in low:
            return f"database is locked (another process held the write lock for more than {self.busy_timeout_s:g}s)"
        if "disk is full" in low or "no space" in low:
            return f"disk full ({text})"
        if "not a database" in low or "malformed" in low or "corrupt" in low:
            return f"database file is corrupt ({text})"
        return text.splitlines()[0] if text else type(exc).__name__
