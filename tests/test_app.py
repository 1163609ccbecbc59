"""The HTTP front (issue 15): the API key is checked on the head before any body is read, and
a body that trickles in is cut off."""

from __future__ import annotations

import socket
import time

from tests.daemons import API_KEY

BIG = 15 * 1024 * 1024


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def head(path: str, length: int, auth: bool) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: x", "Content-Type: application/json", f"Content-Length: {length}"]
    if auth:
        lines.append(f"Authorization: Bearer {API_KEY}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def answer(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    got = b""
    try:
        while b"\r\n\r\n" not in got:
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
    except TimeoutError:
        pass
    return got


def test_an_unauthenticated_body_is_refused_before_it_is_read(daemon):
    with socket.create_connection(("127.0.0.1", daemon.port)) as s:
        s.sendall(head("/v1/sessions", BIG, auth=False) + b"{")
        t0 = time.monotonic()
        reply = answer(s, 5)
        assert reply.startswith(b"HTTP/1.1 401"), reply[:200]
        assert time.monotonic() - t0 < 3
        s.settimeout(5)
        try:  # the connection is closed: an unread body cannot precede another request
            rest = s.recv(65536)
            while rest and not rest.endswith(b"}"):
                rest = s.recv(65536)
            assert s.recv(65536) == b""
        except ConnectionResetError:
            pass


def test_unauthenticated_partial_bodies_do_not_inflate_the_daemon(daemon):
    pid = daemon.proc.pid
    before = rss_kib(pid)
    socks = []
    try:
        for _ in range(20):
            s = socket.create_connection(("127.0.0.1", daemon.port))
            socks.append(s)
            s.settimeout(10)
            try:
                s.sendall(head("/v1/sessions", BIG, auth=False) + b"x" * (BIG - 1024))
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                pass  # refused early: what we want
        time.sleep(0.5)
        grown = rss_kib(pid) - before
        assert grown < 60 * 1024, f"the daemon grew by {grown} KiB holding unauthenticated bodies"
    finally:
        for s in socks:
            s.close()
    assert daemon.client.get("/readyz").status_code == 200


def test_a_slow_body_times_out(daemon_factory):
    d = daemon_factory(limits={"body_timeout_seconds": 1.5}).start()
    with socket.create_connection(("127.0.0.1", d.port)) as s:
        s.sendall(head("/v1/sessions", 1000, auth=True) + b'{"image": ')
        t0 = time.monotonic()
        reply = answer(s, 10)
        assert reply.startswith(b"HTTP/1.1 408"), reply[:300]
        assert 1.0 < time.monotonic() - t0 < 6
        assert b"REQUEST_TIMEOUT" in reply + s.recv(65536)
    r = d.client.post("/v1/sessions", json={})   # a whole body is fine
    assert r.status_code == 201, r.text
