"""TTL and idle expiry through the journal: activity extends the lease, never past the TTL."""

from __future__ import annotations

import json
import sqlite3
import time


def expired_reason(daemon, sid):
    db = sqlite3.connect(daemon.data_dir / "sandkasten.db")
    try:
        rows = db.execute("SELECT payload FROM events WHERE stream_id = ? AND type = 'session.expired'",
                          (sid,)).fetchall()
    finally:
        db.close()
    return [json.loads(p)["reason"] for (p,) in rows]


def status(daemon, sid):
    return daemon.client.get(f"/v1/sessions/{sid}").json()["status"]


def wait_ended(daemon, sid, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and status(daemon, sid) != "destroyed":
        time.sleep(0.2)
    return status(daemon, sid)


def test_activity_extends_the_idle_lease_then_idle_expiry(daemon_factory):
    d = daemon_factory(idle_timeout_seconds=2).start()
    sid = d.client.post("/v1/sessions", json={"ttl_seconds": 600}).json()["id"]
    for _ in range(8):  # 4 s of activity, twice the idle timeout
        assert d.client.post(f"/v1/sessions/{sid}/exec", json={"cmd": "true"}).status_code == 200
        time.sleep(0.5)
    assert status(d, sid) == "running"
    assert wait_ended(d, sid) == "destroyed"
    assert expired_reason(d, sid) == ["idle"]


def test_ttl_caps_the_lease_even_with_activity(daemon_factory):
    d = daemon_factory(idle_timeout_seconds=2).start()
    sid = d.client.post("/v1/sessions", json={"ttl_seconds": 3}).json()["id"]
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        r = d.client.post(f"/v1/sessions/{sid}/exec", json={"cmd": "true"})
        if r.status_code != 200:
            break
        time.sleep(0.3)
    assert wait_ended(d, sid) == "destroyed"
    assert expired_reason(d, sid) == ["ttl"]
    r = d.client.post(f"/v1/sessions/{sid}/exec", json={"cmd": "true"})
    assert r.status_code == 410 and r.json()["error_code"] == "SESSION_ENDED"
    assert "(reason: ttl)" in r.json()["message"], r.text


def test_a_session_that_expired_while_the_daemon_was_down_is_not_served_after_the_restart(daemon_factory):
    d = daemon_factory().start()
    sid = d.client.post("/v1/sessions", json={"ttl_seconds": 2}).json()["id"]
    d.kill()
    time.sleep(2.5)
    d.start()
    r = d.client.post(f"/v1/sessions/{sid}/exec", json={"cmd": "echo served"})
    assert r.status_code == 410 and r.json()["error_code"] == "SESSION_ENDED", r.text
    assert status(d, sid) in ("destroying", "destroyed")
    assert wait_ended(d, sid) == "destroyed" and expired_reason(d, sid) == ["ttl"]
