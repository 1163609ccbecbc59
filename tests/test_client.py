"""sandkasten.client against a real daemon on loopback (sync and async), plus the pure parts
(SSE decoding, error typing). The restart test kills the daemon with SIGKILL between two execs
and starts it again while the client is already retrying."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest

from sandkasten.client import (AsyncClient, Client, ExecChunk, ExecDone, ExecResult, FileNotFound, NotFound,
                               PathRefused, Sandbox, SandkastenError, Session, SessionNotFound, Unauthorized)
from sandkasten.client import errors, protocol, sse
from tests.daemons import API_KEY


# ------------------------------------------------------------------ pure parts
def decode(text: str) -> list[sse.Event]:
    d = sse.Decoder()
    return [e for line in text.split("\n") if (e := d.feed(line)) is not None]


def test_sse_decoder_joins_data_keeps_ids_and_skips_comments():
    events = decode(": keep-alive\n\nid: 1\nevent: chunk\ndata: {\"a\":\ndata:  1}\n\nevent: done\ndata: {}\n\n")
    assert [(e.event, e.data, e.id) for e in events] == [("chunk", '{"a":\n 1}', "1"), ("done", "{}", "1")]


def test_error_bodies_become_typed_errors():
    e = errors.from_response(404, {"error_code": "SESSION_NOT_FOUND", "message": "unable to find session 's-1'",
                                   "details": {"session_id": "s-1"}}, "rid")
    assert isinstance(e, SessionNotFound) and isinstance(e, NotFound) and isinstance(e, SandkastenError)
    assert (e.status, e.code, e.details, e.request_id) == (404, "SESSION_NOT_FOUND", {"session_id": "s-1"}, "rid")
    unknown = errors.from_response(409, {"error_code": "SOMETHING_NEW", "message": "m", "details": {}})
    assert type(unknown) is errors.Conflict and unknown.code == "SOMETHING_NEW"
    garbage = errors.from_response(502, "<html>bad gateway</html>")
    assert type(garbage) is SandkastenError and "502" in garbage.message


def test_exec_stream_state_resumes_with_last_event_id():
    state = protocol.ExecStreamState("s-abc", "echo hi", None)
    first = state.request()
    assert first["method"] == "POST" and "Last-Event-ID" not in first["headers"]
    assert state.feed("id: 7") is None and state.feed("event: chunk") is None and state.feed('data: {"chunk": "hi\\n", "stream": "stdout", '
                                                      '"exec_id": "x-1"}') is None
    chunk = state.feed("")
    assert chunk == ExecChunk("hi\n", "stdout", None, "7")
    again = state.request()
    assert again["method"] == "GET" and again["url"].endswith("/execs/x-1/stream")
    assert again["headers"]["Last-Event-ID"] == "7" and again["headers"]["Idempotency-Key"] == first["headers"][
        "Idempotency-Key"]
    for line in ("id: 8", "event: error", 'data: {"error_code": "SANDBOX_LOST", "message": "gone"}'):
        state.feed(line)
    with pytest.raises(errors.SandboxLost):
        state.feed("")


def test_unreachable_daemon_is_a_typed_error():
    with Client(f"http://127.0.0.1:{_closed_port()}", API_KEY, retry_for=0.3) as client:
        with pytest.raises(errors.DaemonUnreachable, match="unable to reach"):
            client.list_sessions()


def test_every_api_error_code_has_its_typed_error():
    from sandkasten.api.errors import STATUS
    for code, status in STATUS.items():
        e = errors.from_response(status, {"error_code": code, "message": "m"})
        assert type(e) is not SandkastenError and isinstance(e, errors._BY_STATUS[status]), (code, type(e))
        assert (e.code, e.status) == (code, status)


@pytest.mark.parametrize("url, problem", [("http://[::1", "Invalid port"), ("ftp://127.0.0.1:8080", "http or https"),
                                          ("http://", "no host"), ("http://127.0.0.1:99999", "out of range")])
def test_a_malformed_url_is_a_typed_error_when_the_client_is_made(monkeypatch, url, problem):
    with pytest.raises(errors.InvalidURL, match=problem) as info:
        Client(url)
    assert isinstance(info.value, ValueError) and url in str(info.value)
    monkeypatch.setenv("SANDKASTEN_URL", url)
    with pytest.raises(errors.InvalidURL, match="from SANDKASTEN_URL"):
        AsyncClient()


def test_a_bare_host_and_port_means_http(daemon):
    with Client(daemon.url.removeprefix("http://") + "/", API_KEY) as client:
        assert client.url == daemon.url and client.health()["status"] == "ok"


def _closed_port() -> int:
    from tests.daemons import free_port
    return free_port()


# ------------------------------------------------------------------ sync client, real daemon
@pytest.fixture
def client(daemon):
    with Client(daemon.url, API_KEY) as c:
        yield c


def test_sessions_create_get_list_destroy(client):
    s = client.create_session()
    assert isinstance(s, Session) and s.status == "running" and s.image == "base"
    assert client.get_session(s.id).id == s.id
    assert s.id in [x.id for x in client.list_sessions()]
    client.destroy_session(s.id)
    assert client.get_session(s.id).status == "destroyed"
    assert s.id not in [x.id for x in client.list_sessions()]
    assert s.id in [x.id for x in client.list_sessions(include_ended=True)]


def test_exec_returns_a_typed_result_and_the_shell_persists(client):
    with client.session() as sb:
        r = sb.exec("mkdir -p /tmp/d && cd /tmp/d && X=42; echo out; echo err >&2; (exit 3)")
        assert isinstance(r, ExecResult)
        assert (r.exit_code, r.cwd, r.stdout, r.stderr, r.ok) == (3, "/tmp/d", "out\n", "err\n", False)
        assert r.exec_id.startswith("x-") and r.duration_ms is not None
        r2 = sb.exec("echo $X; pwd")
        assert r2.output == "42\n/tmp/d\n" and r2.ok
        assert [e.exec_id for e in sb.execs()] == [r.exec_id, r2.exec_id]
        assert client.get_exec(sb.id, r.exec_id).stdout == "out\n"
        timed = sb.exec("sleep 5", timeout_ms=200)
        assert timed.timed_out and not timed.ok
        with pytest.raises(errors.CommandTimeout):
            sb.exec("sleep 5", timeout_ms=200, raise_on_timeout=True)
        assert sb.stats().pids is not None


def test_the_same_idempotency_key_runs_a_command_once(client):
    with client.session() as sb:
        first = sb.exec("echo x >> /tmp/count; wc -l < /tmp/count", idempotency_key="k-1")
        second = sb.exec("echo x >> /tmp/count; wc -l < /tmp/count", idempotency_key="k-1")
        assert first.exec_id == second.exec_id and second.stdout.strip() == "1"
        assert sb.exec("wc -l < /tmp/count").stdout.strip() == "1"


def test_errors_are_typed(client, daemon):
    with pytest.raises(SessionNotFound) as info:
        client.exec("s-000000000000", "true")
    assert info.value.status == 404 and info.value.code == "SESSION_NOT_FOUND"
    with client.session() as sb:
        with pytest.raises(PathRefused) as refused:
            sb.write("../etc/passwd", "x")
        assert refused.value.status == 400
        with pytest.raises(FileNotFound):
            sb.read("missing.txt")
    with Client(daemon.url, "wrong-key") as bad, pytest.raises(Unauthorized):
        bad.list_sessions()


def test_files_write_read_list_exists_delete(client):
    with client.session() as sb:
        sb.write("dir/a.txt", "hello\n")
        sb.write("bin.dat", bytes(range(256)))
        assert sb.read("dir/a.txt").text == "hello\n"
        assert sb.read("bin.dat").content == bytes(range(256))
        assert sb.exec("cat /workspace/dir/a.txt").stdout == "hello\n"
        names = {e.name: e for e in sb.list_files()}
        assert names["dir"].is_dir and names["bin.dat"].size == 256
        assert [e.path for e in sb.list_files("dir")] == ["/workspace/dir/a.txt"]
        assert sb.exists("dir/a.txt") and sb.exists("dir") and not sb.exists("nope/x")
        assert all(sb.exists(root) for root in ("", ".", "/workspace", "/workspace/"))
        assert not sb.exists("dir/a.txt/x") and not sb.exists("/workspace/dir/a.txt/x/y")  # under a file
        with pytest.raises(PathRefused):
            sb.exists("../etc/passwd")
        sb.delete("dir", recursive=True)
        assert not sb.exists("dir")


def test_context_manager_destroys_the_session_also_on_error(client):
    with pytest.raises(ValueError):
        with client.session() as sb:
            sid = sb.id
            raise ValueError("boom")
    assert client.get_session(sid).status == "destroyed"


def test_a_failed_destroy_on_exit_does_not_hide_the_error_of_the_block(daemon):
    with Client(daemon.url, API_KEY, retry_for=0.2) as client:
        with pytest.raises(ValueError, match="boom") as info:
            with client.session() as sb:
                daemon.kill()  # the destroy on exit cannot reach it
                raise ValueError("boom")
        assert any(f"destroying sandbox session {sb.id} on exit failed" in n for n in info.value.__notes__)
        with pytest.raises(errors.DaemonUnreachable):  # without an error in the block, the failure is raised
            with Sandbox(client, sb.info):
                pass


def test_a_daemon_restart_between_two_execs_is_invisible(client, daemon):
    with client.session() as sb:
        assert sb.exec("cd /tmp && export KEPT=yes").exit_code == 0
        daemon.kill()  # SIGKILL: no goodbye to the client, the sandbox lives on
        starter = threading.Thread(target=daemon.start)
        starter.start()  # the next exec is sent while the daemon is still down or starting
        try:
            r = sb.exec("echo $KEPT; pwd")
        finally:
            starter.join()
        assert (r.stdout, r.exit_code) == ("yes\n/tmp\n", 0)


# ------------------------------------------------------------------ exec streaming
def _stream_true(client, sid: str):
    """Every route exists now: a missing one is a failure, never a skip."""
    return list(client.exec_stream(sid, "true"))


def test_exec_stream_yields_chunks_then_done(client):
    with client.session() as sb:
        _stream_true(client, sb.id)
        events = list(sb.exec_stream("for i in 1 2 3; do echo line$i; done; echo oops >&2; cd /tmp; (exit 4)"))
        chunks = [e for e in events if isinstance(e, ExecChunk)]
        done = events[-1]
        assert isinstance(done, ExecDone) and (done.exit_code, done.cwd) == (4, "/tmp")
        assert "".join(c.chunk for c in chunks if c.stream == "stdout") == "line1\nline2\nline3\n"
        assert "".join(c.chunk for c in chunks if c.stream == "stderr") == "oops\n"
        assert all(c.event_id for c in chunks)


def test_exec_stream_resumes_after_a_daemon_restart(client, daemon):
    with client.session() as sb:
        _stream_true(client, sb.id)
        seen: list[ExecChunk] = []
        stream = sb.exec_stream("for i in $(seq 1 6); do echo n$i; sleep 0.3; done")
        for event in stream:
            if isinstance(event, ExecChunk):
                seen.append(event)
                if len(seen) == 1:
                    daemon.kill()
                    threading.Thread(target=daemon.start).start()
            else:
                done = event
        assert done.exit_code == 0
        assert "".join(c.chunk for c in seen) == "".join(f"n{i}\n" for i in range(1, 7))


# ------------------------------------------------------------------ async client
def test_async_client_covers_the_same_calls(daemon):
    async def main() -> None:
        async with AsyncClient(daemon.url, API_KEY) as client:
            async with client.session() as sb:
                r = await sb.exec("cd /tmp; echo hi")
                assert (r.stdout, r.cwd, r.exit_code) == ("hi\n", "/tmp", 0)
                await sb.write("f.txt", "data")
                assert (await sb.read("f.txt")).text == "data"
                assert await sb.exists("f.txt")
                assert sb.id in [s.id for s in await client.list_sessions()]
                with pytest.raises(PathRefused):
                    await sb.read("/etc/passwd")
                sid = sb.id
            assert (await client.get_session(sid)).status == "destroyed"
            with pytest.raises(SessionNotFound):
                await client.get_session("s-000000000000")

    asyncio.run(main())


def test_async_client_survives_a_daemon_restart(daemon):
    async def main() -> None:
        async with AsyncClient(daemon.url, API_KEY) as client, client.session() as sb:
            await sb.exec("cd /tmp")
            daemon.kill()
            starter = threading.Thread(target=daemon.start)
            starter.start()
            try:
                r = await sb.exec("pwd")
            finally:
                await asyncio.to_thread(starter.join)
            assert r.stdout == "/tmp\n"

    asyncio.run(main())


def test_env_defaults(monkeypatch, daemon):
    monkeypatch.setenv("SANDKASTEN_URL", daemon.url + "/")
    monkeypatch.setenv("SANDKASTEN_API_KEY", API_KEY)
    with Client() as client:
        assert client.url == daemon.url and client.health()["status"] == "ok"
        assert isinstance(client.list_sessions(), list)
    monkeypatch.delenv("SANDKASTEN_URL")
    assert Client().url == "http://127.0.0.1:8080"


def test_transport_errors_never_escape_untyped(daemon):
    with Client(daemon.url, API_KEY, retry_for=0.2, timeout=0.5) as client:
        daemon.kill()
        with pytest.raises(errors.DaemonUnreachable):
            client.get_session("s-000000000000")
        assert not isinstance(errors.DaemonUnreachable("x"), httpx.HTTPError)


# ------------------------------------------------------------------ uploads and workspaces
def _call_route(call, what: str):
    """Every route exists now: a missing one is a failure, never a skip."""
    return call()


def test_upload_is_binary_safe(client):
    with client.session() as sb:
        entries = _call_route(lambda: sb.upload({"a.bin": b"\x00\xff" * 10, "b.txt": b"b"}, "/workspace/up"),
                                 "POST /v1/sessions/{id}/fs/upload")
        assert sorted(e.path for e in entries) == ["/workspace/up/a.bin", "/workspace/up/b.txt"]
        assert sb.read("up/a.bin").content == b"\x00\xff" * 10
        with pytest.raises(PathRefused):
            sb.upload({"x": b"x"}, "/workspace/../etc")


def test_workspaces_outlive_sessions(client):
    with client.session(workspace_id="ws-client-test") as sb:
        sb.exec("echo kept > /workspace/kept.txt")
        listed = _call_route(client.list_workspaces, "GET /v1/workspaces")
        ws = next(w for w in listed if w.id == "ws-client-test")
        assert ws.in_use_by == (sb.id,)
    assert client.workspace_read("ws-client-test", "kept.txt").text == "kept\n"
    client.workspace_write("ws-client-test", "from-api.txt", "api")
    assert {e.name for e in client.workspace_list("ws-client-test")} == {"kept.txt", "from-api.txt"}
    with client.session(workspace_id="ws-client-test") as sb:
        assert sb.exec("cat /workspace/from-api.txt").stdout == "api"
    client.delete_workspace("ws-client-test")
    assert "ws-client-test" not in [w.id for w in client.list_workspaces()]
    with pytest.raises(errors.WorkspaceNotFound):
        client.workspace_read("ws-client-test", "kept.txt")
