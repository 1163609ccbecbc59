"""The pre-warmed pool: pure claim rules, the journal's view of pool members, and black-box
tests over HTTP against a real daemon (fill, claim, refill without overshoot, workspace,
env and limits on a claimed sandbox, cold fallback, kill -9 and restart, no leaks)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from datetime import datetime, timedelta, timezone

import pytest

from sandkasten.domain import commands as c
from sandkasten.domain import events as ev
from sandkasten.domain.session import POOL_CLAIMED, POOL_CLAIMING, POOL_IDLE, decide, evolve
from sandkasten.errors import IllegalTransition
from sandkasten.control.executor import _sh_quote
from sandkasten.runtime.procfs import mounts_under
from sandkasten.runtime.sandboxes import Runtime
from sandkasten.store.journal import Journal

LATER = datetime(2030, 1, 1, tzinfo=timezone.utc)


def member(sid: str = "s-pool1") -> c.RequestSession:
    return c.RequestSession(image="base", ttl_seconds=86400, expires_at=LATER, pool=True, session_id=sid)


def claim(**kw) -> c.ClaimSession:
    args = dict(ttl_seconds=60, expires_at=LATER + timedelta(days=1), cpu_limit=0.5, mem_limit_mb=300,
                pids_limit=50, env={"A": "1"}, workspace_id="ws1")
    return c.ClaimSession(**{**args, **kw})


def fold(*commands) -> object:
    state = None
    for cmd in commands:
        for e in decide(state, cmd, stream_id="s-pool1"):
            state = evolve(state, e)
    return state


# ---------------------------------------------------------------- domain (pure)

def test_a_pool_member_is_claimed_once_then_configured():
    idle = fold(member(), c.RecordSandboxStarted(pid=10, start_time=1, pooled=True))
    assert idle.pool == POOL_IDLE and idle.status == "running"
    [claimed] = decide(idle, claim())
    assert claimed.type == ev.SESSION_CLAIMED
    assert claimed.payload["workspace_id"] == "ws1" and claimed.payload["env"] == {"A": "1"}
    state = evolve(idle, claimed)
    assert state.pool == POOL_CLAIMING and state.mem_limit_mb == 300 and state.ttl_seconds == 60
    assert state.workspace_id == "ws1" and dict(state.env) == {"A": "1"}
    with pytest.raises(IllegalTransition, match="claimed already"):
        decide(state, claim())
    state = fold(member(), c.RecordSandboxStarted(pid=10, start_time=1), claim(), c.RecordSandboxConfigured())
    assert state.pool == POOL_CLAIMED
    with pytest.raises(IllegalTransition, match="no claim is pending"):
        decide(state, c.RecordSandboxConfigured())
    assert decide(state, c.RequestExec(exec_id="x-1", cmd="true", timeout_ms=1000))[0].type == ev.EXEC_REQUESTED


def test_a_claim_that_changes_nothing_is_configured_at_once():
    idle = fold(member(), c.RecordSandboxStarted(pid=10, start_time=1))
    same = claim(cpu_limit=idle.cpu_limit, mem_limit_mb=idle.mem_limit_mb, pids_limit=idle.pids_limit,
                 env={}, workspace_id=None)
    [e] = decide(idle, same)
    assert e.payload["configured"] is True and evolve(idle, e).pool == POOL_CLAIMED
    assert decide(idle, claim(env={}, workspace_id=None))[0].payload["configured"] is False  # other limits


def test_claims_and_execs_are_refused_where_they_make_no_sense():
    requested = fold(member())
    assert decide(None, member())[0].payload["pool"] is True
    with pytest.raises(IllegalTransition, match="is requested"):
        decide(requested, claim())  # not running yet: nothing to hand out
    ordinary = fold(c.RequestSession(image="base", expires_at=LATER, session_id="s-pool1"),
                    c.RecordSandboxStarted(pid=10, start_time=1))
    assert "pool" not in decide(None, c.RequestSession(image="base", expires_at=LATER))[0].payload
    with pytest.raises(IllegalTransition, match="not a pool session"):
        decide(ordinary, claim())
    idle = fold(member(), c.RecordSandboxStarted(pid=10, start_time=1))
    with pytest.raises(IllegalTransition, match="unclaimed pool session"):
        decide(idle, c.RequestExec(exec_id="x-1", cmd="true", timeout_ms=1000))
    with pytest.raises(IllegalTransition, match="no claim is pending"):
        decide(idle, c.RecordSandboxConfigured())


def test_shell_quoting_survives_any_value():
    import subprocess

    for value in ("plain", "it's", "a'b'c''", "$HOME `id` \"x\" \\n", "multi\nline", ""):
        out = subprocess.run(["sh", "-c", f"export V={_sh_quote(value)}; printf %s \"$V\""],
                             capture_output=True, text=True, check=True).stdout
        assert out == value


# ---------------------------------------------------------------- journal (real SQLite)

def test_journal_lists_replays_and_refuses_a_double_claim(tmp_path):
    async def main():
        j = await Journal.open(tmp_path / "j.db")
        try:
            for sid in ("s-pool1", "s-pool2"):
                await j.execute(sid, member(sid), actor="pool")
                await j.execute(sid, c.RecordSandboxStarted(pid=10, start_time=1, pooled=True), actor="executor")
            await j.execute("s-plain", c.RequestSession(image="base", expires_at=LATER), actor="api")
            assert [r["id"] for r in await j.idle_pool()] == ["s-pool1", "s-pool2"]
            assert [r["id"] for r in await j.sessions(include_pool=False)] == ["s-plain"]
            assert len(await j.sessions()) == 3
            # two clients race for the same member: exactly one wins
            results = await asyncio.gather(*(j.execute("s-pool1", claim(), actor=a) for a in ("k1", "k2")),
                                           return_exceptions=True)
            assert sorted(type(r).__name__ for r in results) == ["IllegalTransition", "list"]
            row = await j.session("s-pool1")
            assert row["pool"] == POOL_CLAIMING and row["pooled"] and row["mem_limit_mb"] == 300
            assert row["workspace_id"] == "ws1" and row["env"] == {"A": "1"} and row["actor"] in ("k1", "k2")
            assert [r["id"] for r in await j.idle_pool()] == ["s-pool2"]
            await j.execute("s-pool1", c.RecordSandboxConfigured(), actor="executor")
            assert (await j.session("s-pool1"))["pool"] == POOL_CLAIMED
            assert {r["id"] for r in await j.sessions(include_pool=False)} == {"s-plain", "s-pool1"}
            await j.execute("s-pool2", c.RequestDestroy(reason="pool_trim"), actor="pool")
            assert await j.idle_pool() == []
            live = await j.snapshot_read_tables()
            await j.rebuild()
            assert await j.snapshot_read_tables() == live
        finally:
            await j.close()

    asyncio.run(main())


# ---------------------------------------------------------------- HTTP, real daemon

POOL = {"enabled": True, "images": {"base": 2}}


def wait_for(what, condition, timeout: float = 60.0, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)


def everything(d) -> list[dict]:
    r = d.client.get("/v1/sessions?all=true")
    assert r.status_code == 200, r.text
    return r.json()


def idle(d, image: str = "base", running_only: bool = True) -> list[dict]:
    return [s for s in everything(d) if s["pool"] == POOL_IDLE and s["image"] == image
            and s["status"] in (("running",) if running_only else ("requested", "running", "lost"))]


def full(d, n: int = 2, image: str = "base") -> list[dict]:
    return wait_for(f"{n} idle {image} sandboxes", lambda: (lambda m: m if len(m) == n else None)(idle(d, image)))


def create(d, **body) -> dict:
    r = d.client.post("/v1/sessions", json=body)
    assert r.status_code == 201, r.text
    return r.json()


def run(d, sid: str, cmd: str) -> dict:
    r = d.client.post(f"/v1/sessions/{sid}/exec", json={"cmd": cmd})
    assert r.status_code == 200, r.text
    return r.json()


def test_pool_fills_hands_out_and_refills_without_overshoot(daemon_factory):
    d = daemon_factory(pool=POOL).start()
    members = full(d)
    assert all(m["pooled"] for m in members)
    assert d.client.get("/v1/sessions").json() == []  # idle members are not a client's sessions
    r = d.client.post(f"/v1/sessions/{members[0]['id']}/exec", json={"cmd": "true"})
    assert r.status_code == 409 and "unclaimed pool session" in r.json()["message"]

    s = create(d)
    assert s["pooled"] is True and s["status"] == "running" and s["pool"] == POOL_CLAIMED
    assert s["id"] in {m["id"] for m in members} and s["cwd"] == "/workspace"
    out = run(d, s["id"], "pwd; id -u; echo hi > f; cat f")
    assert out["stdout"] == "/workspace\n65534\nhi\n" and out["exit_code"] == 0
    assert [x["id"] for x in d.client.get("/v1/sessions").json()] == [s["id"]]

    # refill back to the target, never above it (idle + in flight, sampled while it works)
    for _ in range(40):
        assert len(idle(d, running_only=False)) <= 2
        time.sleep(0.05)
    full(d)

    # concurrent creates: every one answered, no member handed out twice
    import concurrent.futures as cf

    with cf.ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda _: create(d), range(4)))
    ids = [g["id"] for g in got]
    assert len(set(ids)) == 4 and s["id"] not in ids
    assert sum(g["pooled"] for g in got) <= 2
    assert len(idle(d, running_only=False)) <= 2
    full(d)

    ps = d.cli("ps", "--json")
    assert ps.returncode == 0, ps.stderr
    assert {x["id"] for x in json.loads(ps.stdout)} == {s["id"], *ids}
    ps_all = json.loads(d.cli("ps", "--all", "--json").stdout)
    assert len(ps_all) == 5 + 2


def test_claimed_sandbox_gets_workspace_env_and_limits(daemon_factory):
    d = daemon_factory(pool=POOL).start()
    full(d)
    ws = d.data_dir / "workspaces" / "proj"
    ws.mkdir(parents=True)
    (ws / "seed.txt").write_text("from the host\n")
    os.chown(ws, 65534, 65534)
    env = {"GREETING": "it's a \"test\" $HOME `id`", "EMPTY": "", "MULTI": "a\nb"}
    s = create(d, workspace_id="proj", env=env, mem_limit_mb=300, pids_limit=64, cpu_limit=0.5)
    assert s["pooled"] is True and s["workspace_id"] == "proj"
    out = run(d, s["id"], "pwd; cat seed.txt; echo written > out.txt; ls /workspace")
    assert out["stdout"] == "/workspace\nfrom the host\nout.txt\nseed.txt\n"
    assert (ws / "out.txt").read_text() == "written\n"
    for name, value in env.items():
        assert run(d, s["id"], f'printf %s "${name}"')["stdout"] == value
    # like a fresh shell, which resets an IFS from its environment: word splitting stays the default
    full(d)
    u = create(d, env={"IFS": ":"})
    assert u["pooled"] is True
    assert run(d, u["id"], 'x="a:b:c d"; set -- $x; echo $#')["stdout"] == "2\n"  # IFS=":" gives 3

    stats = d.client.get(f"/v1/sessions/{s['id']}/stats").json()
    assert stats["memory_limit"] == 300 * 1024 * 1024
    row = d.client.get(f"/v1/sessions/{s['id']}").json()
    assert (row["mem_limit_mb"], row["pids_limit"], row["cpu_limit"]) == (300, 64, 0.5)
    # the host-side file API sees the same workspace
    r = d.client.get(f"/v1/sessions/{s['id']}/fs/read", params={"path": "out.txt"})
    assert r.status_code == 200 and base64.b64decode(r.json()["content_base64"]) == b"written\n"
    # `exit` restarts the shell: the claimed env is still there, the cwd is /workspace again
    assert run(d, s["id"], "exit 3")["exit_code"] == 3
    assert run(d, s["id"], 'printf %s "$GREETING"; pwd')["stdout"] == env["GREETING"] + "/workspace\n"
    # a second session on the same workspace, also from the pool, sees the first one's files
    t = create(d, workspace_id="proj")
    assert t["pooled"] is True
    assert run(d, t["id"], "cat out.txt")["stdout"] == "written\n"


def test_what_the_pool_cannot_serve_is_created_cold(daemon_factory, python_image):
    d = daemon_factory(pool={"enabled": True, "images": {"base": 1}}).start()
    full(d, 1)
    other = create(d, image=python_image)
    assert other["pooled"] is False and other["pool"] is None
    ro = create(d, readonly_rootfs=True)
    assert ro["pooled"] is False
    assert run(d, ro["id"], "touch /x 2>/dev/null || echo ro")["stdout"] == "ro\n"
    assert len(idle(d)) == 1  # untouched
    warm = create(d)
    cold = create(d)  # the only member is gone and its replacement may not be running yet
    assert warm["pooled"] is True and cold["id"] != warm["id"]


def test_pool_survives_kill_9_and_a_claim_left_half_done(daemon_factory):
    d = daemon_factory(pool=POOL).start()
    full(d)
    s = create(d, env={"KEEP": "me"})
    run(d, s["id"], "cd /tmp; X=1")
    full(d)
    before = {m["id"] for m in idle(d)}
    d.kill()

    # a claim journaled by a daemon that died before configuring the sandbox
    half = sorted(before)[0]

    async def claim_directly():
        j = await Journal.open(d.data_dir / "sandkasten.db")
        try:
            await j.execute(half, c.ClaimSession(ttl_seconds=600, expires_at=datetime.now(timezone.utc)
                                                 + timedelta(minutes=10), mem_limit_mb=200,
                                                 env={"LATE": "yes"}), actor="test")
        finally:
            await j.close()

    asyncio.run(claim_directly())
    d.start()
    assert wait_for("the half-done claim to be finished",
                    lambda: d.client.get(f"/v1/sessions/{half}").json()["pool"] == POOL_CLAIMED)
    assert run(d, half, 'printf %s "$LATE"')["stdout"] == "yes"
    assert d.client.get(f"/v1/sessions/{half}/stats").json()["memory_limit"] == 200 * 1024 * 1024
    # the claimed session kept its shell (cwd, variables, env); the other idle member was adopted, not remade
    out = run(d, s["id"], 'pwd; echo "$X $KEEP"')
    assert out["stdout"] == "/tmp\n1 me\n"
    assert before - {half} <= {m["id"] for m in idle(d)}  # same ids: adopted
    assert d.client.get("/readyz").json()["detail"]["reconcile"]["adopted"] == 3  # s, half and the other idle one
    full(d)
    assert len(idle(d, running_only=False)) == 2


def test_nothing_leaks_and_a_smaller_pool_is_trimmed(daemon_factory):
    d = daemon_factory(pool=POOL).start()
    full(d)
    s = create(d, workspace_id="leak")
    create(d)
    full(d)
    d.kill()
    # restart with a smaller pool: the extra idle member is destroyed at start
    cfg = d.config_path.read_text().replace("base: 2", "base: 1")
    d.config_path.write_text(cfg)
    d.start()
    wait_for("the pool trimmed to 1", lambda: len(idle(d, running_only=False)) == 1)
    full(d, 1)
    # and with the pool off: no idle member is left
    d.kill()
    d.config_path.write_text(cfg.replace("enabled: true", "enabled: false"))
    d.start()
    wait_for("the pool emptied", lambda: idle(d, running_only=False) == [])
    for x in d.client.get("/v1/sessions").json():
        assert d.client.delete(f"/v1/sessions/{x['id']}").json() == {"ok": True}
    wait_for("every session destroyed", lambda: all(x["status"] in ("destroyed", "failed") for x in everything(d)))
    assert d.cli("doctor").returncode == 0, d.cli("doctor").stdout
    d.kill()
    rt = Runtime.detect(d.data_dir, cgroup_parent=d.cgroup_parent)
    try:
        # the spawner's spares (runtime/spares.py) go with it once it sees the daemon gone
        def left() -> set[str]:
            return rt.host_sessions() | {n for n in rt.cgroups.names() if n.startswith("s-")}

        deadline = time.monotonic() + 30
        while left() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert left() == set()
        assert mounts_under(d.data_dir) == []
    finally:
        rt.close()
    assert (d.data_dir / "workspaces" / "leak").is_dir()  # persistent workspaces stay
    assert s["pooled"] is True


@pytest.mark.parametrize("change", ["defaults:\n  readonly_rootfs: true\n", "security:\n  seccomp: strict\n"])
def test_members_made_under_another_config_are_replaced_not_handed_out(daemon_factory, change):
    # a config change between restarts (a read-only root by default, a stricter seccomp
    # profile): an idle member made before is not what a create now asks for, so it is
    # destroyed at start and never handed out
    d = daemon_factory(pool={"enabled": True, "images": {"base": 1}}).start()
    [old] = full(d, 1)
    d.kill()
    d.start()  # the same config again: the member is kept (adopted, not remade)
    assert [m["id"] for m in full(d, 1)] == [old["id"]]
    d.kill()
    d.config_path.write_text(d.config_path.read_text() + change)
    d.start()
    wait_for("the old member destroyed", lambda: old["id"] not in {m["id"] for m in idle(d, running_only=False)})
    full(d, 1)
    s = create(d)
    assert s["id"] != old["id"]
    if "readonly" in change:
        assert run(d, s["id"], "touch /x 2>/dev/null || echo ro")["stdout"] == "ro\n"
    ended = d.client.get(f"/v1/sessions/{old['id']}").json()
    assert ended["status"] in ("destroying", "destroyed") and ended["end_reason"] == "pool_trim"
