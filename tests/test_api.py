"""Black-box tests of the HTTP API against a real daemon on a loopback port."""

from __future__ import annotations

import sqlite3
import time

import httpx

from tests.daemons import API_KEY


def create(daemon, **body) -> dict:
    r = daemon.client.post("/v1/sessions", json=body)
    assert r.status_code == 201, r.text
    return r.json()


def run(daemon, sid, cmd, **extra) -> dict:
    r = daemon.client.post(f"/v1/sessions/{sid}/exec", json={"cmd": cmd, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def assert_error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error_code"] == code and body["message"], body
    return body


def test_session_lifecycle_and_shell_state(daemon):
    s = create(daemon)
    assert s["status"] == "running" and s["image"] == "base" and s["cwd"] == "/workspace"
    sid = s["id"]
    first = run(daemon, sid, "cd /tmp; export X=1")
    assert first["exit_code"] == 0 and first["cwd"] == "/tmp"
    second = run(daemon, sid, "pwd; echo $X; echo oops >&2; exit 3")
    assert second["stdout"] == "/tmp\n1\n" and second["stderr"] == "oops\n"
    assert second["exit_code"] == 3 and second["output"] == "/tmp\n1\noops\n"
    history = daemon.client.get(f"/v1/sessions/{sid}/execs").json()
    assert [h["cmd"] for h in history] == ["cd /tmp; export X=1", "pwd; echo $X; echo oops >&2; exit 3"]
    one = daemon.client.get(f"/v1/sessions/{sid}/execs/{second['exec_id']}").json()
    assert one["stdout"] == "/tmp\n1\n" and one["exit_code"] == 3
    stats = daemon.client.get(f"/v1/sessions/{sid}/stats").json()
    assert stats["memory_limit"] == 512 * 1024 * 1024 and stats["pids"] >= 1
    assert daemon.client.get("/v1/sessions").json()[0]["id"] == sid
    assert daemon.client.delete(f"/v1/sessions/{sid}").json() == {"ok": True}
    assert daemon.client.get(f"/v1/sessions/{sid}").json()["status"] == "destroyed"
    assert daemon.client.get("/v1/sessions").json() == []
    assert [x["id"] for x in daemon.client.get("/v1/sessions?all=true").json()] == [sid]
    assert_error(daemon.client.post(f"/v1/sessions/{sid}/exec", json={"cmd": "true"}), 410, "SESSION_ENDED")


def test_auth(daemon):
    assert httpx.get(daemon.url + "/healthz").json()["status"] == "ok"
    assert_error(httpx.get(daemon.url + "/v1/sessions"), 401, "UNAUTHORIZED")
    assert_error(httpx.get(daemon.url + "/v1/sessions", headers={"Authorization": "Bearer nope"}),
                 401, "UNAUTHORIZED")
    assert_error(httpx.post(daemon.url + "/v1/sessions", json={}), 401, "UNAUTHORIZED")
    assert httpx.get(daemon.url + "/v1/sessions",
                     headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200


def test_not_found_never_500(daemon):
    c = daemon.client
    assert_error(c.get("/v1/sessions/s-000000000000"), 404, "SESSION_NOT_FOUND")
    assert_error(c.get("/v1/sessions/..%2Fetc"), 404, "SESSION_NOT_FOUND")
    assert_error(c.delete("/v1/sessions/s-nope"), 404, "SESSION_NOT_FOUND")
    assert_error(c.post("/v1/sessions/s-nope/exec", json={"cmd": "true"}), 404, "SESSION_NOT_FOUND")
    assert_error(c.get("/v1/sessions/s-nope/stats"), 404, "SESSION_NOT_FOUND")
    assert_error(c.get("/v1/nothing-here"), 404, "NOT_FOUND")
    sid = create(daemon)["id"]
    assert_error(c.get(f"/v1/sessions/{sid}/execs/x-nope"), 404, "EXEC_NOT_FOUND")


def test_bad_input_gets_clear_errors_and_daemon_keeps_serving(daemon):
    c = daemon.client
    sid = create(daemon)["id"]
    bad = [
        c.post(f"/v1/sessions/{sid}/exec", content=b"{not json", headers={"content-type": "application/json"}),
        c.post(f"/v1/sessions/{sid}/exec", json={}),
        c.post(f"/v1/sessions/{sid}/exec", json={"cmd": ""}),
        c.post(f"/v1/sessions/{sid}/exec", json={"cmd": 42}),
        c.post(f"/v1/sessions/{sid}/exec", json={"cmd": "true", "timeout_ms": -5}),
        c.post(f"/v1/sessions/{sid}/exec", json={"cmd": "true", "timeout_ms": "soon"}),
        c.post(f"/v1/sessions/{sid}/exec", json={"cmd": "true", "bogus": 1}),
        c.post(f"/v1/sessions/{sid}/exec", json=["cmd"]),
        c.post("/v1/sessions", json={"image": "no-such-image"}),
        c.post("/v1/sessions", json={"mem_limit_mb": 0}),
        c.post("/v1/sessions", json={"cpu_limit": -1}),
        c.post("/v1/sessions", json={"pids_limit": 10 ** 9}),
        c.post("/v1/sessions", json={"ttl_seconds": "long"}),
        c.post("/v1/sessions", json={"workspace_id": "../../etc"}),
        c.post("/v1/sessions", json={"env": {"BAD NAME": "x"}}),
        c.post("/v1/sessions", json={"unknown": True}),
        c.post(f"/v1/sessions/{sid}/exec", content=b'{"cmd": "echo \\udc80"}',
               headers={"content-type": "application/json"}),   # a lone surrogate: not Unicode
        c.post(f"/v1/sessions/{sid}/exec", json={"cmd": "true", "max_output_bytes": 0}),
    ]
    for r in bad:
        assert r.status_code in (400, 422), r.text
        assert r.json()["error_code"] and r.json()["message"]
    assert bad[8].json()["error_code"] == "IMAGE_NOT_FOUND"
    big = c.post(f"/v1/sessions/{sid}/exec", content=b"x" * (17 * 1024 * 1024),
                 headers={"content-type": "application/json"})
    assert assert_error(big, 413, "PAYLOAD_TOO_LARGE")["details"]["limit"] == 16 * 1024 * 1024
    assert run(daemon, sid, "echo still fine")["stdout"] == "still fine\n"
    capped = run(daemon, sid, "seq 1 1000", max_output_bytes=10)
    assert capped["stdout"] == "1\n2\n3\n4\n5\n" and capped["truncated"] is True
    assert daemon.client.get("/v1/sessions").status_code == 200


def test_timeout_then_next_exec_works(daemon):
    sid = create(daemon)["id"]
    r = run(daemon, sid, "cd /tmp && sleep 30", timeout_ms=300)
    assert r["timed_out"] is True
    r = run(daemon, sid, "pwd")
    assert r["stdout"] == "/tmp\n" and not r["timed_out"]


def test_idempotency_key_runs_once(daemon):
    sid = create(daemon)["id"]
    headers = {"Idempotency-Key": "retry-me-1"}
    body = {"cmd": "echo run >> /workspace/runs; wc -l < /workspace/runs"}
    a = daemon.client.post(f"/v1/sessions/{sid}/exec", json=body, headers=headers).json()
    b = daemon.client.post(f"/v1/sessions/{sid}/exec", json=body, headers=headers).json()
    assert a["exec_id"] == b["exec_id"] and a["stdout"] == b["stdout"] == "1\n"
    assert run(daemon, sid, "wc -l < /workspace/runs")["stdout"] == "1\n"


def test_ttl_expiry_is_journaled(daemon):
    sid = create(daemon, ttl_seconds=1)["id"]
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if daemon.client.get(f"/v1/sessions/{sid}").json()["status"] == "destroyed":
            break
        time.sleep(0.2)
    assert daemon.client.get(f"/v1/sessions/{sid}").json()["status"] == "destroyed"
    db = sqlite3.connect(daemon.data_dir / "sandkasten.db")
    types = [t for (t,) in db.execute("select type from events where stream_id = ? order by seq", (sid,))]
    db.close()
    assert "session.expired" in types and types[-1] == "session.destroyed"


def test_openapi_and_readiness(daemon):
    doc = daemon.client.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.") and "/v1/sessions/{sid}/exec" in doc["paths"]
    ready = daemon.client.get("/readyz").json()
    assert ready["ready"] is True
    metrics = daemon.client.get("/metrics").text
    assert "sandkasten_ready 1" in metrics


def test_sessions_survive_daemon_restart(daemon):
    sid = create(daemon)["id"]
    run(daemon, sid, "cd /tmp; export KEEP=42; sleep 300 &")
    daemon.kill()
    daemon.start()
    s = daemon.client.get(f"/v1/sessions/{sid}").json()
    assert s["status"] == "running"
    r = run(daemon, sid, "echo $KEEP; pwd; jobs | wc -l")
    assert r["stdout"].split() == ["42", "/tmp", "1"]


def test_files_round_trip_and_confinement(daemon):
    import base64
    import os

    sid = create(daemon)["id"]
    c = daemon.client
    blob = os.urandom(1 << 20)
    r = c.post(f"/v1/sessions/{sid}/fs/write",
               json={"path": "/workspace/data/blob.bin", "content_base64": base64.b64encode(blob).decode()})
    assert r.status_code == 200, r.text
    r = c.get(f"/v1/sessions/{sid}/fs/read", params={"path": "data/blob.bin"}).json()
    assert base64.b64decode(r["content_base64"]) == blob and r["truncated"] is False
    assert run(daemon, sid, "md5sum /workspace/data/blob.bin | cut -d' ' -f1")["stdout"].strip() == \
        __import__("hashlib").md5(blob).hexdigest()
    c.post(f"/v1/sessions/{sid}/fs/write", json={"path": "notes.txt", "text": "hello"})
    assert run(daemon, sid, "cat /workspace/notes.txt")["stdout"] == "hello"
    part = c.get(f"/v1/sessions/{sid}/fs/read", params={"path": "notes.txt", "max_bytes": 2}).json()
    assert base64.b64decode(part["content_base64"]) == b"he" and part["truncated"] is True
    run(daemon, sid, "ln -s /etc /workspace/etc-link; ln -s ../../../../ /workspace/up")
    for path in ("../etc/passwd", "/etc/passwd", "/workspace/../etc/passwd", "etc-link/passwd", "up/etc/passwd"):
        assert_error(c.get(f"/v1/sessions/{sid}/fs/read", params={"path": path}), 400, "PATH_REFUSED")
        assert_error(c.post(f"/v1/sessions/{sid}/fs/write", json={"path": path, "text": "x"}), 400,
                     "PATH_REFUSED")
    assert_error(c.get(f"/v1/sessions/{sid}/fs/read", params={"path": "missing.txt"}), 404, "FILE_NOT_FOUND")
    names = {e["name"] for e in c.get(f"/v1/sessions/{sid}/fs").json()["entries"]}
    assert {"data", "notes.txt", "etc-link", "up"} <= names
    assert c.delete(f"/v1/sessions/{sid}/fs", params={"path": "notes.txt"}).json() == {"ok": True}
    assert run(daemon, sid, "ls /workspace/notes.txt 2>&1; echo $?")["stdout"].strip().endswith("1")
