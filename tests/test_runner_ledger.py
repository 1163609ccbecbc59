"""The runner's ledger and the spawner's spares, on real sandboxes: an exec id runs once even
across runners, results outlive the sandbox, a short exec writes no file of its own, a create
with a reserved id takes the spare (and nothing is left of spares once the spawner is gone)."""

from __future__ import annotations

import os
import time

from runner import results
from sandkasten.runtime import client, spares
from sandkasten.runtime.sandboxes import Runtime, read_pidfile
from sandkasten.runtime.spec import ExecRequest


def call(rt: Runtime, sid: str, msg: dict) -> dict:
    return client.call(rt.paths(sid).socket, msg)


def test_a_short_exec_leaves_a_ledger_line_not_a_file(runtime):
    sid = "s-ledger1"
    runtime.create(runtime.spec(sid, "base"))
    res = runtime.exec(sid, ExecRequest("quiet", ":"))
    assert res.exit_code == 0
    logs = runtime.paths(sid).logs
    assert not (logs / "quiet.log").exists() and not (logs / "quiet.json").exists()
    ledger = (logs / results.LEDGER).read_bytes()
    assert b"S quiet\n" in ledger and b'"id": "quiet"' in ledger
    loud = runtime.exec(sid, ExecRequest("loud", "echo hi"))
    assert loud.stdout_bytes == 3 and runtime.read_output(sid, "loud")[0] == b"hi\n"
    runtime.destroy(sid)
    # the daemon's reconciler reads results after the sandbox is gone
    assert runtime.read_result(sid, "quiet") == res
    assert runtime.read_result(sid, "loud") == loud
    assert runtime.read_result(sid, "never") is None


def test_an_id_started_by_an_earlier_runner_is_lost_not_run_again(runtime):
    sid = "s-ledger2"
    runtime.create(runtime.spec(sid, "base"))
    pid, _ = read_pidfile(runtime.paths(sid).pidfile)
    # started, then the runner dies before it ends: the ledger says it started
    reply = call(runtime, sid, {"op": "exec", "id": "slow", "cmd": "sleep 30", "timeout_ms": 60_000, "fresh": True})
    assert reply["state"] == "running"
    os.kill(pid, 9)
    deadline = time.monotonic() + 10
    while runtime.observe(sid, ping=False).alive and time.monotonic() < deadline:
        time.sleep(0.05)
    runtime.destroy(sid)   # keeps the logs (and the ledger): a recreated sandbox finds them
    runtime.create(runtime.spec(sid, "base"))
    again = call(runtime, sid, {"op": "exec", "id": "slow", "cmd": "sleep 30", "timeout_ms": 60_000, "wait": True})
    assert again["state"] == "lost" and "earlier runner" in again["reason"]
    # a fresh id runs; the same id sent again (not fresh) answers with the recorded result
    first = call(runtime, sid, {"op": "exec", "id": "n1", "cmd": "echo x >> /workspace/n", "wait": True, "fresh": True})
    repeat = call(runtime, sid, {"op": "exec", "id": "n1", "cmd": "echo x >> /workspace/n", "wait": True})
    assert first == repeat
    assert runtime.exec(sid, ExecRequest("count", "wc -l < /workspace/n")).exit_code == 0
    assert runtime.read_output(sid, "count")[0].strip() == b"1"


def test_a_reserved_id_takes_the_spare_and_spares_go_with_the_spawner(data_dir, cgroup_parent):
    rt = Runtime.detect(data_dir, cgroup_parent=cgroup_parent)
    made = []
    try:
        rt.warm()
        deadline = time.monotonic() + 10
        while not spares.live(rt.spares_dir) and time.monotonic() < deadline:
            time.sleep(0.02)
        waiting = spares.live(rt.spares_dir)
        assert waiting, "the spawner made no spare"
        assert not waiting & rt.host_sessions()          # a live spare is nobody's orphan
        sid = rt.reserve_id()
        assert sid in waiting and rt.reserve_id() != sid  # handed out once
        obs = rt.observe(sid)
        assert not obs.alive and not obs.cgroup           # no sandbox yet: nothing to tear down
        rt.create(rt.spec(sid, "base", mem_limit_mb=96))
        made.append(sid)
        assert any(name.startswith("spare") for name, _ in rt.last_steps), rt.last_steps
        assert rt.exec(sid, ExecRequest("e1", "cat /proc/self/cgroup")).exit_code == 0
        assert rt.cgroups.stats(sid).memory_limit == 96 * 1024 * 1024
        assert sid in rt.host_sessions() and rt.observe(sid).healthy
    finally:
        for sid in made:
            rt.destroy(sid)
        rt.close()   # the spawner leaves: its spares exit, their cgroups and markers go
    left = [n for n in rt.cgroups.names() if n.startswith("s-")]
    assert left == [] and spares.live(rt.spares_dir) == set()
    assert [p.name for p in rt.spares_dir.iterdir()] == []
