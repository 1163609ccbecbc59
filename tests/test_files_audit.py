"""Files changed through the API are in the audit trail (issue 15): who wrote or deleted what,
when, with the content's sha256 — for a session's /workspace and for a workspace."""

from __future__ import annotations

import hashlib
import json

from tests.daemons import API_KEY


def audit_rows(d) -> list[dict]:
    out = d.cli("audit", "export")
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def test_file_writes_uploads_and_deletes_are_audited(daemon):
    c = daemon.client
    sid = c.post("/v1/sessions", json={}).json()["id"]
    assert c.post(f"/v1/sessions/{sid}/fs/write", json={"path": "notes/a.txt", "text": "secret plan"}).status_code == 200
    up = c.post(f"/v1/sessions/{sid}/fs/upload", files={"f": ("b.bin", b"\x00\x01binary")})
    assert up.status_code == 200, up.text
    assert c.delete(f"/v1/sessions/{sid}/fs", params={"path": "notes", "recursive": "true"}).status_code == 200
    assert c.post("/v1/workspaces/ws-audited/fs/write", json={"path": "w.txt", "text": "kept"}).status_code == 200
    assert c.post(f"/v1/sessions/{sid}/exec", json={"cmd": "echo hi"}).status_code == 200

    rows = audit_rows(daemon)
    files = [r for r in rows if r["kind"] == "file"]
    assert [(r["session"], r["cmd"], r["status"]) for r in files] == [
        (sid, "write /workspace/notes/a.txt (11 bytes)", "written"),
        (sid, "write /workspace/b.bin (8 bytes)", "written"),
        (sid, "delete /workspace/notes (recursive)", "deleted"),
        ("ws:ws-audited", "write /workspace/w.txt (4 bytes)", "written"),
    ]
    assert files[0]["output_sha256"] == hashlib.sha256(b"secret plan").hexdigest()
    assert files[1]["output_sha256"] == hashlib.sha256(b"\x00\x01binary").hexdigest()
    key_id = "api:" + hashlib.sha256(API_KEY.encode()).hexdigest()[:8]
    assert {r["actor"] for r in files} == {key_id}
    assert [r["cmd"] for r in rows if r["kind"] == "exec"] == ["echo hi"]
    assert daemon.cli("audit", "verify").returncode == 0
    assert daemon.cli("doctor").returncode == 0
    # the read tables replay to the same rows with the new events in the journal
    daemon.kill(__import__("signal").SIGTERM)
    assert daemon.cli("journal", "rebuild").returncode == 0
