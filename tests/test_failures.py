"""Clear errors and no data loss when the journal is corrupt or locked, or the disk is full."""

from __future__ import annotations

import sqlite3
import subprocess
import threading
import time

import pytest

from sandkasten.runtime import syscalls
from tests.daemons import BIN


def test_corrupt_journal_stops_the_start_with_one_clear_line(daemon_factory):
    d = daemon_factory()
    (d.data_dir / "sandkasten.db").write_bytes(b"this is not sqlite" * 1000)
    r = subprocess.run([str(BIN / "sandkasten"), "--config", str(d.config_path)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1
    assert "journal" in r.stderr and "corrupt" in r.stderr and "Traceback" not in r.stderr


def test_locked_journal_answers_503_then_recovers(daemon_factory):
    d = daemon_factory(journal={"busy_timeout_s": 0.5}).start()
    sid = d.client.post("/v1/sessions", json={}).json()["id"]
    first = d.client.post(f"/v1/sessions/{sid}/exec", json={"cmd": "echo before"}).json()
    lock = sqlite3.connect(d.data_dir / "sandkasten.db", isolation_level=None, check_same_thread=False)
    lock.execute("BEGIN EXCLUSIVE")
    released = threading.Event()

    def release_later():
        time.sleep(3)
        lock.execute("ROLLBACK")
        lock.close()
        released.set()

    threading.Thread(target=release_later).start()
    try:
        r = d.client.post(f"/v1/sessions/{sid}/exec", json={"cmd": "echo during"})
        assert r.status_code == 503, r.text
        assert r.json()["error_code"] == "JOURNAL_ERROR" and "locked" in r.json()["message"]
    finally:
        released.wait(10)
    after = d.client.post(f"/v1/sessions/{sid}/exec", json={"cmd": "echo after"})
    assert after.status_code == 200 and after.json()["stdout"] == "after\n"
    history = d.client.get(f"/v1/sessions/{sid}/execs").json()
    assert [h["exec_id"] for h in history][0] == first["exec_id"]
    assert d.cli("audit", "verify").returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MB tmpfs of our own to fill up, unmounted at the end."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    syscalls.mount("tmpfs", str(mnt), "tmpfs", 0, "size=24m,mode=755")
    yield mnt
    syscalls.umount(str(mnt), syscalls.MNT_DETACH)


def test_full_disk_gives_clear_errors_and_loses_nothing(small_disk, daemon_factory):  # daemons go first
    d = daemon_factory(data_dir=small_disk / "data", journal={"busy_timeout_s": 1}).start()
    sid = d.client.post("/v1/sessions", json={}).json()["id"]
    ok = d.client.post(f"/v1/sessions/{sid}/exec", json={"cmd": "echo kept"}).json()
    filler = small_disk / "filler"
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M", "count=64"], capture_output=True)
    # output cannot be written and the journal cannot grow: errors, not hangs or crashes
    r = d.client.post(f"/v1/sessions/{sid}/exec", json={"cmd": "seq 1 200000"})
    assert r.status_code in (200, 503), r.text
    if r.status_code == 200:
        assert r.json()["truncated"] is True
    else:
        assert r.json()["error_code"] == "JOURNAL_ERROR" and "disk full" in r.json()["message"]
    assert "disk full" in d.read_log(), "a full disk must show in the daemon log"
    filler.unlink()
    again = d.client.post(f"/v1/sessions/{sid}/exec", json={"cmd": "echo recovered"})
    assert again.status_code == 200 and again.json()["stdout"] == "recovered\n"
    assert d.client.get(f"/v1/sessions/{sid}/execs/{ok['exec_id']}").json()["stdout"] == "kept\n"
    assert d.cli("audit", "verify").returncode == 0
