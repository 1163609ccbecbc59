"""Memory pressure inside a sandbox (issue 15): the kernel's OOM killer takes the workload,
never the runner (PID 1: oom_score_adj -1000 where the host grants CAP_SYS_RESOURCE, and
every command +1000), and an exec says how many processes it lost."""

from __future__ import annotations

from sandkasten.runtime.spec import ExecRequest

# 24 small processes, each holding ~4 MB (awk with a 3 MB string): together far over a 40 MB
# limit, each far smaller than the runner
MANY_SMALL = ("i=0; while [ $i -lt 24 ]; do "
              "awk 'BEGIN{s=sprintf(\"%3000000s\",\"\"); system(\"sleep 20\")}' & i=$((i+1)); done; "
              "sleep 4; kill $(jobs -p) 2>/dev/null; wait; echo survived")


def read_adj(pid: int) -> int:
    with open(f"/proc/{pid}/oom_score_adj") as f:
        return int(f.read())


def can_lower_oom_scores() -> bool:
    """CAP_SYS_RESOURCE (24), which some container hosts withhold from root."""
    with open("/proc/self/status") as f:
        eff = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    return bool(eff >> 24 & 1)


def test_the_runner_is_never_the_oom_victim(runtime):
    sid = "s-oom-many-small"
    runtime.create(runtime.spec(sid, "base", mem_limit_mb=40, pids_limit=64))
    runner = runtime.observe(sid).pid
    assert read_adj(runner) == (-1000 if can_lower_oom_scores() else 0)
    res = runtime.exec(sid, ExecRequest("x-oom", MANY_SMALL, timeout_ms=30_000))
    assert runtime.cgroups.stats(sid).oom_kills >= 1, "the test did not get over the memory limit"
    obs = runtime.observe(sid)
    assert obs.healthy and obs.pid == runner, "the runner was OOM-killed"
    assert res.oom_kills >= 1 and not res.timed_out
    out = runtime.exec(sid, ExecRequest("x-after", "echo ok; cat /proc/self/oom_score_adj"))
    assert runtime.read_output(sid, "x-after")[0] == b"ok\n1000\n", "commands go first, before the runner"
    assert out.oom_kills == 0


def test_an_exec_over_the_limit_reports_its_oom_kills_over_http(daemon, python_image):
    sid = daemon.client.post("/v1/sessions", json={"image": python_image, "mem_limit_mb": 48}).json()["id"]
    r = daemon.client.post(f"/v1/sessions/{sid}/exec", json={
        "cmd": "python3 -c 'a=[]\nwhile True: a.append(bytearray(1<<20))'", "timeout_ms": 30_000})
    body = r.json()
    assert r.status_code == 200 and body["exit_code"] == 137 and body["oom_kills"] >= 1, body
    again = daemon.client.get(f"/v1/sessions/{sid}/execs/{body['exec_id']}").json()
    assert again["oom_kills"] == body["oom_kills"]
    ok = daemon.client.post(f"/v1/sessions/{sid}/exec", json={"cmd": "echo fine"}).json()
    assert ok["stdout"] == "fine\n" and ok["oom_kills"] == 0
