"""Each sandbox writes to a disk of its own (issue 15): /workspace and the root filesystem's
upper layer fill that, never the host's disk."""

from __future__ import annotations

import subprocess

from sandkasten.runtime.procfs import mounts_under
from sandkasten.runtime.spec import ExecRequest


def run(rt, sid, eid, cmd):
    res = rt.exec(sid, ExecRequest(eid, cmd, timeout_ms=60_000))
    out, err, _, _ = rt.read_output(sid, eid)
    return res, out.decode(), err.decode()


def loop_devices() -> int:
    return len(subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout.splitlines())


def test_a_sandbox_fills_its_own_disk_not_the_hosts(runtime):
    loops = loop_devices()
    sid = "s-disk-quota"
    runtime.create(runtime.spec(sid, "base", disk_limit_mb=32, uid=0, gid=0))  # root may write to /var
    p = runtime.paths(sid)
    res, _, err = run(runtime, sid, "x-fill", "dd if=/dev/zero of=/workspace/big bs=1M count=64")
    assert res.exit_code != 0 and "No space left" in err, err
    res, _, err = run(runtime, sid, "x-root", "rm /workspace/big; dd if=/dev/zero of=/var/big bs=1M count=64")
    assert res.exit_code != 0 and "No space left" in err, err   # the upper layer shares the disk
    assert p.disk_image.stat().st_blocks * 512 <= 33 * 1024 * 1024
    res, out, _ = run(runtime, sid, "x-after", "rm /var/big; echo fine > /workspace/f && cat /workspace/f")
    assert out == "fine\n"
    assert (p.workspace / "f").read_text() == "fine\n"   # the file API's path finds it
    runtime.destroy(sid)
    assert not p.root.exists() and not mounts_under(p.root.parent)
    assert loop_devices() == loops, "the loop device outlived the sandbox"


def test_without_a_quota_the_sandbox_writes_into_its_session_dir(runtime):
    sid = "s-disk-none"
    runtime.create(runtime.spec(sid, "base", disk_limit_mb=0))
    res, out, _ = run(runtime, sid, "x-w", "echo hi > /workspace/f; cat /workspace/f")
    assert out == "hi\n" and not runtime.paths(sid).disk_image.exists()


def test_the_file_api_reports_a_full_disk(daemon_factory):
    d = daemon_factory(defaults={"disk_limit_mb": 16}).start()
    sid = d.client.post("/v1/sessions", json={}).json()["id"]
    r = d.client.post(f"/v1/sessions/{sid}/exec", json={
        "cmd": "dd if=/dev/zero of=/workspace/fill bs=1M count=32; sync; df -k /workspace"})
    assert r.json()["exit_code"] == 0 and "No space left" in r.json()["stderr"], r.json()
    w = d.client.post(f"/v1/sessions/{sid}/fs/write", json={"path": "more.txt", "text": "x" * 2_000_000})
    assert w.status_code == 413 and "no space left" in w.json()["message"], w.text
