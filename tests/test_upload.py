"""Multipart uploads into a session's /workspace, against a real daemon."""

from __future__ import annotations

import base64
import hashlib
import os

from tests.test_api import assert_error, create, run


def upload(daemon, sid, files, **form):
    return daemon.client.post(f"/v1/sessions/{sid}/fs/upload", files=files, data=form)


def read(daemon, sid, path) -> bytes:
    r = daemon.client.get(f"/v1/sessions/{sid}/fs/read", params={"path": path})
    assert r.status_code == 200, r.text
    return base64.b64decode(r.json()["content_base64"])


def test_several_files_into_a_target_dir_and_a_binary_round_trip(daemon):
    sid = create(daemon)["id"]
    blob = os.urandom(5 * 1024 * 1024)
    r = upload(daemon, sid, [("files", ("a.txt", b"alpha\n", "text/plain")),
                             ("files", ("b.bin", blob, "application/octet-stream")),
                             ("other", ("ü n i.txt", "ü\n".encode(), "text/plain"))], dir="/workspace/in/deep")
    assert r.status_code == 200, r.text
    entries = r.json()["entries"]
    assert [e["path"] for e in entries] == ["/workspace/in/deep/a.txt", "/workspace/in/deep/b.bin",
                                            "/workspace/in/deep/ü n i.txt"]
    assert [e["size"] for e in entries] == [6, len(blob), 3]
    assert read(daemon, sid, "in/deep/b.bin") == blob
    assert read(daemon, sid, "/workspace/in/deep/ü n i.txt") == "ü\n".encode()
    out = run(daemon, sid, "cat in/deep/a.txt; md5sum in/deep/b.bin")
    assert out["stdout"].startswith("alpha\n") and out["exit_code"] == 0
    assert hashlib.md5(blob).hexdigest() in out["stdout"]
    # default dir is /workspace; a second upload replaces the file
    assert upload(daemon, sid, [("f", ("a.txt", b"v1", "text/plain"))]).status_code == 200
    assert upload(daemon, sid, [("f", ("a.txt", b"v2", "text/plain"))]).status_code == 200
    assert read(daemon, sid, "a.txt") == b"v2"


def test_traversal_and_bad_forms_are_refused_and_nothing_is_written(daemon):
    sid = create(daemon)["id"]
    for name in ("../../x", "../x", "a/b", "..", ".", "/etc/passwd", "a\\b"):
        r = upload(daemon, sid, [("f", ("ok.txt", b"1", "text/plain")), ("f", (name, b"x", "text/plain"))])
        assert_error(r, 400, "PATH_REFUSED")
    for target in ("../", "/etc", "/workspace/../..", "/"):
        assert_error(upload(daemon, sid, [("f", ("ok.txt", b"1", "text/plain"))], dir=target), 400, "PATH_REFUSED")
    assert_error(daemon.client.post(f"/v1/sessions/{sid}/fs/upload", json={"x": 1}), 400, "INVALID_REQUEST")
    assert_error(daemon.client.post(f"/v1/sessions/{sid}/fs/upload", data={"dir": "/workspace"},
                                    files={}), 400, "INVALID_REQUEST")
    assert_error(upload(daemon, sid, [("f", ("same", b"1", "text/plain")), ("g", ("same", b"2", "text/plain"))]),
                 400, "INVALID_REQUEST")
    listed = daemon.client.get(f"/v1/sessions/{sid}/fs").json()["entries"]
    assert listed == []   # every refusal came before the first write
    assert_error(upload(daemon, "s-000000000000", [("f", ("a", b"1", "text/plain"))]), 404, "SESSION_NOT_FOUND")


def test_size_limits_answer_413_with_the_limit(daemon_factory):
    daemon = daemon_factory(limits={"max_file_bytes": 1000, "max_body_bytes": 64 * 1024}).start()
    sid = create(daemon)["id"]
    ok = upload(daemon, sid, [("f", ("fits", b"x" * 1000, "application/octet-stream"))])
    assert ok.status_code == 200, ok.text
    r = upload(daemon, sid, [("f", ("small", b"x", "text/plain")),
                             ("f", ("big", b"x" * 1001, "application/octet-stream"))])
    body = assert_error(r, 413, "PAYLOAD_TOO_LARGE")
    assert body["details"]["limit"] == 1000
    assert [e["name"] for e in daemon.client.get(f"/v1/sessions/{sid}/fs").json()["entries"]] == ["fits"]
    too_big_body = upload(daemon, sid, [("f", ("huge", b"x" * (128 * 1024), "application/octet-stream"))])
    assert_error(too_big_body, 413, "PAYLOAD_TOO_LARGE")
    assert daemon.client.get("/healthz").status_code == 200
