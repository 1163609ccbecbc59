"""Persistent workspaces over HTTP against a real daemon: they outlive sessions, their files are
reachable without a session, and deleting one in use needs force."""

from __future__ import annotations

import base64
import os

from tests.test_api import assert_error, create, run


def ws_read(daemon, wid, path) -> bytes:
    r = daemon.client.get(f"/v1/workspaces/{wid}/fs/read", params={"path": path})
    assert r.status_code == 200, r.text
    return base64.b64decode(r.json()["content_base64"])


def listed(daemon) -> dict:
    return {w["id"]: w for w in daemon.client.get("/v1/workspaces").json()}


def test_a_workspace_outlives_its_session(daemon):
    c = daemon.client
    s = create(daemon, workspace_id="proj-1")
    assert s["workspace_id"] == "proj-1"
    assert c.post(f"/v1/sessions/{s['id']}/fs/write", json={"path": "notes/a.txt", "text": "hello\n"}).status_code == 200
    run(daemon, s["id"], "echo from-shell > /workspace/b.txt")
    assert listed(daemon)["proj-1"]["in_use_by"] == [s["id"]]
    assert c.delete(f"/v1/sessions/{s['id']}").json() == {"ok": True}

    w = listed(daemon)["proj-1"]
    assert w["in_use_by"] == [] and w["size_bytes"] == 6 + 11
    names = [e["path"] for e in c.get("/v1/workspaces/proj-1/fs", params={"recursive": "true"}).json()["entries"]]
    assert names == ["/workspace/b.txt", "/workspace/notes", "/workspace/notes/a.txt"]
    assert [e["name"] for e in c.get("/v1/workspaces/proj-1/fs", params={"path": "notes"}).json()["entries"]] == ["a.txt"]
    assert ws_read(daemon, "proj-1", "notes/a.txt") == b"hello\n"
    assert ws_read(daemon, "proj-1", "/workspace/b.txt") == b"from-shell\n"
    part = c.get("/v1/workspaces/proj-1/fs/read", params={"path": "notes/a.txt", "max_bytes": 2}).json()
    assert base64.b64decode(part["content_base64"]) == b"he" and part["truncated"] is True

    # written without a session, seen by the next session
    assert c.post("/v1/workspaces/proj-1/fs/write", json={"path": "c.bin", "content_base64":
                                                           base64.b64encode(b"\x00\x01").decode()}).status_code == 200
    up = c.post("/v1/workspaces/proj-1/fs/upload", files=[("f", ("d.txt", b"dd", "text/plain"))], data={"dir": "up"})
    assert up.status_code == 200 and up.json()["entries"][0]["path"] == "/workspace/up/d.txt"
    s2 = create(daemon, workspace_id="proj-1")
    out = run(daemon, s2["id"], "cat notes/a.txt b.txt up/d.txt; od -An -tx1 c.bin; echo more >> notes/a.txt")
    assert out["stdout"].split() == ["hello", "from-shell", "dd", "00", "01"]
    assert ws_read(daemon, "proj-1", "notes/a.txt") == b"hello\nmore\n"


def test_write_creates_a_workspace_owned_by_the_sandbox_user(daemon):
    c = daemon.client
    assert "fresh" not in listed(daemon)
    assert_error(c.get("/v1/workspaces/fresh/fs"), 404, "WORKSPACE_NOT_FOUND")
    r = c.post("/v1/workspaces/fresh/fs/write", json={"path": "src/main.py", "text": "print(1)\n"})
    assert r.status_code == 200, r.text
    assert r.json()["path"] == "/workspace/src/main.py"
    root = daemon.data_dir / "workspaces" / "fresh"
    assert os.stat(root).st_uid == 65534 and os.stat(root / "src" / "main.py").st_uid == 65534
    assert listed(daemon)["fresh"]["size_bytes"] == 9
    s = create(daemon, workspace_id="fresh")
    out = run(daemon, s["id"], "cat src/main.py; echo new > made-inside.txt")
    assert out["stdout"] == "print(1)\n" and out["exit_code"] == 0
    assert ws_read(daemon, "fresh", "made-inside.txt") == b"new\n"
    # the same confinement as a session's file API
    assert_error(c.get("/v1/workspaces/fresh/fs/read", params={"path": "../../etc/passwd"}), 400, "PATH_REFUSED")
    assert_error(c.post("/v1/workspaces/fresh/fs/write", json={"path": "/etc/x", "text": "x"}), 400, "PATH_REFUSED")
    assert_error(c.post("/v1/workspaces/other/fs/write", json={"path": "../fresh/x", "text": "x"}), 400, "PATH_REFUSED")
    assert "other" not in listed(daemon)   # a refused write creates nothing


def test_delete_refused_while_in_use_unless_forced(daemon):
    c = daemon.client
    s = create(daemon, workspace_id="busy")
    run(daemon, s["id"], "echo x > keep.txt")
    body = assert_error(c.delete("/v1/workspaces/busy"), 409, "WORKSPACE_IN_USE")
    assert body["details"]["sessions"] == [s["id"]]
    assert ws_read(daemon, "busy", "keep.txt") == b"x\n"   # nothing was touched

    r = c.delete("/v1/workspaces/busy", params={"force": "true"})
    assert r.status_code == 200, r.text
    assert r.json() == {"ok": True, "destroyed_sessions": [s["id"]]}
    assert c.get(f"/v1/sessions/{s['id']}").json()["status"] == "destroyed"
    assert not (daemon.data_dir / "workspaces" / "busy").exists()
    assert "busy" not in listed(daemon)
    assert_error(c.get("/v1/workspaces/busy/fs/read", params={"path": "keep.txt"}), 404, "WORKSPACE_NOT_FOUND")
    assert_error(c.delete("/v1/workspaces/busy"), 404, "WORKSPACE_NOT_FOUND")
    # a deleted workspace can be created again, empty
    assert c.post("/v1/workspaces/busy/fs/write", json={"path": "new.txt", "text": "n"}).status_code == 200
    assert [e["name"] for e in c.get("/v1/workspaces/busy/fs").json()["entries"]] == ["new.txt"]


def test_delete_an_unused_workspace(daemon):
    c = daemon.client
    s = create(daemon, workspace_id="idle")
    c.delete(f"/v1/sessions/{s['id']}")
    assert c.delete("/v1/workspaces/idle").json() == {"ok": True, "destroyed_sessions": []}
    assert not (daemon.data_dir / "workspaces" / "idle").exists()


def test_bad_and_unknown_ids(daemon):
    c = daemon.client
    for bad in ("-x", "a" * 65, "bad$id", ".hidden", "a%2Fb", "%2E%2E"):
        assert_error(c.get(f"/v1/workspaces/{bad}/fs"), 400, "INVALID_REQUEST")
        assert_error(c.get(f"/v1/workspaces/{bad}/fs/read", params={"path": "a"}), 400, "INVALID_REQUEST")
        assert_error(c.delete(f"/v1/workspaces/{bad}"), 400, "INVALID_REQUEST")
        assert_error(c.post(f"/v1/workspaces/{bad}/fs/write", json={"path": "a", "text": "a"}), 400, "INVALID_REQUEST")
    for verb, url, kw in (("GET", "/v1/workspaces/nope/fs", {}),
                          ("GET", "/v1/workspaces/nope/fs/read", {"params": {"path": "a"}}),
                          ("DELETE", "/v1/workspaces/nope", {})):
        assert_error(c.request(verb, url, **kw), 404, "WORKSPACE_NOT_FOUND")
    assert_error(c.get("/v1/workspaces/nope/fs/read"), 404, "WORKSPACE_NOT_FOUND")
    assert not (daemon.data_dir / "workspaces" / "nope").exists()
    assert c.get("/v1/workspaces").json() == []
