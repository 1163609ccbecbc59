"""The journal: append events through `decide`, keep read tables in step, verify the chain.

Who runs this: the daemon (HTTP handlers, executor, reconciler) and the CLI, as separate
processes on the same SQLite file. Every write is one transaction — load the stream's state,
decide, append with the hash chain, update read tables, commit — so two processes take turns
on the write lock (busy_timeout) instead of failing.

`Journal` is the facade over four parts, each its own module:

- store/connection.py — the one way to the database: SQLite (group commit on the loop or the
  writer thread, point reads on the loop, lists on the reader thread) or PostgreSQL (a writer
  thread under an advisory lock, a reader thread); which thread owns which connection;
  foreign errors become `JournalError`;
- store/events.py — the event store: append with the hash chain, read events, verify;
- store/commands.py — command handling: load state (cached, under a lock), decide, append,
  project; the listeners told of every commit;
- store/reads.py — the read queries (`Journal` is a `Reads`).
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar
from collections.abc import Callable

from sandkasten.domain import commands as c
from sandkasten.domain import events as ev
from sandkasten.domain.events import RecordedEvent
from sandkasten.domain.session import SessionState, State
from sandkasten.domain.workspace import WorkspaceState
from sandkasten.errors import ConcurrencyConflict
from sandkasten.store import connection, events, postgres, projections
from sandkasten.store.commands import CommandHandler, check_stream
from sandkasten.store.connection import Database
from sandkasten.store.events import GENESIS_HASH, VerifyResult, canonical_json, chain_hash, now
from sandkasten.store.reads import Reads

T = TypeVar("T")
DURABILITIES = connection.DURABILITIES
_APPEND_ATTEMPTS = 5
_LARGE_BATCH = 16        # execute_many with more commands than this is written off the event loop

__all__ = ["Journal", "RecordedEvent", "VerifyResult", "GENESIS_HASH", "canonical_json", "chain_hash", "now"]


class Journal(Reads):
    def __init__(self, db: Database, handler: CommandHandler, durability: str, busy_timeout_s: float) -> None:
        super().__init__(db)
        self.path = db.path
        self.url = db.url          # the PostgreSQL URL of a shared journal; None on SQLite
        self.durability = durability
        self.busy_timeout_s = busy_timeout_s
        self._handler = handler

    @property
    def listeners(self) -> list[Callable[[list[RecordedEvent]], None]]:
        """Called on the event loop with the events of every commit of this journal, in order."""
        return self._handler.listeners

    @property
    def fence(self) -> tuple[str, int] | None:
        """cluster: (host_id, epoch) of the daemon appending; sandbox observations on sessions
        placed elsewhere are refused (domain.host.fenced). None on a single host."""
        return self._handler.fence

    @fence.setter
    def fence(self, value: tuple[str, int] | None) -> None:
        self._handler.fence = value

    # --- lifecycle ------------------------------------------------------------------------

    @classmethod
    async def open(cls, db_path: Path | str, durability: str = "normal", *, busy_timeout_s: float = 10.0) -> Journal:
        """Create the parent dir, migrate (alembic, in a thread, only when behind), connect.
        A `postgresql…://` URL instead of a path opens the shared journal of a cluster."""
        db: Database
        if postgres.is_url(db_path):
            handler = CommandHandler(shared=True)
            db = await connection.open_postgres(str(db_path), durability, busy_timeout_s, handler)
        else:
            handler = CommandHandler(shared=False)
            path = Path(db_path).absolute()  # noqa: ASYNC240 - reads the cwd, no file I/O
            db = await connection.open_sqlite(path, durability, busy_timeout_s, handler)
        return cls(db, handler, durability, busy_timeout_s)

    @classmethod
    def check(cls, db_path: Path | str, busy_timeout_s: float = 10.0, full: bool = True) -> None:
        """Blocking preflight for the daemon: migrate the file, read its schema once and let
        SQLite check every page (`integrity`), so a corrupt, locked or unwritable journal stops
        the start with one clear line — before anything is written on top of the damage.
        A PostgreSQL journal is migrated and read once (the server guards its own pages)."""
        connection.check(db_path, busy_timeout_s, full)

    async def close(self) -> None:
        await self._db.close()

    # --- the write path -------------------------------------------------------------------

    async def execute(
        self, stream_id: str, command: c.Command, *, actor: str, request_id: str | None = None
    ) -> list[RecordedEvent]:
        """decide + append + project in one transaction; retries a lost version race."""
        if isinstance(command, c.RequestSession) and command.session_id is None:
            command = replace(command, session_id=stream_id)
        check_stream(stream_id, command)
        for attempt in range(1, _APPEND_ATTEMPTS + 1):
            try:
                return await self._write("append to", self._handler.append, stream_id, command, actor, request_id)
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
            check_stream(stream_id, command)
        append = self._handler.append

        def append_all(conn: Any) -> list[RecordedEvent]:
            return [e for stream_id, command in items for e in append(conn, stream_id, command, actor, request_id)]

        return await self._write("append to", append_all, heavy=len(items) > _LARGE_BATCH)

    def defer_all(self, stream_id: str, commands: list[c.Command], *, actor: str,
                  at: str) -> tuple[asyncio.Future, list[ev.NewEvent]] | None:
        """Observations to journal right after the caller has answered its client (`flush`), in
        one transaction stamped `at`: (the commit's future, the events it will append). Only
        where that cannot change the outcome — SQLite with `durability: normal` (no fsync
        either way; a crash before the commit is recovered from the runner, which keeps the
        result), nothing queued ahead, the stream's state known to be current and `decide`
        accepting every command on it. Otherwise None: append the usual way."""
        if self.durability != "normal" or not self._db.deferrable():
            return None
        planned = self._handler.plan(stream_id, commands)
        if planned is None:
            return None
        handler = self._handler

        def append_all(conn: Any) -> list[RecordedEvent]:
            return [e for command in commands for e in handler.append(conn, stream_id, command, actor, None, at)]

        return self._db.defer(lambda conn: handler.in_txn(append_all, conn)), planned

    def flush(self) -> None:
        """Write deferred appends now (an HTTP handler calls this once its answer is sent)."""
        self._db.flush()

    async def written(self) -> None:
        """Wait until every append submitted so far (deferred ones too) is written."""
        await self._db.written()

    async def _write(self, action: str, fn: Callable[..., T], *args: Any, heavy: bool = False) -> T:
        """`fn(conn, *args)` inside a write transaction, its memory rolled back with its savepoint."""
        in_txn = self._handler.in_txn
        return await self._db.write(action, lambda conn: in_txn(fn, conn, *args), heavy=heavy)

    # --- states -----------------------------------------------------------------------------

    async def state(self, stream_id: str) -> State | None:
        query, params, base = self._handler.catch_up(stream_id)
        return self._handler.loaded(stream_id, base, await self._db.rows(query, params, inline=True))

    async def session_state(self, sid: str) -> SessionState | None:
        """The folded state of session `sid`; None when it has no stream or its stream is not a
        session's (a workspace's or a host's id is no session)."""
        state = await self.state(sid)
        return state if isinstance(state, SessionState) else None

    async def workspace_state(self, stream_id: str) -> WorkspaceState | None:
        """The folded state of a workspace's stream (`ws:<id>`); None as for `session_state`."""
        state = await self.state(stream_id)
        return state if isinstance(state, WorkspaceState) else None

    # --- whole-journal operations -------------------------------------------------------

    async def verify(self) -> VerifyResult:
        """Recompute the hash chain from the first event; name the first row that disagrees."""
        return await self._db.read("verify", events.verify)

    async def rebuild(self) -> int:
        """Empty the read tables and replay every event into them (one transaction)."""
        return await self._write("rebuild", projections.rebuild, heavy=True)
