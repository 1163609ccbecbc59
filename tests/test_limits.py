"""What one daemon grants in all (issue 15): sessions and memory are admitted up to a limit,
and exec logs of ended sessions do not stay forever."""

from __future__ import annotations

import time


def create(d, **body):
    return d.client.post("/v1/sessions", json=body)


def test_sessions_beyond_max_sessions_are_refused_until_one_ends(daemon_factory):
    d = daemon_factory(limits={"max_sessions": 2}).start()
    first, second = create(d).json()["id"], create(d).json()["id"]
    r = create(d)
    assert r.status_code == 429 and r.json()["error_code"] == "CAPACITY_EXCEEDED", r.text
    assert "limits.max_sessions is 2" in r.json()["message"]
    assert d.cli("create").returncode == 1   # the CLI is held to the same limit
    assert d.client.delete(f"/v1/sessions/{first}").status_code == 200
    assert create(d).status_code == 201
    assert d.client.get(f"/v1/sessions/{second}").json()["status"] == "running"


def test_memory_granted_in_all_is_bounded(daemon_factory):
    d = daemon_factory(limits={"max_total_mem_mb": 300}).start()
    assert create(d, mem_limit_mb=128).status_code == 201
    assert create(d, mem_limit_mb=128).status_code == 201
    r = create(d, mem_limit_mb=128)
    assert r.status_code == 429 and "above limits.max_total_mem_mb (300 MB)" in r.json()["message"], r.text
    assert create(d, mem_limit_mb=32).status_code == 201   # what still fits is granted


def test_exec_logs_of_ended_sessions_are_removed_after_the_retention(daemon_factory):
    d = daemon_factory(limits={"log_retention_seconds": 2}).start()
    sid = create(d).json()["id"]
    kept = create(d).json()["id"]
    for s in (sid, kept):
        assert d.client.post(f"/v1/sessions/{s}/exec", json={"cmd": "seq 1 1000"}).status_code == 200
    logs = d.data_dir / "logs"
    assert (logs / sid).is_dir()
    assert d.client.delete(f"/v1/sessions/{sid}").status_code == 200
    deadline = time.monotonic() + 20
    while (logs / sid).exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not (logs / sid).exists(), "the logs of an ended session were kept past the retention"
    assert any((logs / kept).iterdir()), "a live session's logs must stay"
    assert d.cli("audit", "export").stdout.count('"seq 1 1000"') == 2   # the journal keeps the record
