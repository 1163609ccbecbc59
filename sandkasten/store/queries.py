"""The journal's read statements, prebuilt: built and compiled once (store/statements.py), run
with bound parameters — not a new SQLAlchemy statement per call (building and compiling one
costs about a millisecond, far more than SQLite takes to answer it). Module constants, never
changed: any thread may run them.

Who uses this: store/reads.py (`Journal.sessions()`, `idle_pool()`, `exec()`, …)."""

from __future__ import annotations

import sqlalchemy as sa

from sandkasten.domain.session import DESTROYING, ENDED_STATUSES, POOL_IDLE, UNCLAIMED
from sandkasten.schema.vocabulary import SESSION_ENDED, ExecStatus, SessionStatus
from sandkasten.store.schema import READ_TABLES, execs, hosts, processes, sessions, workspaces

_PENDING = (ExecStatus.REQUESTED, ExecStatus.RUNNING)   # and ProcessStatus's: the same two words
_BY_AGE = (sessions.c.created_at, sessions.c.id)


def _sessions(include_ended: bool, include_pool: bool) -> sa.Select:
    query = sa.select(sessions).order_by(*_BY_AGE)
    if not include_ended:
        query = query.where(sessions.c.status.not_in(ENDED_STATUSES))
    if not include_pool:
        query = query.where(sa.or_(sessions.c.pool.is_(None), sessions.c.pool.not_in(UNCLAIMED)))
    return query


SESSIONS = {(ended, pool): _sessions(ended, pool) for ended in (False, True) for pool in (False, True)}
IDLE_POOL = (sa.select(sessions).where(sessions.c.pool == POOL_IDLE,
                                       sessions.c.status.not_in((*ENDED_STATUSES, DESTROYING))).order_by(*_BY_AGE))
EXECS_OF = sa.select(execs).where(execs.c.session_id == sa.bindparam("sid")).order_by(execs.c.seq_no)
PENDING_EXECS = (sa.select(execs).where(execs.c.status.in_(_PENDING))
                 .order_by(execs.c.requested_at, execs.c.session_id, execs.c.seq_no))
PROCESSES_OF = {   # (no IN (…) beside a bound parameter: fastpath renders constant lists at compile time)
    ended: (sa.select(processes).where(processes.c.session_id == sa.bindparam("sid"),
                                       *(() if ended else (sa.or_(*(processes.c.status == s for s in _PENDING)),)))
            .order_by(processes.c.requested_at, processes.c.id))
    for ended in (False, True)}
PENDING_PROCESSES = (sa.select(processes).where(processes.c.status.in_(_PENDING))
                     .order_by(processes.c.requested_at, processes.c.id))
WORKSPACES = sa.select(workspaces).order_by(workspaces.c.created_at, workspaces.c.id)
HOSTS = sa.select(hosts).order_by(hosts.c.id)
# what admission counts: sessions not ended and the memory they were granted (through the status
# index over the statuses not ended, so bounded by limits.max_sessions, not by the journal's age)
_NOT_ENDED = tuple(s for s in SessionStatus if s not in SESSION_ENDED)
HOLDINGS = sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(sessions.c.mem_limit_mb), 0)).where(
    sessions.c.status.in_(_NOT_ENDED))

# point reads: one row by its key
SESSION_BY_ID = sa.select(sessions).where(sessions.c.id == sa.bindparam("id"))
EXEC_BY_ID = sa.select(execs).where(execs.c.id == sa.bindparam("id"))
EXEC_BY_KEY = sa.select(execs).where(execs.c.session_id == sa.bindparam("sid"),
                                     execs.c.idempotency_key == sa.bindparam("key"))
PROCESS_BY_ID = sa.select(processes).where(processes.c.id == sa.bindparam("id"))
PROCESS_BY_KEY = sa.select(processes).where(processes.c.session_id == sa.bindparam("sid"),
                                            processes.c.idempotency_key == sa.bindparam("key"))
# every read table whole, by primary key (snapshots: a test proves replay equals the live tables)
WHOLE_TABLES = {table.name: sa.select(table).order_by(*table.primary_key.columns) for table in READ_TABLES}
