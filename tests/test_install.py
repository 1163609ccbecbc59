"""Several daemons on one host (issue 15): each keeps to its own data_dir, cgroup parent and
sandboxes; a restart's orphan sweep never touches another install's sandboxes."""

from __future__ import annotations

import json
import subprocess

import pytest

from sandkasten import install
from sandkasten.runtime.sandboxes import Runtime
from tests.conftest import IMAGE_CACHE
from tests.daemons import BIN, DaemonProc, make_data_dir


@pytest.fixture
def two_dirs(tmp_path, image_store):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    return make_data_dir(a, IMAGE_CACHE), make_data_dir(b, IMAGE_CACHE)


@pytest.fixture
def made():
    daemons: list[DaemonProc] = []
    yield daemons
    errors = []
    for d in daemons:  # every daemon is closed, also when closing an earlier one failed
        try:
            d.close()
        except Exception as e:  # noqa: BLE001 - raised below, after the others are closed
            errors.append(e)
    if errors:
        raise errors[0]


def create(d: DaemonProc) -> str:
    r = d.client.post("/v1/sessions", json={})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def healthy(d: DaemonProc, sid: str) -> bool:
    rt = Runtime.detect(d.data_dir, cgroup_parent=d.cgroup_parent)
    try:
        return rt.observe(sid).healthy
    finally:
        rt.close()


def echo(d: DaemonProc, sid: str, word: str) -> str:
    r = d.client.post(f"/v1/sessions/{sid}/exec", json={"cmd": f"echo {word}"})
    assert r.status_code == 200, r.text
    return r.json()["stdout"]


def test_a_start_on_a_shared_parent_leaves_the_sandboxes_of_another_data_dir_alone(two_dirs, made, cgroup_parent):
    """A's daemon is down (its sandboxes run on); B starts on the same cgroup parent: B's orphan
    sweep must not take A's sandbox for its own leftover."""
    a = DaemonProc(two_dirs[0], cgroup_parent)
    b = DaemonProc(two_dirs[1], cgroup_parent)
    made += [a, b]
    a.start()
    sid = create(a)
    a.kill()
    b.start()
    assert healthy(a, sid), "B's start destroyed a sandbox of A's data_dir"
    assert sid not in b.client.get("/v1/sessions?all=true").text
    b.kill()
    a.start()
    assert echo(a, sid, "still-here") == "still-here\n"


def test_a_second_daemon_on_a_parent_in_use_refuses_to_start(two_dirs, made, cgroup_parent):
    a = DaemonProc(two_dirs[0], cgroup_parent)
    b = DaemonProc(two_dirs[1], cgroup_parent)
    made += [a, b]
    a.start()
    sid = create(a)
    r = subprocess.run([str(BIN / "sandkasten"), "--config", str(b.config_path)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1
    assert f"cgroup parent {cgroup_parent!r} is in use by another running daemon" in r.stderr, r.stderr
    assert str(a.data_dir) in r.stderr and "Traceback" not in r.stderr
    assert echo(a, sid, "unharmed") == "unharmed\n"
    a.kill()  # the claim dies with its daemon: the next one may take the parent
    b.start()
    assert healthy(a, sid)


def test_two_daemons_with_default_configs_leave_each_other_alone(two_dirs, made):
    """No cgroup_parent in either config: each install gets its own parent; both run at once,
    and restarts (each one's orphan sweep) leave the other's sandboxes running."""
    a = DaemonProc(two_dirs[0], None)
    b = DaemonProc(two_dirs[1], None)
    made += [a, b]
    a.start()
    b.start()
    assert a.cgroup_parent != b.cgroup_parent
    assert a.cgroup_parent == "sandkasten-" + json.loads((a.data_dir / "install.json").read_text())["id"]
    sa, sb = create(a), create(b)
    a.kill()
    a.start()
    b.kill()
    b.start()
    assert echo(a, sa, "a") == "a\n" and echo(b, sb, "b") == "b\n"
    assert healthy(a, sa) and healthy(b, sb)
    r = b.client.delete(f"/v1/sessions/{sa}")
    assert r.status_code == 404  # B cannot even name A's session
    assert echo(a, sa, "a") == "a\n"


def test_an_install_record_is_made_once_and_an_old_data_dir_keeps_the_old_parent(tmp_path):
    fresh = install.ensure(tmp_path / "fresh")
    assert install.ensure(tmp_path / "fresh") == fresh and fresh.cgroup_parent == f"sandkasten-{fresh.id}"
    old = tmp_path / "old"
    (old / "sessions" / "s-alive0000001").mkdir(parents=True)  # sandboxes from before install ids
    assert install.ensure(old).cgroup_parent == install.LEGACY_PARENT


def test_a_claim_is_released_for_the_next_holder(tmp_path):
    first = install.ParentClaim.take("sk-claim-test", tmp_path / "d1", claims_dir=tmp_path / "claims")
    with pytest.raises(Exception) as refused:
        install.ParentClaim.take("sk-claim-test", tmp_path / "d2", claims_dir=tmp_path / "claims")
    assert "in use by another running daemon" in str(refused.value) and str(tmp_path / "d1") in str(refused.value)
    first.release()
    second = install.ParentClaim.take("sk-claim-test", tmp_path / "d2", claims_dir=tmp_path / "claims")
    second.release()
