"""The HTTP API as a new user probes it: odd JSON types, limits at their edges, retries that are
not retries, concurrent deletes, requests Sanic cannot parse. Every answer is a JSON error with
an error_code (never a 500, never a misleading one) and the daemon keeps serving."""

from __future__ import annotations

import socket
import threading
import time

from tests.test_api import assert_error, create, run
from tests.test_stream import GATE, go


def raw_http(daemon, request: bytes) -> tuple[int, bytes]:
    """Send bytes as they are (httpx refuses to send malformed requests); (status, body)."""
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=30) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def test_session_fields_are_checked_by_type_not_by_truthiness(daemon):
    c = daemon.client
    refused = {
        "image": {"image": ""},
        "network_mode": {"network_mode": {}},
        "env": {"env": []},
        "readonly_rootfs": {"readonly_rootfs": "yes"},
        "cpu_limit": {"cpu_limit": 0.001},   # below what the kernel takes: refused before anything is journaled
        "mem_limit_mb": {"mem_limit_mb": 7},
    }
    for field, body in refused.items():
        error = assert_error(c.post("/v1/sessions", json=body), 400, "INVALID_REQUEST")
        assert error["details"]["field"] == field, error
    assert "the minimum is 0.01" in c.post("/v1/sessions", json={"cpu_limit": 0.001}).json()["message"]
    assert_error(c.post("/v1/sessions", json=[]), 400, "INVALID_REQUEST")
    for raw in (b'{"cpu_limit": NaN}', b'{"cpu_limit": -Infinity}', b'{"ttl_seconds": Infinity}'):
        error = assert_error(c.post("/v1/sessions", content=raw, headers={"content-type": "application/json"}),
                             400, "INVALID_REQUEST")   # NaN used to reach the journal: 503 JOURNAL_ERROR
        assert error["details"]["field"] in ("cpu_limit", "ttl_seconds"), error
    assert c.get("/v1/sessions", params={"all": "true"}).json() == []   # nothing was journaled
    s = create(daemon, image=None, env={}, readonly_rootfs=None)   # null is "the default"
    assert s["image"] == "base"
    assert run(daemon, s["id"], "echo ok")["stdout"] == "ok\n"


def test_env_beyond_what_execve_takes_is_refused_at_the_edge_it_works(daemon):
    """Too big an env used to make a "running" session whose every exec failed with 127."""
    c = daemon.client
    one = assert_error(c.post("/v1/sessions", json={"env": {"BIG": "x" * 200_000}}), 400, "INVALID_REQUEST")
    assert one["details"]["field"] == "env" and "BIG" in one["message"]
    many = {f"V{i}": "y" * 100 for i in range(20_000)}
    assert "the maximum is" in assert_error(c.post("/v1/sessions", json={"env": many}), 400,
                                            "INVALID_REQUEST")["message"]
    assert c.get("/v1/sessions", params={"all": "true"}).json() == []
    edge = "x" * (128 * 1024 - 1 - len("BIG=") - 1)   # one NAME=value string of MAX_ARG_STRLEN with its NUL
    sid = create(daemon, env={"BIG": edge, **{f"V{i}": "y" * 100_000 for i in range(8)}})["id"]
    r = run(daemon, sid, "echo ${#BIG} ${#V7}")
    assert r["exit_code"] == 0 and r["stdout"] == f"{len(edge)} 100000\n", r


def test_an_idempotency_key_reused_for_another_command_is_refused(daemon):
    c = daemon.client
    sid = create(daemon)["id"]
    url, key = f"/v1/sessions/{sid}/exec", {"Idempotency-Key": "one-key"}
    first = c.post(url, json={"cmd": "echo one", "timeout_ms": 5000}, headers=key).json()
    again = c.post(url, json={"cmd": "echo one", "timeout_ms": 5000}, headers=key).json()
    assert again["exec_id"] == first["exec_id"] and again["stdout"] == "one\n"
    assert c.post(url, json={"cmd": "echo one"}, headers=key).json()["exec_id"] == first["exec_id"]
    other = assert_error(c.post(url, json={"cmd": "echo two"}, headers=key), 409, "DUPLICATE_IDEMPOTENCY_KEY")
    assert other["details"]["exec_id"] == first["exec_id"] and "different cmd" in other["message"]
    assert_error(c.post(url, json={"cmd": "echo one", "timeout_ms": 9000}, headers=key), 409,
                 "DUPLICATE_IDEMPOTENCY_KEY")
    assert_error(c.post(url, json={"cmd": 5}, headers=key), 400, "INVALID_REQUEST")
    stream = c.post(f"/v1/sessions/{sid}/exec/stream", json={"cmd": "echo two"}, headers=key)
    assert_error(stream, 409, "DUPLICATE_IDEMPOTENCY_KEY")
    assert [x["cmd"] for x in c.get(f"/v1/sessions/{sid}/execs").json()] == ["echo one"]


def test_raw_output_is_a_boolean_for_exec_and_stream_alike(daemon):
    c = daemon.client
    sid = create(daemon)["id"]
    for route in ("exec", "exec/stream"):   # "no" was raw output for one and text for the other
        error = assert_error(c.post(f"/v1/sessions/{sid}/{route}", json={"cmd": "echo", "raw_output": "no"}),
                             400, "INVALID_REQUEST")
        assert error["details"]["field"] == "raw_output"
    assert "stdout_base64" in run(daemon, sid, "echo hi", raw_output=True)
    assert run(daemon, sid, "echo hi", raw_output=False)["stdout"] == "hi\n"


def test_concurrent_deletes_all_succeed_and_an_exec_cut_short_says_why(daemon):
    c = daemon.client
    sid = create(daemon)["id"]
    answers: dict[str, object] = {}

    def exec_gated():
        answers["exec"] = c.post(f"/v1/sessions/{sid}/exec", json={"cmd": f"echo started; {GATE}"})

    runner = threading.Thread(target=exec_gated)
    runner.start()
    try:
        deadline = time.monotonic() + 60
        while not [x for x in c.get(f"/v1/sessions/{sid}/execs").json() if x["status"] == "running"]:
            assert time.monotonic() < deadline, "the exec never started"
            time.sleep(0.02)
        deletes = [None] * 3

        def delete(i):
            deletes[i] = c.delete(f"/v1/sessions/{sid}")

        threads = [threading.Thread(target=delete, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        if runner.is_alive() and c.get(f"/v1/sessions/{sid}").json()["status"] == "running":
            go(daemon, sid)
        runner.join()
    assert [(r.status_code, r.json()) for r in deletes] == [(200, {"ok": True})] * 3
    cut = assert_error(answers["exec"], 410, "SESSION_ENDED")
    assert "destroyed while it ran" in cut["message"] and "runner.sock" not in cut["message"], cut
    assert c.get(f"/v1/sessions/{sid}").json()["status"] == "destroyed"


def test_requests_sanic_cannot_parse_get_their_own_error_not_unauthorized(daemon):
    key = b"Authorization: Bearer test-key-123\r\n"
    status, body = raw_http(daemon, b"GARBAGE\r\n\r\n")
    assert status == 400 and b'"INVALID_REQUEST"' in body and b"unable to read the HTTP request" in body
    status, body = raw_http(daemon, b"GET /v1/sessions HTTP/1.1\r\nHost: x\r\n" + key + b"Content-Length: abc\r\n\r\n")
    assert status == 400 and b'"INVALID_REQUEST"' in body
    long_url = b"/v1/sessions/s-" + b"a" * 9000
    status, body = raw_http(daemon, b"GET " + long_url + b" HTTP/1.1\r\nHost: x\r\n" + key + b"\r\n")
    assert status == 413 and b'"PAYLOAD_TOO_LARGE"' in body and b"request head too large" in body
    assert_error(daemon.client.get("/v1/sessions/s-" + "a" * 7000), 404, "SESSION_NOT_FOUND")
    status, _ = raw_http(daemon, b"GET /v1/sessions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status == 401   # a well-formed request still needs the key
    assert daemon.client.get("/v1/sessions").status_code == 200


def test_file_writes_refuse_unknown_fields(daemon):
    c = daemon.client
    sid = create(daemon)["id"]
    for url in (f"/v1/sessions/{sid}/fs/write", "/v1/workspaces/ws-edges/fs/write"):
        error = assert_error(c.post(url, json={"path": "a.txt", "text": "x", "mode": "0777"}), 400,
                             "INVALID_REQUEST")
        assert "unknown field(s) mode" in error["message"], error
    assert c.get("/v1/workspaces").json() == []   # the refused write created no workspace
    r = c.post(f"/v1/sessions/{sid}/fs/write", json={"path": "a.txt", "text": "x"})
    assert r.status_code == 200, r.text


def test_header_bytes_that_are_no_utf8_and_bad_request_ids_are_clear_errors(daemon):
    status, body = raw_http(daemon, b"GET /v1/sessions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\r\n"
                                    b"Connection: close\r\n\r\n")
    assert status == 401 and b'"UNAUTHORIZED"' in body   # was a 500 (UnicodeEncodeError) with a traceback
    key = b"Authorization: Bearer test-key-123\r\n"
    for rid in (b"\xff\xfe", b"r" * 300, b"two words"):
        status, body = raw_http(daemon, b"GET /v1/sessions HTTP/1.1\r\nHost: x\r\n" + key + b"X-Request-ID: " + rid
                                + b"\r\nConnection: close\r\n\r\n")
        assert status == 400 and b"invalid X-Request-ID" in body, (rid, body)
    r = daemon.client.get("/v1/sessions", headers={"X-Request-ID": "trace-42"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-42"
    assert "Traceback" not in daemon.read_log()


def test_uploads_without_a_boundary_and_odd_counts_are_refused_clearly(daemon):
    c = daemon.client
    sid = create(daemon)["id"]
    url = f"/v1/sessions/{sid}/fs/upload"
    r = c.post(url, content=b"--zz\r\nfoo\r\n", headers={"content-type": "multipart/form-data"})
    assert "names no boundary" in assert_error(r, 400, "INVALID_REQUEST")["message"]
    r = c.post(url, data={"dir": "/etc"}, files={"x": ("a", b"1")})
    assert assert_error(r, 400, "PATH_REFUSED")["message"].startswith("unable to upload '/etc/a'")
    assert "Failed when parsing form" not in daemon.read_log()   # Sanic's traceback for the first one
    c.post(f"/v1/sessions/{sid}/fs/write", json={"path": "f", "text": "abc"})
    for odd in ("+1", " 1", "1_0", "\u0661", "1.0"):
        r = c.get(f"/v1/sessions/{sid}/fs/read", params={"path": "f", "max_bytes": odd})
        assert "expected an integer" in assert_error(r, 400, "INVALID_REQUEST")["message"], odd
    assert "must not be negative" in c.get(f"/v1/sessions/{sid}/fs/read",
                                           params={"path": "f", "max_bytes": "-1"}).json()["message"]
    r = c.get(f"/v1/sessions/{sid}/fs/read", params={"path": "f", "max_bytes": "2"}).json()
    assert r["content_base64"] == "YWI=" and r["truncated"] is True


def test_query_flags_are_true_or_false_never_silently_false(daemon):
    c = daemon.client
    sid = c.post("/v1/sessions", json={}).json()["id"]
    assert c.post("/v1/workspaces/w1/fs/write", json={"path": "f", "text": ""}).status_code == 200
    assert c.get("/v1/sessions", params={"all": "YES"}).status_code == 200
    assert c.get("/v1/sessions", params={"all": "0"}).status_code == 200
    for path, name in (("/v1/sessions", "all"), (f"/v1/sessions/{sid}/fs", "recursive"),
                       ("/v1/workspaces/w1/fs", "recursive")):
        r = c.get(path, params={name: "maybe", "path": "."})
        assert r.status_code == 400, (path, r.text)
        assert r.json()["error_code"] == "INVALID_REQUEST" and name in r.json()["message"]


def test_an_idempotency_key_that_is_no_utf8_is_a_clear_error(daemon):
    sid = create(daemon)["id"]
    key = b"Authorization: Bearer test-key-123\r\n"
    body = b'{"cmd": "echo hi"}'
    for path in (f"/v1/sessions/{sid}/exec", f"/v1/sessions/{sid}/exec/stream"):
        status, answer = raw_http(daemon, b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n" + key
                                  + b"Idempotency-Key: \xff\xfe-key\r\nContent-Type: application/json\r\n"
                                  + b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n"
                                  + body)
        assert status == 400 and b"invalid Idempotency-Key" in answer, (path, status, answer)
    assert daemon.client.get(f"/v1/sessions/{sid}/execs").json() == []   # nothing ran


def test_reading_a_file_the_sandbox_holds_a_lease_on_is_a_conflict(daemon, python_image):
    c = daemon.client
    sid = c.post("/v1/sessions", json={"image": python_image}).json()["id"]
    hold = ("python3 -c 'import fcntl, signal, time\n"
            "signal.signal(signal.SIGIO, signal.SIG_IGN)\n"
            "f = open(\"/workspace/leased\", \"w\")\n"
            "fcntl.fcntl(f, fcntl.F_SETLEASE, fcntl.F_WRLCK)\n"
            "print(\"held\", flush=True)\n"
            "time.sleep(30)' > /tmp/lease.out 2>&1 &\n"
            "for i in $(seq 50); do grep -q held /tmp/lease.out && break; sleep 0.1; done; cat /tmp/lease.out")
    r = run(daemon, sid, hold)
    assert r["stdout"] == "held\n", r
    got = c.get(f"/v1/sessions/{sid}/fs/read", params={"path": "leased"})
    assert got.status_code == 409 and got.json()["error_code"] == "FILE_BUSY", got.text
    assert "lease" in got.json()["message"]
