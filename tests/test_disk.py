"""Each sandbox writes to a disk of its own (issue 15): /workspace and the root filesystem's
upper layer fill that, never the host's disk."""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest

from sandkasten.errors import SandboxError
from sandkasten.runtime import disk, ready_disks
from sandkasten.runtime.procfs import mounts_under, proc_start_time
from sandkasten.runtime.spec import ExecRequest


def run(rt, sid, eid, cmd):
    res = rt.exec(sid, ExecRequest(eid, cmd, timeout_ms=60_000))
    out, err, _, _ = rt.read_output(sid, eid)
    return res, out.decode(), err.decode()


def test_a_sandbox_fills_its_own_disk_not_the_hosts(runtime):
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
    assert str(p.disk_image) not in our_loop_devices(runtime.layout.data_dir), "the loop device outlived the sandbox"
    runtime.ready_disks.close()   # the disks it made ahead for the next create go too
    # (not a count of every loop device on the host: other test runs attach theirs meanwhile)
    assert our_loop_devices(runtime.layout.data_dir) == [], "a loop device outlived the sandbox"


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


def our_loop_devices(under) -> list[str]:
    """The backing files of the loop devices backed by a file under `under` (never anybody else's)."""
    found = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            name = backing.read_text().strip()
        except OSError:
            continue   # detached meanwhile
        if name.startswith(str(under) + "/"):
            found.append(name)
    return found


def superblock(image: Path) -> bytes:
    with open(image, "rb") as f:
        f.seek(1024)
        return f.read(1024)


def test_each_sandbox_gets_a_fresh_disk_copied_from_an_unmounted_template(runtime):
    a, b = "s-disk-a", "s-disk-b"
    runtime.create(runtime.spec(a, "base", disk_limit_mb=64))
    run(runtime, a, "x-a", "echo secret > /workspace/mine; sync")
    runtime.create(runtime.spec(b, "base", disk_limit_mb=64))
    res, out, _ = run(runtime, b, "x-b", "ls -A /workspace; df -k /workspace | tail -1")
    assert "mine" not in out and "secret" not in out, out
    used_kb = int(out.split()[-4])
    assert used_kb < 4096, f"a new disk should be empty: {out}"
    pa, pb = runtime.paths(a), runtime.paths(b)
    assert pa.disk_image.stat().st_ino != pb.disk_image.stat().st_ino
    templates = list(runtime.layout.disk_templates.iterdir())
    assert [t.name for t in templates] == [disk.template_name(64)]
    assert disk.fresh_ext4(superblock(templates[0])), "the template was mounted or written"
    assert not disk.fresh_ext4(superblock(pa.disk_image)), "a sandbox's disk is its mounted copy"
    assert sorted(our_loop_devices(runtime.layout.sessions)) == sorted([str(pa.disk_image), str(pb.disk_image)])
    runtime.destroy(a)
    runtime.destroy(b)
    assert our_loop_devices(runtime.layout.sessions) == []


def test_a_template_that_was_ever_mounted_is_made_again(runtime):
    runtime.create(runtime.spec("s-disk-t1", "base", disk_limit_mb=32))
    runtime.destroy("s-disk-t1")
    runtime.ready_disks.close()   # the next create copies the template itself
    template = runtime.layout.disk_templates / disk.template_name(32)
    before = template.stat().st_ino
    template.chmod(0o600)
    with open(template, "r+b") as f:   # what a mount leaves: a mount count
        f.seek(1024 + 0x34)
        f.write((1).to_bytes(2, "little"))
    assert not disk.fresh_ext4(superblock(template))
    sid = "s-disk-t2"
    runtime.create(runtime.spec(sid, "base", disk_limit_mb=32))
    assert run(runtime, sid, "x-t", "echo ok > /workspace/f; cat /workspace/f")[1] == "ok\n"
    assert template.stat().st_ino != before and disk.fresh_ext4(superblock(template))


def test_a_create_that_fails_after_the_disk_leaves_no_loop_device_image_or_mount(runtime, tmp_path):
    data = runtime.layout.data_dir
    runtime.ready_disks.close()   # every disk made at the create: the failures below are at its steps
    # the spawner fails (no lower layer) after the disk was attached and mounted
    sid = "s-disk-fail1"
    spec = replace(runtime.spec(sid, "base", disk_limit_mb=32), lower_dir=str(tmp_path / "missing"))
    with pytest.raises(SandboxError):
        runtime.create(spec)
    # the mount itself fails after the attach: a template whose superblock ext4 refuses
    template = runtime.layout.disk_templates / disk.template_name(32)
    template.chmod(0o600)
    with open(template, "r+b") as f:
        f.seek(1024 + 0x60)   # s_feature_incompat: a feature no kernel knows
        f.write((0x80000000).to_bytes(4, "little"))
    with pytest.raises(SandboxError, match="unable to mount the disk of s-disk-fail2"):
        runtime.create(runtime.spec("s-disk-fail2", "base", disk_limit_mb=32))
    for sid in ("s-disk-fail1", "s-disk-fail2"):
        p = runtime.paths(sid)
        assert not p.root.exists() and not p.run.exists()
    assert not mounts_under(data / "sessions") and not mounts_under(data / "ready-disks")
    assert our_loop_devices(data) == [], "a loop device outlived the failed create"


def wait_ready(rt, size_mb: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while sum(1 for size, _ in rt.ready_disks.ready if size == size_mb) < ready_disks.KEEP:
        assert time.monotonic() < deadline, "no disk was made ahead"
        time.sleep(0.05)


def mount_options(mount_point: Path) -> set[str]:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split(" ")
        if fields[4] == str(mount_point):
            return set(fields[5].split(","))
    raise AssertionError(f"{mount_point} is not mounted")


def test_a_disk_made_ahead_serves_the_next_create_and_is_as_fresh_and_limited(runtime):
    data = runtime.layout.data_dir
    runtime.create(runtime.spec("s-disk-r1", "base", disk_limit_mb=32, uid=0, gid=0))
    run(runtime, "s-disk-r1", "x-r1", "echo secret > /workspace/mine; sync")
    wait_ready(runtime, 32)
    taken = runtime.ready_disks.taken
    sid = "s-disk-r2"
    runtime.create(runtime.spec(sid, "base", disk_limit_mb=32, uid=0, gid=0))
    assert runtime.ready_disks.taken == taken + 1, "the create did not take the disk made ahead"
    p = runtime.paths(sid)
    assert {"nodev", "nosuid", "noatime"} <= mount_options(p.disk)
    assert our_loop_devices(data / "sessions").count(str(p.disk_image)) == 1   # the image moved, the device followed
    res, out, _ = run(runtime, sid, "x-ls", "ls -A /workspace")
    assert out == "", f"a disk made ahead must be empty: {out}"
    res, _, err = run(runtime, sid, "x-fill", "dd if=/dev/zero of=/workspace/big bs=1M count=64")
    assert res.exit_code != 0 and "No space left" in err, err
    runtime.destroy(sid)
    runtime.destroy("s-disk-r1")
    assert our_loop_devices(data / "sessions") == []
    owner = runtime.ready_disks.dir
    runtime.close()
    assert not owner.exists() and not mounts_under(data / "ready-disks")
    assert our_loop_devices(data) == [], "a disk made ahead outlived the runtime"


def test_the_disks_a_dead_daemon_made_ahead_are_swept_and_a_live_ones_are_not(runtime):
    base = runtime.layout.ready_disks
    gone = subprocess.Popen(["true"])
    gone.wait()
    alive = subprocess.Popen(["sleep", "60"])
    try:
        dead_owner = base / f"{gone.pid}-1"
        live_owner = base / f"{alive.pid}-{proc_start_time(alive.pid)}"
        for owner in (dead_owner, live_owner):
            owner.mkdir(parents=True)
            disk.prepare(owner / "1.img", owner / "1", 32, runtime.layout.disk_templates)
        runtime.warm()
        assert not dead_owner.exists() and our_loop_devices(dead_owner) == []
        assert os.path.ismount(live_owner / "1") and our_loop_devices(live_owner) == [str(live_owner / "1.img")]
    finally:
        alive.kill()
        alive.wait()
    runtime.warm()   # now its owner is gone too
    assert not live_owner.exists() and our_loop_devices(base) == []


def test_a_killed_daemons_disks_made_ahead_are_swept_by_the_next_and_its_sandboxes_adopted(daemon_factory):
    d = daemon_factory(defaults={"disk_limit_mb": 32}).start()
    sid = d.client.post("/v1/sessions", json={}).json()["id"]
    assert d.client.post(f"/v1/sessions/{sid}/exec", json={"cmd": "echo kept > /workspace/f"}).json()["exit_code"] == 0
    base = d.data_dir / "ready-disks"
    deadline = time.monotonic() + 20
    while len(our_loop_devices(base)) < ready_disks.KEEP:
        assert time.monotonic() < deadline, "the daemon made no disks ahead"
        time.sleep(0.05)
    owners = [p for p in base.iterdir()]
    d.kill()
    assert mounts_under(owners[0] / "mnt"), "a killed daemon leaves its disks made ahead mounted"
    d.start()
    deadline = time.monotonic() + 20
    while any(o.exists() for o in owners):
        assert time.monotonic() < deadline, "the next daemon did not sweep the disks made ahead"
        time.sleep(0.05)
    assert not any(our_loop_devices(o) for o in owners) and not any(mounts_under(o) for o in owners)
    r = d.client.post(f"/v1/sessions/{sid}/exec", json={"cmd": "cat /workspace/f"}).json()
    assert r["exit_code"] == 0 and r["stdout"] == "kept\n", r   # adopted, its own disk still there


def test_remove_all_leaves_nothing_of_a_killed_daemon(runtime):
    """What a teardown after a SIGKILLed daemon calls: its sandboxes and the disks it had made
    ahead are gone, with their loop devices and mounts."""
    data = runtime.layout.data_dir
    gone = subprocess.Popen(["true"])
    gone.wait()
    owner = runtime.layout.ready_disks / f"{gone.pid}-1"
    owner.mkdir(parents=True)
    disk.prepare(owner / "1.img", owner / "1", 32, runtime.layout.disk_templates)
    runtime.create(runtime.spec("s-disk-all", "base", disk_limit_mb=32))
    runtime.remove_all()
    assert runtime.host_sessions() == set()
    assert not owner.exists() and our_loop_devices(owner) == []
    assert not mounts_under(data / "sessions") and our_loop_devices(data / "sessions") == []
    runtime.close()   # and this runtime's own disks made ahead meanwhile
    assert not mounts_under(data) and our_loop_devices(data) == []
