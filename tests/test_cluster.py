"""Three daemons on one machine sharing one journal in a real PostgreSQL server, each with its
own host id, data dir, cgroup parent and loopback port: placement, forwarding, recovery of a
dead host's sessions, fencing when it comes back."""

from __future__ import annotations

import signal
import time

import httpx
import pytest

from sandkasten.runtime import cgroups as cgroups_mod
from tests.conftest import CGROUP_PARENT, IMAGE_CACHE
from tests.daemons import DaemonProc, make_data_dir

HEARTBEAT = 0.5
TIMEOUT = 3.0


def wait_until(check, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class Cluster:
    def __init__(self, tmp_path, url: str, names=("a", "b", "c"), **overrides):
        self.url = url
        self.nodes: dict[str, DaemonProc] = {}
        self.parents = []
        for name in names:
            parent = f"{CGROUP_PARENT}-{name}"
            self.parents.append(parent)
            root = tmp_path / name
            root.mkdir()
            self.nodes[name] = DaemonProc(
                make_data_dir(root, IMAGE_CACHE), parent, journal={"url": url},
                cluster={"host_id": name, "heartbeat_seconds": HEARTBEAT, "host_timeout_seconds": TIMEOUT},
                **overrides)

    def __getitem__(self, name: str) -> DaemonProc:
        return self.nodes[name]

    def start(self) -> "Cluster":
        for node in self.nodes.values():
            node.start()
        return self

    def close(self) -> None:
        for node in self.nodes.values():
            node.close()
        for parent in self.parents:
            cgroups_mod.detect(parent=parent).destroy_parent()


@pytest.fixture
def cluster(tmp_path, pg_database, image_store):
    made = []

    def make(**overrides) -> Cluster:
        c = Cluster(tmp_path, pg_database, **overrides)
        made.append(c)
        return c.start()

    yield make
    for c in made:
        c.close()


def place_on(cluster: Cluster, via: str, want: str) -> str:
    """Create sessions through `via` until one lands on `want` (placement is least-loaded:
    with empty hosts the first three creates land on three different hosts)."""
    for _ in range(3):
        r = cluster[via].client.post("/v1/sessions", json={})
        assert r.status_code == 201, r.text
        sid = r.json()["id"]
        row = cluster[via].client.get(f"/v1/sessions/{sid}").json()
        if row.get("host_id") == want:
            return sid
    raise AssertionError(f"no session landed on {want}")


def test_create_on_a_lands_on_b_exec_through_c(cluster):
    c = cluster()
    sid = place_on(c, "a", "b")
    r = c["c"].client.post(f"/v1/sessions/{sid}/exec", json={"cmd": "echo hi from $(hostname); cd /tmp"})
    assert r.status_code == 200, r.text
    assert r.json()["output"].strip() == f"hi from {sid}"
    assert r.headers.get("x-sandkasten-host") == "b"
    r = c["a"].client.post(f"/v1/sessions/{sid}/exec", json={"cmd": "pwd"})
    assert r.json()["cwd"] == "/tmp" and r.json()["output"].strip() == "/tmp"
    # the sandbox is on b only
    assert sid in _host_sessions(c["b"]) and sid not in _host_sessions(c["a"]) | _host_sessions(c["c"])
    # every node lists the whole cluster
    for name in "abc":
        assert sid in [s["id"] for s in c[name].client.get("/v1/sessions").json()]
    r = c["c"].client.delete(f"/v1/sessions/{sid}")
    assert r.status_code == 200, r.text
    assert sid not in _host_sessions(c["b"])


def _host_sessions(node: DaemonProc) -> set[str]:
    from sandkasten.runtime.sandboxes import Runtime

    rt = Runtime.detect(node.data_dir, cgroup_parent=node.cgroup_parent)
    try:
        return set(rt.host_sessions())
    finally:
        rt.close()
