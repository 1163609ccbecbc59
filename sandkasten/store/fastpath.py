"""Prebuilt SQLAlchemy Core statements run straight on the SQLite driver.

Who uses this: the journal's write path (catch up a stream, insert the event, look up prior
execs, every read-table projection) and its hot point reads. SQLAlchemy builds and compiles
each statement once; executing it through `Connection.execute` still costs ~0.1 ms of
per-call machinery around a ~0.01 ms SQLite step, so on SQLite the compiled SQL goes to the
driver's cursor directly, with the column types' own bind and result processors (JSON,
Boolean) cached next to it — the same values SQLAlchemy would send and return. `conn` is a
`sqlite3.Connection` (the journal's own connections) or a SQLAlchemy `Connection` (any other
database takes the ordinary `Connection.execute` path; a SQLite one goes to its driver).
Statements must be long-lived (module constants): the cache knows them by identity.
"""

from __future__ import annotations

import sqlite3
from collections import namedtuple
from typing import Any, cast
from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.sql.compiler import SQLCompiler

DIALECT = sqlite_dialect.dialect()


class _Compiled:
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


_compiled: dict[int, _Compiled] = {}


def compiled(stmt: sa.ClauseElement) -> _Compiled:
    entry = _compiled.get(id(stmt))
    if entry is None or entry.stmt is not stmt:
        entry = _compiled[id(stmt)] = _Compiled(stmt)
    return entry


def driver(conn: Any) -> sqlite3.Connection | None:
    """The sqlite3 connection under `conn`, or None when it is not SQLite."""
    if isinstance(conn, sqlite3.Connection):
        return conn
    if conn.dialect.name == "sqlite":
        return conn.connection.driver_connection
    return None


def execute(conn: Any, stmt: sa.ClauseElement, params: dict[str, Any]) -> list[Any]:
    """Run `stmt` (a module-level statement) with `params`; rows (attribute access) for a SELECT."""
    raw = driver(conn)
    if raw is None:
        result = conn.execute(stmt, params)
        return result.all() if result.returns_rows else []
    c = compiled(stmt)
    cursor = raw.execute(c.sql, c.args(params))
    try:
        return c.rows(cursor.fetchall()) if cursor.description is not None else []
    finally:
        cursor.close()


def changed(conn: Any, stmt: sa.ClauseElement, params: dict[str, Any]) -> int:
    """Run a DML statement; how many rows it changed."""
    raw = driver(conn)
    if raw is None:
        return conn.execute(stmt, params).rowcount
    c = compiled(stmt)
    cursor = raw.execute(c.sql, c.args(params))
    try:
        return cursor.rowcount
    finally:
        cursor.close()


def mapping(row: Any) -> dict[str, Any]:
    """A row from `execute` as a dict of column name -> value."""
    return row._asdict() if hasattr(row, "_asdict") else dict(row._mapping)
