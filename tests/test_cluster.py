"""Three daemons on one machine sharing one journal in a real PostgreSQL server, each with its
own host id, data dir, cgroup parent and loopback port: placement, forwarding, recovery of a
dead host's sessions, fencing when it comes back."""

from __future__ import annotations

import base64
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
    # files: written through a, read through c, both on b's sandbox; query strings pass through
    r = c["a"].client.post(f"/v1/sessions/{sid}/fs/write", json={"path": "notes/x.txt", "text": "from a"})
    assert r.status_code == 200, r.text
    r = c["c"].client.get(f"/v1/sessions/{sid}/fs/read", params={"path": "notes/x.txt"})
    assert r.status_code == 200 and base64.b64decode(r.json()["content_base64"]) == b"from a", r.text
    r = c["c"].client.get(f"/v1/sessions/{sid}/fs/read", params={"path": "../../etc/passwd"})
    assert r.status_code == 400 and r.json()["error_code"] == "PATH_REFUSED", r.text  # b's checks, relayed
    # a process beside the shell, started through c, read through a (journaled on PostgreSQL)
    r = c["c"].client.post(f"/v1/sessions/{sid}/processes", json={"cmd": "echo proc-out; read line; echo got-$line"})
    assert r.status_code == 201, r.text
    pid = r.json()["process_id"]
    r = c["a"].client.post(f"/v1/sessions/{sid}/processes/{pid}/stdin", json={"data": "typed\n"})
    assert r.status_code == 200, r.text
    proc = wait_until(lambda: (p := c["a"].client.get(f"/v1/sessions/{sid}/processes/{pid}").json())["status"]
                      == "exited" and p, what="the process to exit")
    assert proc["exit_code"] == 0
    out = c["c"].client.get(f"/v1/sessions/{sid}/processes/{pid}/output").json()
    assert out["output"] == "proc-out\ngot-typed\n" and out["eof"] is True
    # a session id that does not exist: answered where asked, as on one host
    r = c["c"].client.post("/v1/sessions/s-000000000000/exec", json={"cmd": "true"})
    assert r.status_code == 404 and r.json()["error_code"] == "SESSION_NOT_FOUND"
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


def _events(node: DaemonProc, sid: str) -> list[dict]:
    import asyncio

    from sandkasten.store.journal import Journal

    async def read():
        j = await Journal.open(node_url(node))
        try:
            return [{"type": e.type, "payload": dict(e.payload), "actor": e.actor}
                    for e in await j.events(stream_id=sid, limit=10_000)]
        finally:
            await j.close()

    return asyncio.run(read())


def node_url(node: DaemonProc) -> str:
    import yaml

    return yaml.safe_load(node.config_path.read_text())["journal"]["url"]


def session(node: DaemonProc, sid: str) -> dict:
    return node.client.get(f"/v1/sessions/{sid}").json()


def test_a_killed_host_is_declared_lost_its_sessions_recreated_and_fenced_when_back(cluster):
    c = cluster(reconcile={"lost_sandbox_policy": "recreate"})
    sid = place_on(c, "a", "b")
    # a command that is running on b when b dies: it must not run a second time elsewhere
    with httpx.Client(base_url=c["c"].url, headers=dict(c["c"].client.headers), timeout=30) as client:
        with client.stream("POST", f"/v1/sessions/{sid}/exec/stream",
                           json={"cmd": "echo ran >> /workspace/marker; echo started; sleep 60"}) as stream:
            for line in stream.iter_lines():
                if "started" in line:
                    break
            c["b"].kill(signal.SIGKILL)  # mid-exec; its sandbox outlives it, as any daemon's does
    assert sid in _host_sessions(c["b"])

    row = wait_until(lambda: (s := session(c["a"], sid))["status"] == "running" and s["host_id"] != "b" and s,
                     timeout=60, what="the session recreated on a live host")
    new_host = row["host_id"]
    assert new_host in ("a", "c")
    types = [e["type"] for e in _events(c["a"], sid)]
    assert "sandbox.lost" in types and types.count("exec.started") <= 1 and types.count("exec.requested") == 1
    [lost_exec] = [e for e in _events(c["a"], sid) if e["type"] == "exec.lost"]
    assert "host b was lost" in lost_exec["payload"]["reason"]
    # the recreated sandbox never ran the command: no marker in its (new) workspace
    r = c["a"].client.post(f"/v1/sessions/{sid}/exec", json={"cmd": "cat /workspace/marker 2>&1; echo rc=$?"})
    assert r.status_code == 200, r.text
    assert "rc=1" in r.json()["output"] and r.headers.get("x-sandkasten-host", "a") == new_host

    # b comes back: a new epoch; its old copy of the session is removed, not run alongside
    c["b"].start()
    assert sid not in _host_sessions(c["b"])
    hosts = _hosts(c["b"])
    assert hosts["b"]["status"] == "live" and hosts["b"]["epoch"] == 2
    assert session(c["b"], sid)["host_id"] == new_host
    r = c["b"].client.post(f"/v1/sessions/{sid}/exec", json={"cmd": "echo via b"})
    assert r.status_code == 200 and r.json()["output"].strip() == "via b", r.text


def _hosts(node: DaemonProc) -> dict[str, dict]:
    import asyncio

    from sandkasten.store.journal import Journal

    async def read():
        j = await Journal.open(node_url(node))
        try:
            return {r["id"]: r for r in await j.hosts()}
        finally:
            await j.close()

    return asyncio.run(read())


def test_cli_on_one_host_shows_the_whole_cluster(cluster):
    """ps, logs, exec and audit export on host a, for a session that runs on host b."""
    import json

    c = cluster()
    sid = place_on(c, "c", "b")
    r = c["c"].client.post(f"/v1/sessions/{sid}/exec", json={"cmd": "echo out-from-b; echo err-from-b >&2"})
    assert r.status_code == 200, r.text
    ps = c["a"].cli("ps", "--json")
    assert ps.returncode == 0, ps.stderr
    [row] = [s for s in json.loads(ps.stdout) if s["id"] == sid]
    assert row["host_id"] == "b"
    logs = c["a"].cli("logs", sid)
    assert logs.returncode == 0, logs.stderr
    assert "echo out-from-b" in logs.stdout and "out-from-b\n" in logs.stdout and "err-from-b" in logs.stdout
    run = c["a"].cli("exec", sid, "echo run-by-cli-on-a-in-$(hostname)")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"run-by-cli-on-a-in-{sid}"
    audit = c["a"].cli("audit", "export")
    assert audit.returncode == 0, audit.stderr
    cmds = [json.loads(line)["cmd"] for line in audit.stdout.splitlines() if json.loads(line)["session"] == sid]
    assert cmds == ["echo out-from-b; echo err-from-b >&2", "echo run-by-cli-on-a-in-$(hostname)"]
    verify = c["a"].cli("audit", "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    for name in "ab":  # each host checks its own sessions: b's sandbox is no drift on a
        doctor = c[name].cli("doctor", "--json")
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        assert json.loads(doctor.stdout)["drift"] == []
    assert json.loads(c["b"].cli("doctor", "--json").stdout)["checked"] >= 1
    # a session requested by the CLI straight into the journal is placed by the daemons
    made = c["a"].cli("create", "--json")
    assert made.returncode == 0, made.stderr
    new = json.loads(made.stdout)
    assert new["status"] == "running" and new["host_id"] in "abc"
    assert new["id"] in _host_sessions(c[new["host_id"]])
    rm = c["c"].cli("rm", new["id"])
    assert rm.returncode == 0, rm.stderr
    wait_until(lambda: new["id"] not in _host_sessions(c[new["host_id"]]), what="the CLI's rm carried out")


def test_a_create_no_host_can_take_fails_saying_why(cluster):
    c = cluster(names=("a", "b"), limits={"max_mem_limit_mb": 10_000_000, "max_total_mem_mb": 100_000_000})
    r = c["a"].client.post("/v1/sessions", json={"mem_limit_mb": 9_000_000})
    assert r.status_code == 503, r.text
    body = r.json()
    assert body["error_code"] == "NO_HOST_AVAILABLE"
    assert "not enough memory" in body["message"] and set(body["details"]["hosts"]) == {"a", "b"}
    [s] = [s for s in c["b"].client.get("/v1/sessions?all=true").json() if s["mem_limit_mb"] == 9_000_000]
    assert s["status"] == "failed" and "no live host has room" in s["end_reason"]


def test_a_restarted_host_keeps_its_sandboxes_under_a_new_epoch(cluster):
    c = cluster(names=("a", "b"))
    sid = place_on(c, "a", "b")
    assert c["a"].client.post(f"/v1/sessions/{sid}/exec", json={"cmd": "export KEEP=yes"}).status_code == 200
    c["b"].kill(signal.SIGTERM)
    c["b"].start()
    assert _hosts(c["a"])["b"]["epoch"] == 2
    s = session(c["a"], sid)
    assert (s["status"], s["host_id"]) == ("running", "b")
    r = c["a"].client.post(f"/v1/sessions/{sid}/exec", json={"cmd": "echo $KEEP"})
    assert r.status_code == 200 and r.json()["output"].strip() == "yes", r.text  # the same shell: adopted
    types = [e["type"] for e in _events(c["a"], sid)]
    assert "sandbox.adopted" in types and "sandbox.lost" not in types
    assert [e["payload"]["reason"] for e in _events(c["a"], sid) if e["type"] == "session.placed"] == ["create", "restart"]


def test_a_paused_host_that_was_declared_lost_learns_it_and_removes_its_copy(cluster):
    """SIGSTOP (a hung host, a network partition): the others declare it lost and recreate its
    session; once it runs again its heartbeat is refused (fenced), it joins under a new epoch
    and removes its own copy of the session instead of running a second one."""
    c = cluster(reconcile={"lost_sandbox_policy": "recreate"})
    sid = place_on(c, "a", "b")
    c["b"].proc.send_signal(signal.SIGSTOP)
    try:
        wait_until(lambda: (s := session(c["a"], sid))["host_id"] != "b" and s["status"] == "running",
                   timeout=60, what="the session recreated elsewhere")
    finally:
        c["b"].proc.send_signal(signal.SIGCONT)
    wait_until(lambda: _hosts(c["a"])["b"]["epoch"] == 2 and _hosts(c["a"])["b"]["status"] == "live",
               timeout=30, what="b joining again")
    wait_until(lambda: sid not in _host_sessions(c["b"]), timeout=30, what="b removing its fenced copy")
    new_host = session(c["a"], sid)["host_id"]
    assert new_host != "b" and sid in _host_sessions(c[new_host])
    assert "host b was fenced" in c["b"].read_log()


def test_crashtool_cluster_short_run(host_tools):
    """tools/crashtest --cluster: SIGKILL a random host per round under load; its own checks
    (one terminal event per exec, no command twice across hosts, chain, replay, no leaks)."""
    import subprocess
    import sys

    from tests.daemons import REPO

    r = subprocess.run([sys.executable, str(REPO / "tools" / "crashtest"), "--cluster", "3", "--rounds", "2",
                        "--sessions", "3", "--execs-per-round", "3", "--seed", "7"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert '"duplicated": 0' in r.stdout and "crashtest cluster: ok" in r.stdout


def test_an_outage_of_the_journal_declares_no_host_lost(cluster, pg_server):
    """The PostgreSQL server stalls for longer than the host timeout (all its processes
    stopped): every heartbeat is stale at once when it is back, yet no host is declared lost
    (a host judges its peers only after beating itself for a whole timeout)."""
    import os

    c = cluster()
    sid = place_on(c, "a", "b")
    postmaster = int((pg_server.data / "postmaster.pid").read_text().split()[0])
    pids = [postmaster] + [int(p) for p in os.listdir("/proc") if p.isdigit() and _ppid(int(p)) == postmaster]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(TIMEOUT + 2)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    time.sleep(TIMEOUT + 2 * HEARTBEAT)  # long enough for a wrong verdict to be journaled
    hosts = _hosts(c["a"])
    assert {h: (r["status"], r["epoch"]) for h, r in hosts.items()} == {h: ("live", 1) for h in "abc"}
    assert "host.lost" not in {e["type"] for e in _events(c["a"], "host:b")}
    r = c["c"].client.post(f"/v1/sessions/{sid}/exec", json={"cmd": "echo still here"})
    assert r.status_code == 200 and r.json()["output"].strip() == "still here", r.text


def _ppid(pid: int) -> int | None:
    from pathlib import Path

    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def test_bench_cluster_rows(host_tools):
    """tools/bench --only cluster runs and prints its rows (no timing asserted), and leaves no
    cgroup parent behind."""
    import subprocess
    import sys
    from pathlib import Path

    from tests.daemons import REPO

    proc = subprocess.Popen([sys.executable, str(REPO / "tools" / "bench"), "--quick", "--only", "cluster"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    for row in ("## cluster (three hosts on one PostgreSQL journal", "HTTP exec `:` through a non-owning host",
                "HTTP exec `:` on the owning host", "create throughput, 3 hosts", "create throughput, 1 host on",
                "exec through a non-owning host / on the owner", "create throughput 3 hosts / 1 host"):
        assert row in stdout, f"missing {row!r} in:\n{stdout}"
    assert "n/a (failed" not in stdout
    leftovers = [p for h in ("unified", "memory", "pids", "cpu")
                 for p in Path("/sys/fs/cgroup", h).glob(f"sandkasten-bench-{proc.pid}-*")]
    assert leftovers == []
