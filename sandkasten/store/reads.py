"""The journal's reads: one method per question, each over a prebuilt statement
(store/queries.py, store/events.py), each answering with the rows callers use — a dict of
column -> value per row (`Row`; the aliases say which table's), `RecordedEvent`s for events.

Where each runs (store/connection.py): on SQLite, point reads (one row by its key) and lists
bounded by one session or by the pool run right on the event loop — a read in WAL mode never
waits for a writer — and lists of the whole journal, events and snapshots on the reader thread;
on PostgreSQL every read runs on the reader thread. `Reads` keeps no state besides its database:
the facade `Journal` (store/journal.py) is a `Reads` with the write path on top.
"""

from __future__ import annotations

from typing import Any
from collections.abc import Iterable

import sqlalchemy as sa

from sandkasten.domain.events import RecordedEvent
from sandkasten.store import events, queries, statements
from sandkasten.store.connection import Database

Row = dict[str, Any]
SessionRow = Row        # a `sessions` row
ExecRow = Row           # an `execs` row
ProcessRow = Row        # a `processes` row
WorkspaceRow = Row      # a `workspaces` row
HostRow = Row           # a `hosts` row (a cluster's)


class Reads:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def _one(self, stmt: sa.ClauseElement, params: dict[str, Any]) -> Row | None:
        rows = await self._db.rows(stmt, params, inline=True)
        return statements.mapping(rows[0]) if rows else None

    async def _all(self, stmt: sa.ClauseElement, params: dict[str, Any] | None = None, *,
                   inline: bool = False) -> list[Row]:
        rows = await self._db.rows(stmt, params or {}, inline=inline)
        return [statements.mapping(row) for row in rows]

    # --- sessions -----------------------------------------------------------------------

    async def session(self, sid: str) -> SessionRow | None:
        return await self._one(queries.SESSION_BY_ID, {"id": sid})

    async def sessions(self, include_ended: bool = False, include_pool: bool = True) -> list[SessionRow]:
        """Sessions not ended (or all); `include_pool=False` leaves out pool members nobody
        has claimed yet (what clients list)."""
        return await self._all(queries.SESSIONS[(include_ended, include_pool)])

    async def holdings(self) -> tuple[int, int]:
        """(sessions not ended, the MB of memory granted to them): what admission counts."""
        [(count, mem_mb)] = await self._db.rows(queries.HOLDINGS, {}, inline=True)
        return int(count), int(mem_mb)

    async def idle_pool(self) -> list[SessionRow]:
        """Unclaimed pool members not ended or being destroyed, oldest first."""
        return await self._all(queries.IDLE_POOL, inline=True)

    # --- execs and processes ------------------------------------------------------------

    async def exec(self, exec_id: str) -> ExecRow | None:
        return await self._one(queries.EXEC_BY_ID, {"id": exec_id})

    async def exec_by_idempotency_key(self, session_id: str, key: str) -> ExecRow | None:
        return await self._one(queries.EXEC_BY_KEY, {"sid": session_id, "key": key})

    async def execs(self, session_id: str) -> list[ExecRow]:
        return await self._all(queries.EXECS_OF, {"sid": session_id})

    async def pending_execs(self) -> list[ExecRow]:
        """Execs requested or running (for the reconciler), oldest first."""
        return await self._all(queries.PENDING_EXECS)

    async def process(self, process_id: str) -> ProcessRow | None:
        return await self._one(queries.PROCESS_BY_ID, {"id": process_id})

    async def process_by_idempotency_key(self, session_id: str, key: str) -> ProcessRow | None:
        return await self._one(queries.PROCESS_BY_KEY, {"sid": session_id, "key": key})

    async def processes(self, session_id: str, include_ended: bool = False) -> list[ProcessRow]:
        return await self._all(queries.PROCESSES_OF[include_ended], {"sid": session_id}, inline=True)

    async def pending_processes(self) -> list[ProcessRow]:
        """Processes requested or running, oldest first (for the reconciler and the executor)."""
        return await self._all(queries.PENDING_PROCESSES)

    # --- workspaces, hosts --------------------------------------------------------------

    async def workspaces(self) -> list[WorkspaceRow]:
        return await self._all(queries.WORKSPACES)

    async def hosts(self) -> list[HostRow]:
        """The hosts of a cluster (shared journal), by id; empty on a single host."""
        return await self._all(queries.HOSTS)

    # --- events, snapshots --------------------------------------------------------------

    async def events(
        self, after_seq: int = 0, stream_id: str | None = None, limit: int = 1000, types: Iterable[str] | None = None
    ) -> list[RecordedEvent]:
        return await self._db.read("read events from",
                                   lambda conn: events.read(conn, after_seq, stream_id, limit, types))

    async def last_seq(self) -> int:
        rows = await self._db.rows(events.LAST_SEQ, {}, inline=True)
        return (rows[0][0] if rows else None) or 0

    async def snapshot_read_tables(self) -> dict[str, list[Row]]:
        """Every read table's rows by primary key, in one read transaction."""
        def read(conn: Any) -> dict[str, list[Row]]:
            return {name: [statements.mapping(row) for row in statements.execute(conn, stmt, {})]
                    for name, stmt in queries.WHOLE_TABLES.items()}

        return await self._db.read("read", read)
