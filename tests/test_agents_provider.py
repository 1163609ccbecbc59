"""`sandkasten.agents` as the Agents SDK sees a sandbox provider, against a real daemon (the
`python` image): the session contract (exec, files, running, shutdown), serialized state and
resume, persist/hydrate of the workspace (binary files, symlinks, hostile tars), the SDK's own
snapshot flow into a replacement sandbox, run-tagged journal entries, exposed ports on the
bridge. The whole agent (SandboxAgent, scripted model, kills) is in test_agents_sandbox.py."""

from __future__ import annotations

import asyncio
import ipaddress
import io
import json
import os
import re
import tarfile
from pathlib import Path

import httpx
import pytest
from agents import set_trace_processors, trace
from agents.sandbox import LocalSnapshotSpec, Manifest, SandboxPathGrant
from agents.sandbox.errors import (
    ExecTimeoutError,
    ExposedPortUnavailableError,
    InvalidManifestPathError,
    WorkspaceArchiveWriteError,
    WorkspaceReadNotFoundError,
)

from sandkasten.agents import SandkastenSandboxClient, SandkastenSandboxClientOptions, SandkastenSandboxSessionState
from tests.daemons import API_KEY

RUN = "trace_" + "5a" * 16


@pytest.fixture
def py_daemon(daemon_factory, python_image, monkeypatch):
    monkeypatch.setenv("SANDKASTEN_API_KEY", API_KEY)
    monkeypatch.delenv("SANDKASTEN_URL", raising=False)
    set_trace_processors([])   # trace ids without exporting anything
    return daemon_factory(default_image=python_image).start()


def drive(daemon, body) -> object:
    """Run `body(client)` in a fresh event loop with a client for `daemon`."""
    async def main():
        async with SandkastenSandboxClient(base_url=daemon.url) as client:
            return await body(client)
    return asyncio.run(main())


def audit(daemon) -> list[dict]:
    out = daemon.cli("audit", "export", "--format", "jsonl")
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def test_session_contract_exec_files_and_lifecycle(py_daemon):
    async def body(client):
        manifest = Manifest(extra_path_grants=(SandboxPathGrant(path="/tmp/granted"),))
        session = await client.create(manifest=manifest, options=SandkastenSandboxClientOptions(env={"GREETING": "hej"}))
        await session.start()
        assert session.supports_pty() in (True, False) and await session.running()
        with trace("provider test", trace_id=RUN):
            r = await session.exec("echo $GREETING; echo oops >&2; pwd; exit 3")
        assert (r.stdout, r.stderr, r.exit_code) == (b"hej\n/workspace\n", b"oops\n", 3)
        with pytest.raises(ExecTimeoutError):
            await session.exec("sleep 5", timeout=0.5)
        assert (await session.exec("echo still-usable")).stdout == b"still-usable\n"

        blob = bytes(range(256)) * 100
        await session.write(Path("src/data.bin"), io.BytesIO(blob))
        assert (await session.read(Path("src/data.bin"))).read() == blob
        assert (await session.read(Path("/workspace/src/data.bin"))).read() == blob
        assert await session.read_bounded(Path("src/data.bin"), max_bytes=10) == blob[:10]
        big = os.urandom(9 << 20)   # above SMALL_WRITE: goes as a streamed one-member tar
        await session.write(Path("big.bin"), io.BytesIO(big))
        assert (await session.exec("md5sum big.bin")).stdout.split()[0].decode() == \
            __import__("hashlib").md5(big).hexdigest()
        await session.write(Path("/tmp/granted/outside.bin"), io.BytesIO(b"\x00granted\xff"))
        assert (await session.read(Path("/tmp/granted/outside.bin"))).read() == b"\x00granted\xff"
        with pytest.raises(InvalidManifestPathError):
            await session.write(Path("/tmp/not-granted.txt"), io.BytesIO(b"x"))
        with pytest.raises(WorkspaceReadNotFoundError):
            await session.read(Path("missing.txt"))
        with pytest.raises(InvalidManifestPathError):
            await session.read(Path("../etc/passwd"))
        await session.mkdir(Path("a/b"), parents=True)
        assert {e.path.rsplit("/", 1)[-1] for e in await session.ls(Path("."))} >= {"src", "a", "big.bin"}
        await session.rm(Path("a"), recursive=True)
        assert not (await session.exec("test -e a")).ok()

        sid = session.state.sandbox_id
        payload = client.serialize_session_state(session.state)
        assert API_KEY not in json.dumps(payload) and payload["sandbox_id"] == sid
        await session.aclose()     # stop + shutdown: the Sandkasten session is destroyed
        assert not await session.running()
        return sid

    sid = drive(py_daemon, body)
    assert py_daemon.client.get(f"/v1/sessions/{sid}").json()["status"] == "destroyed"
    rows = [r for r in audit(py_daemon) if r["session"] == sid]
    tagged = [r for r in rows if r["actor"].endswith(f"/run:{RUN}")]
    assert [r["cmd"] for r in tagged] == ["sh -lc 'echo $GREETING; echo oops >&2; pwd; exit 3'"]
    assert tagged[0]["exit_code"] == 3 and all("/run:" not in r["actor"] for r in rows if r not in tagged)


def test_resume_reattaches_the_same_sandbox_and_replaces_a_gone_one(py_daemon):
    async def first(client):
        session = await client.create(options=SandkastenSandboxClientOptions(workspace_id="ws-resume"))
        await session.start()
        await session.exec("echo kept > kept.txt; nohup sleep 300 >/dev/null 2>&1 & echo $! > bg.pid")
        return client.serialize_session_state(session.state)   # ... and the process "dies" here

    payload = json.loads(json.dumps(drive(py_daemon, first)))   # as stored on disk
    sid = payload["sandbox_id"]

    async def second(client):   # a new process, a new event loop, the state from disk
        state = client.deserialize_session_state(dict(payload))
        assert isinstance(state, SandkastenSandboxSessionState)
        session = await client.resume(state)
        await session.start()
        out = await session.exec("cat kept.txt; kill -0 $(cat bg.pid) && echo bg-alive")
        return session.state.sandbox_id, out.stdout

    assert drive(py_daemon, second) == (sid, b"kept\nbg-alive\n")
    py_daemon.client.delete(f"/v1/sessions/{sid}").raise_for_status()   # the sandbox goes away

    async def third(client):
        session = await client.resume(client.deserialize_session_state(dict(payload)))
        await session.start()
        out = await session.exec("cat kept.txt; test -e bg.pid && kill -0 $(cat bg.pid) 2>/dev/null || echo bg-gone")
        await client.delete(session)
        return session.state.sandbox_id, out.stdout

    new_sid, out = drive(py_daemon, third)
    assert new_sid != sid and out == b"kept\nbg-gone\n"   # a replacement on the same persistent workspace
    assert py_daemon.client.get(f"/v1/sessions/{new_sid}").json()["status"] == "destroyed"


def test_the_sdk_snapshot_flow_restores_a_workspace_into_a_replacement(py_daemon, tmp_path):
    snapshots = tmp_path / "snapshots"
    blob = os.urandom(70_000)

    async def body(client):
        session = await client.create(snapshot=LocalSnapshotSpec(base_path=snapshots),
                                      options=SandkastenSandboxClientOptions())
        await session.start()
        await session.write(Path("bin/blob.dat"), io.BytesIO(blob))
        await session.exec("cd /workspace && ln -s bin/blob.dat link && ln -s /etc etc-link && "
                           "mkdir -p deep/er && printf x > deep/er/leaf && chmod 750 deep")
        await session.stop()                     # the SDK persists the workspace (persist_workspace)
        payload = client.serialize_session_state(session.state)
        await session.shutdown()                 # the sandbox is destroyed
        resumed = await client.resume(client.deserialize_session_state(payload))
        await resumed.start()                    # a replacement: the SDK hydrates the snapshot into it
        out = await resumed.exec("cd /workspace && md5sum bin/blob.dat link | cut -d' ' -f1; readlink link; "
                                 "cat deep/er/leaf; echo; stat -c %a deep; test -L etc-link && echo has-etc-link")
        await resumed.aclose()
        return session.state.sandbox_id, resumed.state.sandbox_id, out.stdout.decode()

    old, new, out = drive(py_daemon, body)
    md5 = __import__("hashlib").md5(blob).hexdigest()
    assert old != new
    assert out.split() == [md5, md5, "bin/blob.dat", "x", "750", "has-etc-link"], out


def test_hydrate_refuses_a_hostile_tar_and_nothing_lands_on_the_host(py_daemon, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()

    def tar_with(*members):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for name, kind, target, data in members:
                info = tarfile.TarInfo(name)
                info.type, info.linkname = kind, target
                info.size = len(data or b"")
                tar.addfile(info, io.BytesIO(data) if data else None)
        buf.seek(0)
        return buf

    async def body(client):
        session = await client.create(options=SandkastenSandboxClientOptions())
        await session.start()
        refused = []
        for tar in (tar_with(("etc", tarfile.SYMTYPE, "/etc", None), ("etc/sk-pwned", tarfile.REGTYPE, "", b"x")),
                    tar_with(("v", tarfile.SYMTYPE, str(victim), None), ("v/pwned", tarfile.REGTYPE, "", b"x")),
                    tar_with(("../../sk-pwned", tarfile.REGTYPE, "", b"x")),
                    tar_with(("dev", tarfile.CHRTYPE, "", None))):
            with pytest.raises(WorkspaceArchiveWriteError) as info:
                await session.hydrate_workspace(tar)
            refused.append(info.value.context["error_code"])
        await session.exec(f"ln -s {victim} /workspace/planted")
        with pytest.raises(WorkspaceArchiveWriteError):
            await session.hydrate_workspace(tar_with(("planted/pwned", tarfile.REGTYPE, "", b"x")))
        await session.aclose()
        return refused

    assert drive(py_daemon, body) == ["PATH_REFUSED"] * 4
    assert list(victim.iterdir()) == [] and not os.path.lexists("/etc/sk-pwned")


def test_exposed_ports_need_the_bridge(py_daemon):
    async def body(client):
        session = await client.create(options=SandkastenSandboxClientOptions(exposed_ports=(8000,)))
        await session.start()
        with pytest.raises(ExposedPortUnavailableError) as info:
            await session.resolve_exposed_port(8000)
        with pytest.raises(ExposedPortUnavailableError):
            await session.resolve_exposed_port(9999)   # not configured
        await session.aclose()
        return info.value.context["detail"]

    assert "bridge" in drive(py_daemon, body)


def test_a_manifest_elsewhere_than_workspace_is_refused_clearly(py_daemon):
    async def body(client):
        with pytest.raises(ValueError, match="keeps its workspace at /workspace"):
            await client.create(manifest=Manifest(root="/home/agent"), options=SandkastenSandboxClientOptions())
        return py_daemon.client.get("/v1/sessions").json()

    assert drive(py_daemon, body) == []   # nothing was created


def test_a_daemon_down_at_resume_is_one_clear_error(daemon_factory, python_image, monkeypatch):
    monkeypatch.setenv("SANDKASTEN_API_KEY", API_KEY)
    from sandkasten.client import DaemonUnreachable
    from tests.daemons import free_port

    url = f"http://127.0.0.1:{free_port()}"
    payload = {"type": "sandkasten", "sandbox_id": "s-000000000000", "base_url": url,
               "snapshot": {"type": "noop", "id": "x"}, "manifest": {}}

    async def main():
        async with SandkastenSandboxClient(retry_for=0.5) as client:
            await client.resume(client.deserialize_session_state(payload))

    with pytest.raises(DaemonUnreachable, match=f"unable to reach the Sandkasten daemon at {url}"):
        asyncio.run(main())   # translated: never a bare httpx exception


def test_pty_processes_on_the_process_api_and_found_again_after_resume(py_daemon):
    from agents.sandbox.errors import PtySessionNotFoundError

    async def first(client):
        session = await client.create(options=SandkastenSandboxClientOptions())
        await session.start()
        assert session.supports_pty()
        quick = await session.pty_exec_start("echo out; echo err >&2; exit 7", yield_time_s=5)
        assert (quick.process_id, quick.exit_code) == (None, 7) and b"out" in quick.output and b"err" in quick.output
        repl = await session.pty_exec_start("sh -i", tty=True, yield_time_s=0.5)
        assert repl.process_id is not None and repl.exit_code is None
        update = await session.pty_write_stdin(session_id=repl.process_id, chars="V=shell-state\n", yield_time_s=0.5)
        assert update.process_id == repl.process_id
        doomed = await session.pty_exec_start("sleep 300", yield_time_s=0.3)
        with pytest.raises(PtySessionNotFoundError):
            await session.pty_write_stdin(session_id=99, chars="x")
        return client.serialize_session_state(session.state), repl.process_id, doomed.process_id

    payload, repl_number, doomed_number = drive(py_daemon, first)

    async def second(client):   # a new agent process: nothing but the serialized state
        session = await client.resume(client.deserialize_session_state(dict(payload)))
        await session.start()
        seen = await session.pty_write_stdin(session_id=repl_number, chars="echo $V\n", yield_time_s=1)
        await session.pty_terminate_all()          # the processes this session touched are killed ...
        sid = session.state.sandbox_id
        await client.delete(session)
        return seen, sid

    seen, sid = drive(py_daemon, second)
    assert b"shell-state" in seen.output and seen.process_id == repl_number
    procs = {p["cmd"]: p for p in py_daemon.client.get(f"/v1/sessions/{sid}/processes?all=true").json()}
    assert procs["sh -lc 'sh -i'"]["status"] == "exited"          # ... by terminate_all
    assert procs["sh -lc 'sleep 300'"]["status"] in ("exited", "lost")   # ... and the rest with the sandbox
    assert doomed_number != repl_number


def test_an_exposed_port_on_the_bridge_is_reachable_from_the_host(daemon_factory, python_image, monkeypatch):
    """Bridge networking of its own (test-only bridge, subnet and nft tables named after this
    pid, removed at the end, also on failure): a server in the sandbox answers the host."""
    from sandkasten.runtime import network

    monkeypatch.setenv("SANDKASTEN_API_KEY", API_KEY)
    set_trace_processors([])
    pid = os.getpid()
    settings = network.Settings(bridge=f"ska{pid % 100000}", subnet=f"10.{150 + pid % 50}.{pid // 50 % 256}.0/24")
    try:
        daemon = daemon_factory(default_image=python_image,
                                network={"bridge": settings.bridge, "subnet": settings.subnet}).start()

        async def body(client):
            session = await client.create(options=SandkastenSandboxClientOptions(
                network_mode="bridge", exposed_ports=(8000,)))
            await session.start()
            await session.exec("echo served-from-the-sandbox > hello.txt")
            server = await session.pty_exec_start("python3 -m http.server 8000 --bind 0.0.0.0", yield_time_s=1)
            assert server.process_id is not None, server.output
            endpoint = await session.resolve_exposed_port(8000)
            async with httpx.AsyncClient(timeout=5) as http:
                for _ in range(50):
                    try:
                        answer = await http.get(f"http://{endpoint.host}:{endpoint.port}/hello.txt")
                        break
                    except httpx.TransportError:
                        await asyncio.sleep(0.1)
            await session.aclose()
            return endpoint, answer

        endpoint, answer = drive(daemon, body)
        assert ipaddress.IPv4Address(endpoint.host) in settings.network and not endpoint.tls
        assert answer.status_code == 200 and answer.text == "served-from-the-sandbox\n"
        daemon.close()
    finally:
        network.remove_host(settings)


def test_a_runner_owned_sandbox_tags_commands_with_the_runs_trace_and_snapshots_on_cleanup(py_daemon, tmp_path):
    """The SDK's usual path: Runner creates the sandbox from options, tags its trace id on every
    request, persists the workspace to the run's snapshot at cleanup and deletes the sandbox."""
    from agents import Runner, set_default_openai_client
    from agents.run import RunConfig
    from agents.sandbox import SandboxAgent, SandboxRunConfig
    from openai import AsyncOpenAI

    from tests.scripted_openai import Call, CustomCall, Say, ScriptedOpenAI, Turn

    patch = "*** Begin Patch\n*** Add File: hi.py\n+print('hi from', __name__)\n*** End Patch"
    script = [Turn("say hi", [[CustomCall("apply_patch", patch)],
                              [Call("exec_command", {"cmd": "python3 hi.py", "yield_time_ms": 20_000})],
                              lambda conv: Say(conv.last_output.rsplit("Output:\n", 1)[-1])])]
    run_id = "trace_" + "7e" * 16

    async def body(client):
        async with AsyncOpenAI(base_url=model.base_url, api_key="test") as oai:
            set_default_openai_client(oai)
            agent = SandboxAgent(name="hi", instructions="be brief")
            config = RunConfig(trace_id=run_id, sandbox=SandboxRunConfig(
                client=client, options=SandkastenSandboxClientOptions(),
                snapshot=LocalSnapshotSpec(base_path=tmp_path / "snaps")))
            result = await Runner.run(agent, "say hi", run_config=config)
        return result.final_output

    with ScriptedOpenAI(script) as model:
        answer = drive(py_daemon, body)
    assert not model.errors and answer.strip() == "hi from __main__"
    [session] = py_daemon.client.get("/v1/sessions?all=true").json()
    assert session["status"] == "destroyed" and re.fullmatch(rf"api:[0-9a-f]{{8}}/run:{run_id}", session["actor"])
    rows = [r for r in audit(py_daemon) if r["session"] == session["id"]]
    assert rows and all(r["actor"].endswith(f"/run:{run_id}") for r in rows)
    assert any(r["cmd"] == "sh -lc 'python3 hi.py'" and r["exit_code"] == 0 for r in rows)
    [tar] = (tmp_path / "snaps").glob("*.tar")
    with tarfile.open(tar) as t:
        assert t.extractfile("hi.py").read() == b"print('hi from', __name__)"   # (as the SDK's Add File writes it)


def test_persist_leaves_out_the_paths_the_sdk_marks_as_not_durable(py_daemon):
    async def body(client):
        session = await client.create(options=SandkastenSandboxClientOptions())
        await session.start()
        await session.exec("mkdir -p cache/deep keep && echo a > cache/deep/x && echo b > keep/y && echo c > cache.txt")
        session.register_persist_workspace_skip_path("cache")
        tar = await session.persist_workspace()
        with tar, tarfile.open(fileobj=tar) as t:
            names = sorted(t.getnames())
        await session.aclose()
        return names

    assert drive(py_daemon, body) == ["cache.txt", "keep", "keep/y"]


def test_process_numbers_and_exit_statuses():
    from agents.sandbox.session.pty_types import PTY_PROCESS_ID_MAX_EXCLUSIVE, PTY_PROCESS_ID_MIN

    from sandkasten.agents.pty import exit_status, model_id

    ids = [f"p-{i:012x}" for i in range(2000)]
    numbers = [model_id(i) for i in ids]
    assert numbers == [model_id(i) for i in ids]   # a function of the id alone: a new process finds it
    assert all(PTY_PROCESS_ID_MIN <= n < PTY_PROCESS_ID_MAX_EXCLUSIVE for n in numbers)
    assert len(set(numbers)) > 1950
    assert (exit_status(3, None), exit_status(None, "SIGKILL"), exit_status(None, "TERM"),
            exit_status(None, None), exit_status(None, "SIGNOPE")) == (3, 137, 143, None, None)
