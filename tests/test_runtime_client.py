"""The runner's socket clients (sandkasten/runtime/client.py) against a real unix socket that
answers like a runner: one JSON line per connection. A socket deeper than sun_path's 108
bytes (a long data_dir, pytest-xdist's worker dirs) is reached all the same."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
import threading
from pathlib import Path

import pytest

from runner import protocol
from sandkasten.errors import SandboxGone
from sandkasten.runtime import client


def runner_like(run_dir: Path) -> tuple[socket.socket, threading.Thread]:
    """A listener bound by a relative name, as the runner binds it; answers each request
    with {"ok": true, "echo": <the request's op>}."""
    run_dir.mkdir(parents=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    here = os.getcwd()
    os.chdir(run_dir)
    try:
        sock.bind("runner.sock")
    finally:
        os.chdir(here)
    sock.listen(4)

    def serve() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:  # closed: the test is over
                return
            with conn, conn.makefile("rb") as f:
                conn.sendall(protocol.encode({"ok": True, "echo": protocol.decode(f.readline())["op"]}))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return sock, thread


@pytest.fixture(params=["short", "beyond-sun-path"])
def run_dir(request, tmp_path) -> Path:
    top = Path(tempfile.mkdtemp(prefix="sk-")) if request.param == "short" else tmp_path / ("d" * 200)
    run = top / "run" / "s-0123456789ab"
    sock, thread = runner_like(run)
    try:
        assert (len(os.fsencode(str(run / "runner.sock"))) > 107) == (request.param == "beyond-sun-path")
        yield run
    finally:
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        thread.join(timeout=10)
        if request.param == "short":
            shutil.rmtree(top)


def test_both_clients_reach_the_socket_however_deep_it_is(run_dir):
    path = run_dir / "runner.sock"
    assert client.call(path, {"op": "ping"}) == {"ok": True, "echo": "ping"}
    assert asyncio.run(client.acall(path, {"op": "status"})) == {"ok": True, "echo": "status"}
    assert str(run_dir) not in descriptor_targets()  # the directory's descriptor is closed again


def descriptor_targets() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # closed meanwhile
            pass
    return out


def test_a_missing_socket_is_a_gone_sandbox_named_by_its_session(tmp_path):
    for depth in (20, 200):
        path = tmp_path / ("d" * depth) / "run" / "s-0123456789ab" / "runner.sock"
        for call in (lambda: client.call(path, {"op": "ping"}),
                     lambda: asyncio.run(client.acall(path, {"op": "ping"}))):
            with pytest.raises(SandboxGone, match="unable to reach the runner of sandbox s-0123456789ab") as err:
                call()
            assert str(tmp_path) not in str(err.value)
