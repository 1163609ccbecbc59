"""Issue 3's end-to-end path: HTTP and CLI against one real daemon, then the journal's audit."""

from __future__ import annotations

import json
import signal
import sqlite3


def test_http_and_cli_through_one_journal(daemon):
    c = daemon.client
    sid = c.post("/v1/sessions", json={}).json()["id"]
    a = c.post(f"/v1/sessions/{sid}/exec", json={"cmd": "cd /tmp; export X=1"}).json()
    b = c.post(f"/v1/sessions/{sid}/exec", json={"cmd": "pwd; echo $X"}).json()
    assert b["stdout"] == "/tmp\n1\n"

    # the CLI appends a command the daemon carries out
    r = daemon.cli("exec", sid, "echo from-cli; pwd")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "from-cli\n/tmp\n"

    logs = daemon.cli("logs", sid)
    assert logs.returncode == 0, logs.stderr
    for text in ("cd /tmp; export X=1", "pwd; echo $X", "/tmp\n1\n", "from-cli"):
        assert text in logs.stdout

    assert c.delete(f"/v1/sessions/{sid}").json() == {"ok": True}
    ps = json.loads(daemon.cli("ps", "--all", "--json").stdout)
    assert [(s["id"], s["status"]) for s in ps] == [(sid, "destroyed")]
    assert json.loads(daemon.cli("ps", "--json").stdout) == []

    export = daemon.cli("audit", "export", "--format", "jsonl")
    rows = [json.loads(line) for line in export.stdout.splitlines()]
    assert [r["cmd"] for r in rows] == ["cd /tmp; export X=1", "pwd; echo $X", "echo from-cli; pwd"]
    assert rows[1]["exec_id"] == b["exec_id"] and rows[1]["output_sha256"] == b["output_sha256"]
    assert rows[0]["exec_id"] == a["exec_id"] and rows[1]["exit_code"] == 0 and rows[1]["cwd"] == "/tmp"
    assert daemon.cli("audit", "verify").returncode == 0

    # the CLI works with the daemon stopped
    daemon.kill()
    assert sid in daemon.cli("ps", "--all").stdout
    assert "pwd; echo $X" in daemon.cli("logs", sid).stdout

    # tamper with one row by hand: verify names it and fails
    db = sqlite3.connect(daemon.data_dir / "sandkasten.db")
    db.execute("DROP TRIGGER IF EXISTS events_no_update")
    for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='trigger'").fetchall():
        db.execute(f"DROP TRIGGER {name}")
    seq = db.execute("SELECT seq FROM events WHERE type='exec.requested' ORDER BY seq LIMIT 1 OFFSET 1").fetchone()[0]
    db.execute("UPDATE events SET payload = replace(payload, 'echo $X', 'echo $Y') WHERE seq = ?", (seq,))
    db.commit()
    db.close()
    verify = daemon.cli("audit", "verify")
    assert verify.returncode != 0
    assert str(seq) in verify.stdout + verify.stderr


def test_logs_follow_streams_a_running_command(daemon):
    """`sandkasten logs --follow` shows a running command's output as it is written (the same
    feed as the SSE stream), then how it ended."""
    import subprocess
    import threading

    from tests.daemons import BIN

    c = daemon.client
    sid = c.post("/v1/sessions", json={}).json()["id"]
    proc = subprocess.Popen([str(BIN / "sandkasten"), "--config", str(daemon.config_path), "logs", sid,
                             "--follow"], stdout=subprocess.PIPE, text=True)
    try:
        cmd = "echo first; while [ ! -e /workspace/go ]; do sleep 0.05; done; echo second"
        t = threading.Thread(target=lambda: c.post(f"/v1/sessions/{sid}/exec", json={"cmd": cmd}))
        t.start()
        lines = [proc.stdout.readline(), proc.stdout.readline()]
        assert "$ echo first" in lines[0] and lines[1] == "first\n"
        assert c.get(f"/v1/sessions/{sid}/execs").json()[0]["exit_code"] is None  # still running
        c.post(f"/v1/sessions/{sid}/fs/write", json={"path": "go", "text": ""})
        t.join()
        assert proc.stdout.readline() == "second\n"
        assert "exit 0" in proc.stdout.readline()
        c.delete(f"/v1/sessions/{sid}")
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stdout.close()


def test_a_daemon_stopping_with_no_sandbox_leaves_no_cgroup(tmp_path, image_store, cgroup_parent):
    from sandkasten.runtime import cgroups
    from tests.conftest import IMAGE_CACHE
    from tests.daemons import DaemonProc, make_data_dir

    own = cgroups.detect(parent=f"{cgroup_parent}-stop")
    daemon = DaemonProc(make_data_dir(tmp_path, IMAGE_CACHE), own.parent)
    try:
        daemon.start()
        sid = daemon.client.post("/v1/sessions", json={}).json()["id"]
        daemon.kill(signal.SIGTERM)
        assert all(d.is_dir() for d in own._dirs()), "a live sandbox keeps its parent"
        daemon.start()
        assert daemon.client.delete(f"/v1/sessions/{sid}").json() == {"ok": True}
        daemon.kill(signal.SIGTERM)
        assert not any(d.exists() for d in own._dirs())
    finally:
        daemon.close()
        own.destroy_parent()


def test_what_the_daemon_keeps_is_private_to_root(daemon):
    """The journal (every command, its actor, the sessions' env), exec output and workspaces
    are no other host user's business."""
    import stat

    sid = daemon.client.post("/v1/sessions", json={"env": {"TOKEN": "secret"}}).json()["id"]
    daemon.client.post(f"/v1/sessions/{sid}/exec", json={"cmd": "echo out > /workspace/f; echo $TOKEN"})
    db = daemon.data_dir / "sandkasten.db"
    for path in (db, db.with_name("sandkasten.db-wal")):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for name in ("run", "sessions", "workspaces", "logs", "images"):
        assert stat.S_IMODE((daemon.data_dir / name).stat().st_mode) == 0o700, name
    assert daemon.client.post(f"/v1/sessions/{sid}/exec", json={"cmd": "cat /workspace/f"}).json()["stdout"] == "out\n"
