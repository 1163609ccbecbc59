"""What journaling costs per exec, measured on the Journal API directly with a temp db:
the three appends of one exec (exec.requested, exec.started, exec.finished) with
`durability: normal` and `full`, events per second, and the floors under them — a plain
sqlite3 INSERT + COMMIT on the same thread, and one aiosqlite round trip (the thread hop
every SQLAlchemy statement makes).

Who runs this: the bench process, on its own event loop (asyncio.run per measurement).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sandkasten.domain import commands as c
from sandkasten.store.journal import Journal

from benchlib import baselines
from benchlib.report import Report
from benchlib.samples import Summary

SECTION = "journal (Journal API on a temp db)"
_ids = itertools.count()


async def _exec_cost(db: Path, durability: str, n: int) -> tuple[Summary, Summary, float]:
    j = await Journal.open(db, durability)
    try:
        sid = "s-bench-journal"
        expires = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
        await j.execute(sid, c.RequestSession(image="base", expires_at=expires), actor="bench")
        await j.execute(sid, c.RecordSandboxStarted(pid=1, start_time=1), actor="bench")
        per_exec, per_append = [], []
        t_all = time.perf_counter()
        for i in range(n + 5):
            eid = f"e{next(_ids)}"
            steps = (c.RequestExec(exec_id=eid, cmd=":", timeout_ms=10_000), c.RecordExecStarted(exec_id=eid),
                     c.RecordExecFinished(exec_id=eid, exit_code=0, cwd="/workspace", duration_ms=0.1))
            t0 = time.perf_counter()
            for cmd in steps:
                t = time.perf_counter()
                await j.execute(sid, cmd, actor="bench")
                if i >= 5:
                    per_append.append((time.perf_counter() - t) * 1000)
            if i >= 5:
                per_exec.append((time.perf_counter() - t0) * 1000)
            else:
                t_all = time.perf_counter()
        events_per_s = 3 * n / (time.perf_counter() - t_all)
        return Summary.of(per_exec), Summary.of(per_append), events_per_s
    finally:
        await j.close()


async def _thread_hop(db: Path, n: int) -> Summary:
    import aiosqlite
    async with aiosqlite.connect(db) as conn:
        for _ in range(10):
            await conn.execute("SELECT 1")
        values = []
        for _ in range(n):
            t = time.perf_counter()
            await conn.execute("SELECT 1")
            values.append((time.perf_counter() - t) * 1000)
        return Summary.of(values)


def journal(report: Report, tmp: Path, n: int) -> None:
    for durability in ("normal", "full"):
        per_exec, per_append, eps = asyncio.run(_exec_cost(tmp / f"journal-{durability}.db", durability, n))
        report.add(SECTION, f"journal.exec.{durability}", f"3 appends of one exec, durability {durability}",
                   per_exec)
        report.add(SECTION, f"journal.append.{durability}", "  one append (decide+insert+project+commit)",
                   per_append)
        report.add(SECTION, f"journal.eps.{durability}", f"  events per second, durability {durability}",
                   value=eps, unit="events/s", note="one writer, sequential")
    for sync in ("NORMAL", "FULL"):
        report.add(SECTION, f"sqlite.commit.{sync.lower()}", f"floor: sqlite3 INSERT+COMMIT, synchronous={sync}",
                   baselines.sqlite_commit(tmp / f"floor-{sync}.db", sync, n * 3))
    report.add(SECTION, "aiosqlite.hop", "floor: one aiosqlite statement (thread hop)",
               asyncio.run(_thread_hop(tmp / "hop.db", n * 3)))
