"""Prebuilt SQLAlchemy Core statements run straight on the SQLite driver.

Who uses this: the journal's writer thread, for the few statements every append runs (catch
up the stream, insert the event, look up prior execs, update the read tables). SQLAlchemy
builds and compiles each statement once; executing it through `Connection.execute` still
costs ~0.1 ms of per-call machinery around a ~0.01 ms SQLite step, so on SQLite the compiled
SQL goes to the driver's cursor directly. Any other database (or a parameter that needs type
processing, like a JSON dict) takes the ordinary `Connection.execute` path.
"""

from __future__ import annotations

from collections import namedtuple
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

_PLAIN = (str, int, float, type(None))


@dataclass(frozen=True)
class _Compiled:
    sql: str
    names: tuple[str, ...]
    defaults: dict[str, Any]


_compiled: dict[int, tuple[sa.Executable, _Compiled]] = {}
_row_types: dict[tuple[str, ...], type] = {}


def execute(conn: sa.Connection, stmt: sa.Executable, params: dict[str, Any]) -> list[Any]:
    """Run `stmt` (a module-level or cached statement) with `params`; rows for a SELECT."""
    if conn.dialect.name != "sqlite" or not all(isinstance(v, _PLAIN) for v in params.values()):
        result = conn.execute(stmt, params)
        return result.all() if result.returns_rows else []
    entry = _compiled.get(id(stmt))
    if entry is None or entry[0] is not stmt:
        c = stmt.compile(dialect=conn.dialect)
        entry = _compiled[id(stmt)] = (stmt, _Compiled(str(c), tuple(c.positiontup or ()), dict(c.params)))
    compiled = entry[1]
    cursor = conn.connection.driver_connection.cursor()
    try:
        cursor.execute(compiled.sql, tuple(params[k] if k in params else compiled.defaults[k]
                                           for k in compiled.names))
        if cursor.description is None:
            return []
        names = tuple(d[0] for d in cursor.description)
        row_type = _row_types.get(names) or _row_types.setdefault(names, namedtuple("Row", names))
        return [row_type(*r) for r in cursor.fetchall()]
    finally:
        cursor.close()
