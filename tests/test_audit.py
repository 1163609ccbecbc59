"""Audit export (JSONL, CSV) of every exec, from the events, and chain verification."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from datetime import datetime, timedelta, timezone

import pytest

from sandkasten.domain import (
    RecordExecFinished,
    RecordExecLost,
    RecordExecStarted,
    RecordSandboxStarted,
    RequestExec,
    RequestSession,
)
from sandkasten.errors import InvalidRequest
from sandkasten.store import audit
from sandkasten.store.journal import Journal

pytestmark = pytest.mark.anyio
SHA = "5f" * 32


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
async def journal(tmp_path):
    j = await Journal.open(tmp_path / "j.db")
    expires = datetime.now(timezone.utc) + timedelta(hours=1)
    for sid in ("s-1", "s-2"):
        await j.execute(sid, RequestSession(image="busybox", expires_at=expires), actor="api")
        await j.execute(sid, RecordSandboxStarted(pid=1, start_time=1), actor="reconciler")
    await j.execute("s-1", RequestExec("e-1", "cd /tmp && ls", 1000), actor="key-alice")
    await j.execute("s-1", RecordExecStarted("e-1"), actor="executor")
    await j.execute("s-1", RecordExecFinished("e-1", 0, "/tmp", 17, 10, 0, SHA), actor="executor")
    await j.execute("s-2", RequestExec("e-2", 'echo "a,b"', 1000), actor="cli")
    await j.execute("s-2", RecordExecLost("e-2", "runner died"), actor="reconciler")
    await j.execute("s-1", RequestExec("e-3", "sleep 100", 1000), actor="key-bob")
    yield j
    await j.close()


async def test_export_jsonl_has_one_row_per_exec(journal):
    out = io.StringIO()
    assert await audit.export(journal, "jsonl", None, None, out) == 3
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["exec_id"] for r in rows] == ["e-1", "e-2", "e-3"]
    first = rows[0]
    assert {k: first[k] for k in ("actor", "session", "cmd", "cwd", "exit_code", "duration_ms", "output_sha256", "status")} == {
        "actor": "key-alice", "session": "s-1", "cmd": "cd /tmp && ls", "cwd": "/tmp", "exit_code": 0,
        "duration_ms": 17, "output_sha256": SHA, "status": "finished",
    }
    assert datetime.fromisoformat(first["requested_at"]).tzinfo is not None
    assert (rows[1]["status"], rows[1]["exit_code"], rows[1]["actor"]) == ("lost", None, "cli")
    assert rows[2]["status"] == "requested"
    assert set(first) == set(audit.FIELDS)


async def test_export_csv_quotes_commands(journal):
    out = io.StringIO()
    await audit.export(journal, fmt="csv", session="s-2", out=out)
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert len(rows) == 1
    assert rows[0]["cmd"] == 'echo "a,b"'
    assert (rows[0]["exec_id"], rows[0]["status"], rows[0]["exit_code"], rows[0]["session"]) == ("e-2", "lost", "", "s-2")
    assert list(rows[0]) == list(audit.FIELDS)


async def test_export_since_skips_older_execs(journal):
    [e3] = [e for e in await journal.events() if e.type == "exec.requested" and e.payload["exec_id"] == "e-3"]
    out = io.StringIO()
    await audit.export(journal, "jsonl", since=datetime.fromisoformat(e3.created_at), out=out)
    assert [json.loads(line)["exec_id"] for line in out.getvalue().splitlines()] == ["e-3"]


async def test_export_refuses_unknown_format(journal):
    with pytest.raises(InvalidRequest, match="xml"):
        await audit.export(journal, "xml", None, None, io.StringIO())


async def test_export_comes_from_events_not_read_tables(journal):
    raw = sqlite3.connect(journal.path)
    try:
        raw.execute("DELETE FROM execs")
        raw.commit()
    finally:
        raw.close()
    out = io.StringIO()
    assert await audit.export(journal, "jsonl", out=out) == 3


async def test_verify_reports_ok_then_names_the_tampered_seq(journal):
    result = await audit.verify(journal)
    assert result.ok and result.checked == await journal.last_seq()
    raw = sqlite3.connect(journal.path)
    try:
        raw.execute("DROP TRIGGER events_no_update")
        raw.execute("UPDATE events SET actor = 'mallory' WHERE seq = 6")
        raw.commit()
    finally:
        raw.close()
    result = await audit.verify(journal)
    assert (result.ok, result.first_bad_seq) == (False, 6)
