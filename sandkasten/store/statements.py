"""Statements: SQLAlchemy Core, built once, compiled once, run straight on the SQLite driver.

Who uses this: everything in the store that runs SQL — the event store (store/events.py), the
command handler (store/commands.py), the projections and the reads (store/reads.py), always
through a connection that store/connection.py handed them. SQLAlchemy builds and compiles each
statement once; executing it through `Connection.execute` still costs ~0.1 ms of per-call
machinery around a ~0.01 ms SQLite step, so on SQLite the compiled SQL goes to the driver's
cursor directly, with the column types' own bind and result processors (JSON, Boolean) kept
next to it — the same values SQLAlchemy would send and return. `conn` is a `sqlite3.Connection`
(the journal's own connections) or a SQLAlchemy `Connection` (PostgreSQL takes the ordinary
`Connection.execute` path, SQLAlchemy's own statement cache included).

Statements run with `execute` must be long-lived (module constants, or kept by a cache of
their own): the compiled cache knows them by identity. A statement built for one call goes
through `execute_once`.

Threads: the compiled cache is the one shared by every thread of every journal in the process
(the event loop, the writer and reader threads). An entry is created and published under
`_compiling` and never changed afterwards, so a lookup reads it without the lock (one dict
read: atomic), and a miss takes the lock and looks again before compiling.
"""

from __future__ import annotations

import sqlite3
import threading
from collections import namedtuple
from typing import Any, cast
from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.sql.compiler import SQLCompiler

DIALECT = sqlite_dialect.dialect()


class _Compiled:
    """One statement compiled for the sqlite3 driver: its SQL, its parameters in order with
    their bind processors, and a row type with the columns' result processors. Immutable."""

    __slots__ = ("stmt", "sql", "names", "defaults", "binders", "row_type", "results")

    def __init__(self, stmt: sa.ClauseElement) -> None:
        # constant IN lists become one placeholder per value (their values are defaults below)
        # a statement compiles to an SQLCompiler (typed as its base, which lacks positiontup and binds)
        c = cast(SQLCompiler, stmt.compile(dialect=DIALECT, compile_kwargs={"render_postcompile": True}))
        self.stmt = stmt
        self.sql = str(c)
        self.names = tuple(c.positiontup or ())
        self.defaults = dict(c.params)
        binds = [c.binds[k] if k in c.binds else c.binds.get(k.rsplit("_", 1)[0]) for k in self.names]
        self.binders = tuple(b.type._cached_bind_processor(DIALECT) if b is not None else None for b in binds)
        columns = getattr(c, "_result_columns", None) or []
        self.row_type = namedtuple("Row", [col.keyname for col in columns], rename=True) if columns else None
        self.results: tuple[Callable[[Any], Any] | None, ...] = tuple(
            col.type._cached_result_processor(DIALECT, None) for col in columns)

    def args(self, params: dict[str, Any]) -> tuple:
        out = []
        for name, bind in zip(self.names, self.binders, strict=True):
            value = params[name] if name in params else self.defaults[name]
            out.append(bind(value) if bind is not None and value is not None else value)
        return tuple(out)

    def rows(self, raw: list[tuple]) -> list[Any]:
        if self.row_type is None:
            return raw
        procs = self.results
        if any(procs):
            raw = [tuple(p(v) if p is not None else v for p, v in zip(procs, r, strict=True)) for r in raw]
        return [self.row_type(*r) for r in raw]


_compiled: dict[int, _Compiled] = {}   # id(stmt) -> its compiled form (the entry keeps stmt alive)
_compiling = threading.Lock()


def compiled(stmt: sa.ClauseElement) -> _Compiled:
    entry = _compiled.get(id(stmt))
    if entry is not None and entry.stmt is stmt:
        return entry
    with _compiling:
        entry = _compiled.get(id(stmt))
        if entry is None or entry.stmt is not stmt:
            entry = _compiled[id(stmt)] = _Compiled(stmt)
        return entry


def execute(conn: Any, stmt: sa.ClauseElement, params: dict[str, Any]) -> list[Any]:
    """Run `stmt` (a long-lived statement) with `params`; rows (attribute access) for a SELECT."""
    if not isinstance(conn, sqlite3.Connection):
        result = conn.execute(stmt, params)
        return result.all() if result.returns_rows else []
    return _run(conn, compiled(stmt), params)


def execute_once(conn: Any, stmt: sa.ClauseElement, params: dict[str, Any] | None = None) -> list[Any]:
    """`execute` for a statement built for this one call: compiled, run, not kept."""
    if not isinstance(conn, sqlite3.Connection):
        result = conn.execute(stmt, params or {})
        return result.all() if result.returns_rows else []
    return _run(conn, _Compiled(stmt), params or {})


def changed(conn: Any, stmt: sa.ClauseElement, params: dict[str, Any]) -> int:
    """Run a DML statement; how many rows it changed."""
    if not isinstance(conn, sqlite3.Connection):
        return conn.execute(stmt, params).rowcount
    c = compiled(stmt)
    cursor = conn.execute(c.sql, c.args(params))
    try:
        return cursor.rowcount
    finally:
        cursor.close()


def _run(conn: sqlite3.Connection, c: _Compiled, params: dict[str, Any]) -> list[Any]:
    cursor = conn.execute(c.sql, c.args(params))
    try:
        return c.rows(cursor.fetchall()) if cursor.description is not None else []
    finally:
        cursor.close()


def mapping(row: Any) -> dict[str, Any]:
    """A row from `execute` as a dict of column name -> value."""
    return row._asdict() if hasattr(row, "_asdict") else dict(row._mapping)
