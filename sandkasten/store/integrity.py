"""Damage to the journal file itself, as SQLite sees it (the hash chain is `Journal.verify`).

Who runs this: the daemon's preflight (before it serves anything), `sandkasten doctor`,
`sandkasten audit verify` and `sandkasten journal rebuild`. Plain sqlite3 on the file: it
must work on a journal too damaged for the rest of the store to open.

Why `integrity_check` and not only `quick_check`: a flipped byte inside an index entry (the
idempotency index, say) passes `quick_check`, which does not compare indexes with their
tables, yet makes a lookup miss — a retried command then ran twice. The full check costs
about 0.6 s per 300k events (measured); `journal.startup_check: quick` trades that away.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

CHECKS = ("quick", "full")
MAX_PROBLEMS = 20


def problems(db_path: Path, full: bool = True, busy_timeout_s: float = 10.0) -> list[str]:
    """What SQLite finds wrong with the file (empty: nothing). Never raises for a damaged file:
    a file too broken to check is itself the problem reported."""
    try:
        conn = sqlite3.connect(Path(db_path).absolute(), timeout=busy_timeout_s)
    except sqlite3.Error as e:
        return [f"unable to open: {e}"]
    try:
        rows = conn.execute(f"PRAGMA {'integrity_check' if full else 'quick_check'}({MAX_PROBLEMS})").fetchall()
    except sqlite3.Error as e:
        return [str(e)]
    finally:
        conn.close()
    found = [str(row[0]) for row in rows]
    return [] if found == ["ok"] else found


def reindex(db_path: Path, busy_timeout_s: float = 10.0) -> None:
    """Rebuild every index from its table (what a damaged index needs; the tables are the truth)."""
    conn = sqlite3.connect(Path(db_path).absolute(), timeout=busy_timeout_s)
    try:
        conn.execute("REINDEX")
        conn.commit()
    finally:
        conn.close()


def summary(found: list[str]) -> str:
    shown = "; ".join(found[:3])
    more = f" (+{len(found) - 3} more)" if len(found) > 3 else ""
    return shown + more
