"""Journal damage is noticed (issue 15): a flipped byte in an index, a corrupt page, a truncated
WAL and a failed start-up reconcile each stop the daemon from building on it, and no sandbox
the journal lost is destroyed."""

from __future__ import annotations

import json
import sqlite3
import subprocess

from sandkasten.runtime.sandboxes import Runtime
from tests.daemons import BIN

KEY = "retry-me-key-0001"


def db(d):
    return d.data_dir / "sandkasten.db"


def start_fails(d) -> str:
    r = subprocess.run([str(BIN / "sandkasten"), "--config", str(d.config_path)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    return r.stderr


def flip_in_index(path, index_table: str, needle: bytes) -> None:
    """Change one byte of `needle` inside the b-tree pages of the indexes of `index_table`."""
    conn = sqlite3.connect(path)
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    roots = [r[0] for r in conn.execute("SELECT rootpage FROM sqlite_master WHERE type='index' AND tbl_name=?",
                                        (index_table,))]
    conn.close()
    data = bytearray(path.read_bytes())
    flipped = 0
    for root in roots:
        start = (root - 1) * page
        at = data.find(needle, start, start + page)
        if at >= 0 and not flipped:
            data[at + len(needle) - 1] ^= 0x01
            flipped += 1
    assert flipped, f"{needle!r} not found in the indexes of {index_table}"
    path.write_bytes(bytes(data))


def exec_keyed(d, sid, cmd):
    return d.client.post(f"/v1/sessions/{sid}/exec", json={"cmd": cmd}, headers={"Idempotency-Key": KEY})


def test_a_flipped_byte_in_the_idempotency_index_is_found_and_repaired(daemon_factory):
    d = daemon_factory().start()
    sid = d.client.post("/v1/sessions", json={}).json()["id"]
    cmd = "echo once >> /workspace/count"
    first = exec_keyed(d, sid, cmd).json()
    d.kill(__import__("signal").SIGTERM)  # a clean stop: the WAL is checkpointed into the file
    flip_in_index(db(d), "execs", KEY.encode())

    doctor = d.cli("doctor", "--json")
    assert doctor.returncode == 1 and json.loads(doctor.stdout)["damage"], doctor.stdout
    verify = d.cli("audit", "verify")
    assert verify.returncode == 1 and "journal file damaged" in verify.stdout, verify.stdout
    assert "damaged" in start_fails(d)

    rebuilt = d.cli("journal", "rebuild")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert d.cli("audit", "verify").returncode == 0
    d.start()
    again = exec_keyed(d, sid, cmd).json()
    assert again["exec_id"] == first["exec_id"]
    count = d.client.post(f"/v1/sessions/{sid}/exec", json={"cmd": "wc -l < /workspace/count"}).json()
    assert count["stdout"] == "1\n", "the retried command ran twice"


def test_a_corrupt_page_stops_the_start(daemon_factory):
    d = daemon_factory().start()
    for _ in range(3):
        d.client.post("/v1/sessions", json={})
    d.kill(__import__("signal").SIGTERM)
    conn = sqlite3.connect(db(d))
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name='sessions'").fetchone()[0]
    conn.close()
    data = bytearray(db(d).read_bytes())
    start = (root - 1) * page
    data[start + 8:start + page] = b"\xa5" * (page - 8)   # all but the page type: cell pointers and cells
    db(d).write_bytes(bytes(data))
    err = start_fails(d)
    assert "journal" in err and ("damaged" in err or "corrupt" in err), err
    assert d.proc is None  # it never served: no session could be created on top of the damage


def test_a_session_the_journal_lost_keeps_its_sandbox(daemon_factory):
    """The WAL is cut off after a crash: the journal no longer knows a session whose sandbox ran
    commands. Its exec logs prove it existed: it is kept and reported, never swept as an orphan."""
    d = daemon_factory().start()
    sid = d.client.post("/v1/sessions", json={}).json()["id"]
    assert d.client.post(f"/v1/sessions/{sid}/exec", json={"cmd": "echo precious > /workspace/f"}).status_code == 200
    d.kill()
    wal = db(d).with_name("sandkasten.db-wal")
    assert wal.stat().st_size > 32, "the session's events were expected in the WAL"
    with open(wal, "r+b") as f:
        f.truncate(32)   # only the WAL header survives
    db(d).with_name("sandkasten.db-shm").unlink(missing_ok=True)
    d.start()
    assert d.client.get(f"/v1/sessions/{sid}").status_code == 404   # the journal did lose it
    rt = Runtime.detect(d.data_dir, cgroup_parent=d.cgroup_parent)
    try:
        assert rt.observe(sid).healthy, "the sandbox of a session the journal lost was destroyed"
    finally:
        rt.close()
    assert sid in d.client.get("/readyz").json()["detail"]["reconcile"]["unknown_to_journal_kept"]
    doctor = d.cli("doctor", "--json")
    assert doctor.returncode == 1
    problems = {x["session_id"]: x["problem"] for x in json.loads(doctor.stdout)["drift"]}
    assert "the journal lost this session" in problems[sid]


def test_changes_are_refused_while_the_startup_reconcile_failed(daemon_factory):
    d = daemon_factory().start()
    sid = d.client.post("/v1/sessions", json={}).json()["id"]
    d.kill(__import__("signal").SIGTERM)
    conn = sqlite3.connect(db(d))
    conn.row_factory = sqlite3.Row
    row = dict(conn.execute("SELECT * FROM sessions WHERE id=?", (sid,)).fetchone())
    row["id"] = "Bad/Session"     # a read-table row no session id can have: the reconcile trips on it
    conn.execute(f"INSERT INTO sessions ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", list(row.values()))
    conn.commit()
    conn.close()
    d.start(wait_ready=False)
    ready = d.client.get("/readyz")
    for _ in range(100):
        if ready.json()["detail"].get("phase") == "failed":
            break
        __import__("time").sleep(0.1)
        ready = d.client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["detail"]["phase"] == "failed", ready.text
    r = d.client.post("/v1/sessions", json={})
    assert r.status_code == 503 and r.json()["error_code"] == "NOT_READY", r.text
    assert "start-up reconcile failed" in r.json()["message"]
    r = d.client.post(f"/v1/sessions/{sid}/exec", json={"cmd": "true"})
    assert r.status_code == 503
    assert d.client.get("/v1/sessions").status_code == 200   # reads still work
