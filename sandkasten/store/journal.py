"""The journal: append events through `decide`, keep read tables in step, verify the chain.

Who runs this: the daemon (HTTP handlers, executor, reconciler) and the CLI, as separate
processes on the same SQLite file. Every write is one `BEGIN IMMEDIATE` transaction —
load the stream's state, decide, append with the hash chain, update read tables, commit —
so two processes take turns on the write lock (busy_timeout) instead of failing.

On SQLite, appends that arrive together share one transaction (`group_commit`: each in its
own savepoint, one COMMIT), written on the event loop when that needs no fsync and no wait;
streams' states and the journal's head (seq, hash) are kept in memory and trusted while
`PRAGMA data_version` says no other process wrote. Point reads run on the loop through the
driver (`fastpath`); lists on a reader thread. PostgreSQL (a cluster) keeps one writer thread
and an advisory lock (store/postgres.py). Foreign exceptions become `JournalError` in `_Guard`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import random
import sqlite3
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime, UTC
from pathlib import Path
from typing import Any, TypeVar
from collections.abc import AsyncIterator, Callable, Iterable

import sqlalchemy as sa
from json.encoder import encode_basestring as _encode_string   # = json.dumps(str, ensure_ascii=False)

from sandkasten.domain import commands as c
from sandkasten.domain import events as ev
from sandkasten.domain import host
from sandkasten.domain.events import RecordedEvent
from sandkasten.domain.session import (PriorExecs, SessionState, State, decide, evolve)
from sandkasten.domain.workspace import WorkspaceState
from sandkasten.errors import ConcurrencyConflict, InvalidRequest, JournalError, SandkastenError
from sandkasten.store import fastpath, integrity, postgres, projections, queries, schema
from sandkasten.store.group_commit import GroupCommit
from sandkasten.store.schema import events, execs, processes, sessions

T = TypeVar("T")
log = logging.getLogger("sandkasten.journal")
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
_LAST_SEQ = sa.select(sa.func.max(events.c.seq))
_EVENTS_PAGE = sa.select(events).where(events.c.seq > sa.bindparam("after")).order_by(events.c.seq).limit(_PAGE)
_CLEAR = {table.name: sa.delete(table) for table in schema.READ_TABLES}
_LARGE_BATCH = 16        # execute_many with more commands than this is written off the event loop

__all__ = ["Journal", "RecordedEvent", "VerifyResult", "GENESIS_HASH", "canonical_json", "chain_hash"]


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    checked: int
    first_bad_seq: int | None
    reason: str


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


# an event's identifying fields, hashed into the chain with its payload
_HASHED_FIELDS = ("seq", "stream_id", "stream_version", "type", "schema_version", "actor", "request_id", "created_at")


def chain_hash(prev_hash: str, row: dict[str, Any]) -> str:
    """sha256(prev_hash + canonical JSON of the event's identifying fields)."""
    body = {k: row[k] for k in _HASHED_FIELDS}
    body["payload"] = row["payload"]
    return hashlib.sha256((prev_hash + canonical_json(body)).encode()).hexdigest()


def _chain_hash_of(prev_hash: str, row: dict[str, Any], payload_json: str) -> str:
    """`chain_hash` with the payload already in canonical JSON (the append writes that very
    text): the same bytes — keys in sorted order, strings as `json.dumps(ensure_ascii=False)`
    writes them — with one serialisation instead of two."""
    text = _json_text
    body = (f'{{"actor":{text(row["actor"])},"created_at":{text(row["created_at"])},"payload":{payload_json},'
            f'"request_id":{text(row["request_id"])},"schema_version":{int(row["schema_version"])},'
            f'"seq":{int(row["seq"])},"stream_id":{text(row["stream_id"])},'
            f'"stream_version":{int(row["stream_version"])},"type":{text(row["type"])}}}')
    return hashlib.sha256((prev_hash + body).encode()).hexdigest()


def _json_text(value: str | None) -> str:
    return "null" if value is None else _encode_string(value)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


now = _now   # the journal's timestamps (ISO 8601 UTC, microseconds), for callers that stamp ahead


def _recorded(row: Any) -> RecordedEvent:
    version, payload = ev.upcast(row.type, row.schema_version, json.loads(row.payload))
    return RecordedEvent(
        seq=row.seq, stream_id=row.stream_id, stream_version=row.stream_version, type=row.type,
        schema_version=version, payload=payload, actor=row.actor, request_id=row.request_id,
        created_at=row.created_at, hash=row.hash,
    )


class _Txn:
    """What one write transaction changed in memory (streams' states, the head), kept apart
    from the journal's caches until COMMIT: a rollback forgets it."""

    __slots__ = ("states", "head", "recorded")

    def __init__(self) -> None:
        self.states: dict[str, State] = {}
        self.head: tuple[int, str] | None = None
        self.recorded: list[RecordedEvent] = []


class Journal:
    def __init__(self, db_path: Path, durability: str, busy_timeout_s: float, reader: sa.Engine, *,
                 writer: sa.Engine | None = None, group: GroupCommit | None = None,
                 point_reader: sqlite3.Connection | None = None) -> None:
        self.path = db_path
        self.url: str | None = None        # the PostgreSQL URL of a shared journal; None on SQLite
        # cluster: (host_id, epoch) of the daemon appending; sandbox observations on sessions
        # placed elsewhere are refused (domain.host.fenced). None on a single host.
        self.fence: tuple[str, int] | None = None
        self.durability = durability
        self.busy_timeout_s = busy_timeout_s
        self._group = group                # SQLite: group commit on the loop (or its writer thread)
        self._point_reader = point_reader  # SQLite: point reads on the loop, through the driver
        self._writer = writer              # PostgreSQL: sync writes on one dedicated thread
        self._writer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal-writer") \
            if writer is not None else None
        self._writer_conn: sa.Connection | None = None
        self._write_lock = asyncio.Lock()
        self._reader = reader              # lists, verify: sync, one dedicated thread
        self._reader_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal-reader")
        self._reader_local = threading.local()
        self._states: OrderedDict[str, State] = OrderedDict()
        self._verified: set[str] = set()   # cached states no other writer can have moved on
        self._head: tuple[int, str] | None = None   # (seq, hash) of the last event, when known
        self._data_version: int | None = None
        self._txn: _Txn | None = None
        self._checkpointing = False
        # called on the event loop with the events of every commit of this journal (in order)
        self.listeners: list[Callable[[list[RecordedEvent]], None]] = []
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()

    # --- lifecycle ------------------------------------------------------------------------

    @classmethod
    async def open(cls, db_path: Path | str, durability: str = "normal", *, busy_timeout_s: float = 10.0) -> Journal:
        """Create the parent dir, migrate (alembic, in a thread, only when behind), connect.
        A `postgresql…://` URL instead of a path opens the shared journal of a cluster."""
        if postgres.is_url(db_path):
            return await cls._open_postgres(str(db_path), durability, busy_timeout_s)
        db_path = Path(db_path).absolute()  # noqa: ASYNC240 - reads the cwd, no file I/O
        if durability not in DURABILITIES:
            raise JournalError(f"unable to open journal {db_path}: durability {durability!r} is not normal|full")
        sync = DURABILITIES[durability]
        async with _Guard(db_path, busy_timeout_s)("migrate"):
            db_path.parent.mkdir(parents=True, exist_ok=True)
            await asyncio.to_thread(schema.upgrade, db_path, busy_timeout_s)
            _restrict(db_path)
            writer = _connect(db_path, busy_timeout_s, sync)
            writer.execute("PRAGMA wal_autocheckpoint = 0")   # checkpoints run off the commit path
            point_reader = _connect(db_path, busy_timeout_s, sync)

        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # SQLAlchemy emits BEGIN (below)
            _set_pragmas(dbapi_conn, busy_timeout_s, sync)

        reader = sa.create_engine(f"sqlite:///{db_path}", poolclass=sa.pool.SingletonThreadPool)
        sa.event.listen(reader, "connect", _pragmas)
        sa.event.listen(reader, "begin", lambda conn: conn.exec_driver_sql("BEGIN"))
        journal = cls(db_path, durability, busy_timeout_s, reader, point_reader=point_reader)
        journal._group = GroupCommit(writer, inline=durability == "normal", busy_timeout_s=busy_timeout_s,
                                     begin=journal._begin, committed=journal._committed,
                                     checkpoint=journal._checkpoint)
        return journal

    @classmethod
    async def _open_postgres(cls, url: str, durability: str, busy_timeout_s: float) -> Journal:
        """The same journal on PostgreSQL: appends serialised by an advisory lock (see
        store/postgres.py); durability is the server's (synchronous_commit)."""
        where = postgres.label(url)
        if durability not in DURABILITIES:
            raise JournalError(f"unable to open journal {where}: durability {durability!r} is not normal|full")
        async with _Guard(where, busy_timeout_s)("migrate"):
            await asyncio.to_thread(postgres.upgrade, url)
        writer, reader = postgres.engines(url)
        journal = cls(where, durability, busy_timeout_s, reader, writer=writer)  # type: ignore[arg-type]
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
                conn.execute("SELECT seq FROM events ORDER BY seq DESC LIMIT 1").fetchone()   # O(log n)
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
        loop = asyncio.get_running_loop()
        if self._group is not None:
            await self._group.drain()
            self._group.close()

        def _close_reader() -> None:
            for name in ("conn", "raw"):
                conn = getattr(self._reader_local, name, None)
                if conn is not None:
                    conn.close()
            self._reader.dispose()

        await loop.run_in_executor(self._reader_thread, _close_reader)
        self._reader_thread.shutdown(wait=True)
        if self._point_reader is not None:
            self._point_reader.close()
        if self._writer_thread is not None:
            def _close() -> None:
                if self._writer_conn is not None:
                    self._writer_conn.close()
                self._writer.dispose()  # type: ignore[union-attr]

            await loop.run_in_executor(self._writer_thread, _close)
            self._writer_thread.shutdown(wait=True)

    def _guard(self, action: str) -> contextlib.AbstractAsyncContextManager[None]:
        return _Guard(self.path, self.busy_timeout_s)(action)

    # --- transactions -------------------------------------------------------------------

    def _begin(self, conn: Any) -> None:
        """First thing in every write transaction: is what we remember still the truth?"""
        if self.url is None:
            version = conn.execute("PRAGMA data_version").fetchone()[0]
            if version == self._data_version:
                self._txn = _Txn()
                return
            self._data_version = version
        self._verified.clear()   # another process (or host) may have appended: catch up per stream
        self._head = None
        self._txn = _Txn()

    def _committed(self, ok: bool) -> None:
        txn, self._txn = self._txn, None
        if not ok or txn is None:
            return
        for stream_id, state in txn.states.items():
            self._remember(stream_id, state)
            self._verified.add(stream_id)
        if txn.head is not None:
            self._head = txn.head
        if self.listeners and txn.recorded:   # on the loop's thread, in commit order
            if threading.get_ident() == self._loop_thread:
                self._tell(txn.recorded)
            else:
                self._loop.call_soon_threadsafe(self._tell, txn.recorded)

    def _tell(self, recorded: list[RecordedEvent]) -> None:
        for listener in self.listeners:
            try:
                listener(recorded)
            except Exception:  # a listener must never undo a commit
                log.exception("journal listener failed")

    async def _write(self, action: str, fn: Callable[..., T], *args: Any, heavy: bool = False) -> T:
        """Run `fn(conn, *args)` inside a write transaction; errors translated. The work is not
        cut short by a caller that is cancelled meanwhile: it commits or rolls back on its own."""
        if self._group is None:
            return await self._on_writer(action, fn, *args)
        try:
            return await self._group.submit(lambda conn: self._in_txn(fn, conn, *args), heavy=heavy)
        except SandkastenError:
            raise
        except (sqlite3.Error, sa.exc.SQLAlchemyError, OSError) as exc:
            raise _Guard(self.path, self.busy_timeout_s).error(action, exc) from exc

    def _in_txn(self, fn: Callable[..., T], conn: Any, *args: Any) -> T:
        """One item of a group commit: on failure its savepoint is rolled back, and so is what
        it changed in the transaction's memory."""
        txn: _Txn = self._txn  # type: ignore[assignment]
        saved = (dict(txn.states), txn.head, len(txn.recorded))
        try:
            return fn(conn, *args)
        except BaseException:
            txn.states, txn.head = saved[0], saved[1]
            del txn.recorded[saved[2]:]
            raise

    async def _on_writer(self, action: str, fn: Callable[..., T], *args: Any) -> T:
        """PostgreSQL: run `fn(conn, *args)` on the writer thread, one at a time."""
        def call() -> T:
            if self._writer_conn is None:
                self._writer_conn = self._writer.connect()  # type: ignore[union-attr]
            conn = self._writer_conn
            try:
                with conn.begin():
                    self._begin(conn)
                    result = fn(conn, *args)
            except BaseException:
                if conn.in_transaction():
                    conn.rollback()
                self._committed(False)
                self._states.clear()
                self._verified.clear()
                raise
            self._committed(True)
            return result

        async with self._write_lock, self._guard(action):
            return await asyncio.shield(asyncio.get_running_loop().run_in_executor(self._writer_thread, call))

    def _checkpoint(self) -> None:
        """Copy the WAL back into the database on the reader thread (PASSIVE: writers go on)."""
        if self._checkpointing:
            return
        self._checkpointing = True

        def run() -> None:
            try:
                raw = getattr(self._reader_local, "raw", None)
                if raw is None:
                    raw = self._reader_local.raw = _connect(self.path, self.busy_timeout_s,
                                                            DURABILITIES[self.durability])
                raw.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except sqlite3.Error:
                pass   # the next one tries again; SQLite also checkpoints when the last connection closes
            finally:
                self._checkpointing = False

        self._reader_thread.submit(run)

    # --- the write path ---------------------------------------------------------------------

    async def execute(
        self, stream_id: str, command: c.Command, *, actor: str, request_id: str | None = None
    ) -> list[RecordedEvent]:
        """decide + append + project in one transaction; retries a lost version race."""
        if isinstance(command, c.RequestSession) and command.session_id is None:
            command = replace(command, session_id=stream_id)
        _check_stream(stream_id, command)
        for attempt in range(1, _APPEND_ATTEMPTS + 1):
            try:
                return await self._write("append to", self._append, stream_id, command, actor, request_id)
            except ConcurrencyConflict:
                if attempt == _APPEND_ATTEMPTS:
                    raise
                await asyncio.sleep(random.uniform(0, 0.02))
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

        def append_all(conn: Any) -> list[RecordedEvent]:
            return [e for stream_id, command in items
                    for e in self._append(conn, stream_id, command, actor, request_id)]

        return await self._write("append to", append_all, heavy=len(items) > _LARGE_BATCH)

    def defer_all(self, stream_id: str, commands: list[c.Command], *, actor: str,
                  at: str) -> tuple[asyncio.Future, list[ev.NewEvent]] | None:
        """Observations to journal right after the caller has answered its client (`flush`), in
        one transaction stamped `at`: (the commit's future, the events it will append). Only
        where that cannot change the outcome — SQLite with `durability: normal` (no fsync
        either way; a crash before the commit is recovered from the runner, which keeps the
        result), nothing queued ahead, the stream's state known to be current and `decide`
        accepting every command on it. Otherwise None: append the usual way."""
        group = self._group
        if group is None or self.durability != "normal" or not group.idle() or stream_id not in self._verified:
            return None
        state = self._states.get(stream_id)
        planned: list[ev.NewEvent] = []
        try:
            for command in commands:
                _check_stream(stream_id, command)
                new = decide(state, command, stream_id=stream_id)
                for event in new:
                    state = evolve(state, event)
                planned += new
        except SandkastenError:
            return None

        def append_all(conn: Any) -> list[RecordedEvent]:
            return [e for command in commands for e in self._append(conn, stream_id, command, actor, None, at)]

        def work(conn: Any) -> list[RecordedEvent]:
            return self._in_txn(append_all, conn)

        return group.submit(work, defer=True), planned

    def flush(self) -> None:
        """Write deferred appends now (an HTTP handler calls this once its answer is sent)."""
        if self._group is not None:
            self._group.flush()

    async def written(self) -> None:
        """Wait until every append submitted so far (deferred ones too) is written."""
        if self._group is not None:
            self._group.flush()
            await self._group.drain()

    def _append(self, conn: Any, stream_id: str, command: c.Command, actor: str,
                request_id: str | None, at: str | None = None) -> list[RecordedEvent]:
        """Inside BEGIN IMMEDIATE: load, decide, append, project (stamped now, or `at`)."""
        txn: _Txn = self._txn  # type: ignore[assignment]
        state, seq, prev_hash = self._current(conn, txn, stream_id)
        prior = self._prior_execs(conn, stream_id, command)
        refusal = host.fenced(state, command, self.fence)
        if refusal is not None:
            raise host.HostFenced(f"unable to record {type(command).__name__} for {stream_id}: {refusal}",
                                  session_id=stream_id)
        new_events = decide(state, command, prior=prior, stream_id=stream_id)
        version = state.version if state else 0
        created_at = at or _now()
        recorded = []
        for new in new_events:
            seq, version = seq + 1, version + 1
            payload = dict(new.payload)
            payload_json = canonical_json(payload)
            row: dict[str, Any] = {"seq": seq, "stream_id": stream_id, "stream_version": version, "type": new.type,
                   "schema_version": new.schema_version, "payload": payload, "actor": actor,
                   "request_id": request_id, "created_at": created_at}
            row_hash = _chain_hash_of(prev_hash, row, payload_json)
            self._insert(conn, {**row, "payload": payload_json, "prev_hash": prev_hash, "hash": row_hash})
            prev_hash = row_hash
            event = RecordedEvent(hash=row_hash, **row)
            projections.apply(conn, event)
            state = evolve(state, event)
            recorded.append(event)
        if state is not None:
            txn.states[stream_id] = state
        txn.head = (seq, prev_hash)
        txn.recorded += recorded
        if self.url is not None and recorded:  # PostgreSQL: wake the other hosts' followers at commit
            postgres.notify(conn, self.fence[0] if self.fence else "", _owner(state))
        return recorded

    def _current(self, conn: Any, txn: _Txn, stream_id: str) -> tuple[State | None, int, str]:
        """The stream's state and the journal's head (seq, hash) inside this transaction: from
        memory when no other writer can have moved them, else caught up from the file."""
        head = txn.head or self._head
        known = stream_id in txn.states or stream_id in self._verified
        base = txn.states[stream_id] if stream_id in txn.states else self._states.get(stream_id)
        if known and head is not None:
            return base, head[0], head[1]
        stmt = _CATCH_UP_WITH_HEAD if head is None else _CATCH_UP
        rows = fastpath.execute(conn, stmt, {"sid": stream_id, "v": base.version if base else 0})
        state, seq, prev_hash = self._fold(stream_id, base, rows)
        if state is not None:
            txn.states[stream_id] = state
        return (state, seq, prev_hash) if head is None else (state, head[0], head[1])

    def _insert(self, conn: Any, row: dict[str, Any]) -> None:
        try:
            fastpath.execute(conn, _INSERT_EVENT, row)
        except (sa.exc.IntegrityError, sqlite3.IntegrityError) as exc:
            if "events" not in str(getattr(exc, "orig", exc)):
                raise
            self._states.pop(row["stream_id"], None)
            self._verified.discard(row["stream_id"])
            raise ConcurrencyConflict(
                f"unable to append to stream {row['stream_id']}: version {row['stream_version']} already exists"
            ) from exc

    def _catch_up_query(self, stream_id: str, head: bool) -> tuple[sa.ClauseElement, dict[str, Any], State | None]:
        """The stream's events newer than its cached state (returned too: the base to fold them
        onto, whatever another thread does to the cache meanwhile) and, with `head`, in the
        same query, the journal's last event, whose seq and hash the next append chains to."""
        base = self._states.get(stream_id)
        stmt = _CATCH_UP_WITH_HEAD if head else _CATCH_UP
        return stmt, {"sid": stream_id, "v": base.version if base else 0}, base

    def _fold(self, stream_id: str, base: State | None, rows: Iterable[Any]) -> tuple[State | None, int, str]:
        """`base` evolved by the stream's rows; (state, seq, hash) of the newest row seen."""
        state = base
        seq, prev_hash, seen = 0, GENESIS_HASH, set()
        for row in rows:
            seq, prev_hash = max((seq, prev_hash), (row.seq, row.hash))
            mine = row.stream_id == stream_id and row.seq not in seen
            if mine and (state is None or row.stream_version > state.version):
                seen.add(row.seq)
                state = evolve(state, _recorded(row))
        return state, seq, prev_hash

    def _remember(self, stream_id: str, state: State) -> None:
        cached = self._states.get(stream_id)
        if cached is None or cached.version <= state.version:  # a slower reader never rolls it back
            self._states[stream_id] = state
        self._states.move_to_end(stream_id)
        while len(self._states) > _STATE_CACHE_SIZE:
            self._verified.discard(self._states.popitem(last=False)[0])

    def _prior_execs(self, conn: Any, stream_id: str, command: c.Command) -> PriorExecs | None:
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

    async def _on_reader(self, action: str, fn: Callable[..., T], *args: Any) -> T:
        """`fn(conn, *args)` on the reader thread, in one read transaction, errors translated."""
        def read() -> T:
            conn = getattr(self._reader_local, "conn", None)
            if conn is None:
                conn = self._reader_local.conn = self._reader.connect()
            try:
                with conn.begin():
                    return fn(conn, *args)
            except BaseException:
                conn.invalidate()
                self._reader_local.conn = None
                raise

        async with self._guard(action):
            return await asyncio.get_running_loop().run_in_executor(self._reader_thread, read)

    async def _point(self, stmt: sa.ClauseElement, params: dict[str, Any], action: str = "read") -> list[Any]:
        """Rows of a prebuilt statement: on SQLite right here on the loop through the driver
        (a read in WAL mode never waits for a writer), elsewhere on the reader thread."""
        if self._point_reader is None:
            return await self._on_reader(action, lambda conn: fastpath.execute(conn, stmt, params))
        try:
            return fastpath.execute(self._point_reader, stmt, params)
        except (sqlite3.Error, OSError) as exc:
            raise _Guard(self.path, self.busy_timeout_s).error(action, exc) from exc

    async def _point_read(self, stmt: sa.ClauseElement, params: dict[str, Any]) -> dict[str, Any] | None:
        """One row by a prebuilt statement (a session, an exec, a process)."""
        rows = await self._point(stmt, params)
        return fastpath.mapping(rows[0]) if rows else None

    async def state(self, stream_id: str) -> State | None:
        query, params, base = self._catch_up_query(stream_id, head=False)
        state = self._fold(stream_id, base, await self._point(query, params))[0]
        if state is not None:
            self._remember(stream_id, state)
        return state

    async def session_state(self, sid: str) -> SessionState | None:
        """The folded state of session `sid`; None when it has no stream or its stream is not a
        session's (a workspace's or a host's id is no session)."""
        state = await self.state(sid)
        return state if isinstance(state, SessionState) else None

    async def workspace_state(self, stream_id: str) -> WorkspaceState | None:
        """The folded state of a workspace's stream (`ws:<id>`); None as for `session_state`."""
        state = await self.state(stream_id)
        return state if isinstance(state, WorkspaceState) else None

    async def events(
        self, after_seq: int = 0, stream_id: str | None = None, limit: int = 1000, types: Iterable[str] | None = None
    ) -> list[RecordedEvent]:
        query = sa.select(events).where(events.c.seq > after_seq).order_by(events.c.seq).limit(limit)
        if stream_id is not None:
            query = query.where(events.c.stream_id == stream_id)
        if types is not None:
            query = query.where(events.c.type.in_(list(types)))
        return await self._on_reader("read events from", lambda conn: [_recorded(row) for row in conn.execute(query)])

    async def last_seq(self) -> int:
        rows = await self._point(_LAST_SEQ, {})
        return (rows[0][0] if rows else None) or 0

    async def _rows(self, query: sa.Select) -> list[dict[str, Any]]:
        return await self._on_reader("read", lambda conn: [dict(row._mapping) for row in conn.execute(query)])

    async def _row(self, query: sa.Select) -> dict[str, Any] | None:
        rows = await self._rows(query)
        return rows[0] if rows else None

    async def session(self, sid: str) -> dict[str, Any] | None:
        return await self._point_read(_SESSION_BY_ID, {"id": sid})

    async def _list(self, stmt: sa.Select, params: dict[str, Any] | None = None, inline: bool = False
                    ) -> list[dict[str, Any]]:
        """Rows of a prebuilt list statement as dicts: on the reader thread — or, `inline` (a
        list bounded by one session or by the pool), on SQLite right on the loop."""
        params = params or {}
        if inline and self._point_reader is not None:
            rows = await self._point(stmt, params)
        else:
            rows = await self._on_reader("read", lambda conn: fastpath.execute(conn, stmt, params))
        return [fastpath.mapping(row) for row in rows]

    async def sessions(self, include_ended: bool = False, include_pool: bool = True) -> list[dict[str, Any]]:
        """Sessions not ended (or all); `include_pool=False` leaves out pool members nobody
        has claimed yet (what clients list)."""
        return await self._list(queries.SESSIONS[(include_ended, include_pool)])

    async def idle_pool(self) -> list[dict[str, Any]]:
        """Unclaimed pool members not ended or being destroyed, oldest first."""
        return await self._list(queries.IDLE_POOL, inline=True)

    async def execs(self, session_id: str) -> list[dict[str, Any]]:
        return await self._list(queries.EXECS_OF, {"sid": session_id})

    async def exec(self, exec_id: str) -> dict[str, Any] | None:
        return await self._point_read(_EXEC_BY_ID, {"id": exec_id})

    async def exec_by_idempotency_key(self, session_id: str, key: str) -> dict[str, Any] | None:
        return await self._point_read(_EXEC_BY_KEY, {"sid": session_id, "key": key})

    async def pending_execs(self) -> list[dict[str, Any]]:
        """Execs requested or running (for the reconciler), oldest first."""
        return await self._list(queries.PENDING_EXECS)

    async def hosts(self) -> list[dict[str, Any]]:
        """The hosts of a cluster (shared journal), by id; empty on a single host."""
        return await self._list(queries.HOSTS)

    async def processes(self, session_id: str, include_ended: bool = False) -> list[dict[str, Any]]:
        return await self._list(queries.PROCESSES_OF[include_ended], {"sid": session_id}, inline=True)

    async def process(self, process_id: str) -> dict[str, Any] | None:
        return await self._point_read(_PROCESS_BY_ID, {"id": process_id})

    async def process_by_idempotency_key(self, session_id: str, key: str) -> dict[str, Any] | None:
        return await self._point_read(_PROCESS_BY_KEY, {"sid": session_id, "key": key})

    async def pending_processes(self) -> list[dict[str, Any]]:
        """Processes requested or running, oldest first (for the reconciler and the executor)."""
        return await self._list(queries.PENDING_PROCESSES)

    async def workspaces(self) -> list[dict[str, Any]]:
        return await self._list(queries.WORKSPACES)

    async def snapshot_read_tables(self) -> dict[str, list[dict[str, Any]]]:
        snapshot = {}
        for table in schema.READ_TABLES:
            snapshot[table.name] = await self._rows(sa.select(table).order_by(*table.primary_key.columns))
        return snapshot

    # --- whole-journal operations -------------------------------------------------------

    async def verify(self) -> VerifyResult:
        """Recompute the hash chain from the first event; name the first row that disagrees."""
        def run(conn: sa.Connection) -> VerifyResult:
            prev_hash, checked, after = GENESIS_HASH, 0, 0
            while True:
                rows = fastpath.execute(conn, _EVENTS_PAGE, {"after": after})
                if not rows:
                    return VerifyResult(True, checked, None, f"{checked} events, chain intact")
                for row in rows:
                    reason = _check_row(row, prev_hash)
                    if reason:
                        return VerifyResult(False, checked, row.seq, f"event {row.seq}: {reason}")
                    prev_hash, checked, after = row.hash, checked + 1, row.seq

        return await self._on_reader("verify", run)

    async def rebuild(self) -> int:
        """Empty the read tables and replay every event into them (one transaction)."""
        return await self._write("rebuild", self._rebuild, heavy=True)

    def _rebuild(self, conn: Any) -> int:
        count = 0
        for table in schema.READ_TABLES:
            fastpath.execute(conn, _CLEAR[table.name], {})
        after = 0
        while True:
            rows = fastpath.execute(conn, _EVENTS_PAGE, {"after": after})
            if not rows:
                return count
            for row in rows:
                projections.apply(conn, _recorded(row))
            after, count = rows[-1].seq, count + len(rows)


def _connect(db_path: Path, busy_timeout_s: float, sync: str) -> sqlite3.Connection:
    """A driver connection of our own: autocommit (we say BEGIN), WAL, our pragmas."""
    conn = sqlite3.connect(db_path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
    _set_pragmas(conn, busy_timeout_s, sync)
    return conn


def _set_pragmas(conn: Any, busy_timeout_s: float, sync: str) -> None:
    cursor = conn.cursor()
    for pragma in (f"busy_timeout = {int(busy_timeout_s * 1000)}", "journal_mode = WAL", "foreign_keys = ON",
                   f"synchronous = {sync}"):
        cursor.execute(f"PRAGMA {pragma}")
    cursor.close()


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
    if isinstance(command, (c.CreateWorkspace, c.DeleteWorkspace)):
        wanted = ev.workspace_stream(command.workspace_id)
        if stream_id != wanted:
            raise InvalidRequest(f"unable to change workspace {command.workspace_id}: stream must be {wanted}")


def _check_row(row: Any, prev_hash: str) -> str | None:
    if row.prev_hash != prev_hash:
        return "prev_hash does not match the previous event's hash (an event was removed or reordered)"
    try:
        payload = json.loads(row.payload)
    except ValueError:
        return "payload is not valid JSON"
    if canonical_json(payload) != row.payload:
        return "payload is not in canonical form (edited by hand)"
    fields = {k: getattr(row, k) for k in _HASHED_FIELDS}
    if chain_hash(prev_hash, {**fields, "payload": payload}) != row.hash:
        return "hash does not match the event's content (the row was changed)"
    return None


class _Guard:
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
        return JournalError(f"unable to {action} journal {self.path}: {self._cause(exc)}", path=str(self.path))

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
