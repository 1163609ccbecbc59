"""The console over plain HTTP against a real daemon (no browser): who gets in, what the cookie
may do on the JSON API, the security headers, bad input, and a daemon without the console."""

from __future__ import annotations

import contextlib
import re
import sqlite3
from datetime import datetime, timedelta, timezone
from typing import Iterator

import httpx

from tests.daemons import API_KEY


@contextlib.contextmanager
def login(daemon, key: str = API_KEY) -> Iterator[httpx.Client]:
    """A client holding the console's cookie (no bearer header)."""
    with httpx.Client(base_url=daemon.url, timeout=30) as web:
        r = web.post("/console/login", data={"key": key, "next": "/console/audit"})
        assert r.status_code == 303 and r.headers["location"] == "/console/audit", r.text
        assert web.cookies.get("sk_console")
        yield web


def csrf_of(web: httpx.Client) -> str:
    page = web.get("/console/sessions")
    assert page.status_code == 200
    return re.search(r'<meta name="csrf-token" content="([0-9a-f]+)">', page.text).group(1)


def test_the_cookie_stands_in_for_the_bearer_only_with_a_csrf_header_on_changes(daemon):
    anonymous = httpx.get(daemon.url + "/v1/sessions")
    assert anonymous.status_code == 401 and anonymous.json()["error_code"] == "UNAUTHORIZED"
    with login(daemon) as web:
        set_cookie = web.post("/console/login", data={"key": API_KEY}).headers["set-cookie"]
        assert "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie and "Secure" not in set_cookie
        assert web.get("/v1/sessions").status_code == 200
        refused = web.post("/v1/sessions", json={})
        assert refused.status_code == 403 and refused.json()["error_code"] == "FORBIDDEN"
        assert "CSRF" in refused.json()["message"]
        assert web.post("/v1/sessions", json={}, headers={"x-csrf-token": "0" * 40}).status_code == 403
        token = csrf_of(web)
        foreign = web.post("/v1/sessions", json={}, headers={"x-csrf-token": token, "origin": "http://evil.example"})
        assert foreign.status_code == 403 and "another origin" in foreign.json()["message"]
        made = web.post("/v1/sessions", json={}, headers={"x-csrf-token": token})
        assert made.status_code == 201, made.text
        sid = made.json()["id"]
        deleted = web.delete(f"/v1/sessions/{sid}", headers={"x-csrf-token": token})
        assert deleted.json() == {"ok": True}
        # the bearer header needs no CSRF token, as before
        assert daemon.client.post("/v1/sessions", json={}).status_code == 201
        with sqlite3.connect(daemon.data_dir / "sandkasten.db") as db:
            actors = dict(db.execute("SELECT type, actor FROM events WHERE stream_id = ? AND type IN "
                                     "('session.requested', 'session.destroy_requested')", (sid,)))
        db.close()
        assert actors["session.requested"] == actors["session.destroy_requested"]
        assert actors["session.requested"].startswith("console:")
        # logging out ends the login, also for a copy of the cookie
        stolen = web.cookies.get("sk_console")
        assert web.post("/console/logout", data={"csrf": token}).status_code == 303
        replay = httpx.get(daemon.url + "/console/sessions", cookies={"sk_console": stolen})
        assert replay.status_code == 303 and replay.headers["location"].startswith("/console/login")
        assert httpx.get(daemon.url + "/v1/sessions", cookies={"sk_console": stolen}).status_code == 401


def test_logout_and_other_console_changes_need_the_csrf_token(daemon):
    with login(daemon) as web:
        r = web.post("/console/logout", data={"csrf": "nope"})
        assert r.status_code == 403 and r.json()["error_code"] == "FORBIDDEN"
        assert web.get("/console/sessions").status_code == 200   # still logged in


def test_login_refusals_and_redirect_targets(daemon):
    with httpx.Client(base_url=daemon.url) as web:
        wrong = web.post("/console/login", data={"key": "guess"})
        assert wrong.status_code == 401 and "wrong API key" in wrong.text and not web.cookies.get("sk_console")
        empty = web.post("/console/login", content=b"", headers={"content-type": "text/plain"})
        assert empty.status_code == 401
        foreign = web.post("/console/login", data={"key": API_KEY}, headers={"origin": "http://evil.example"})
        assert foreign.status_code == 403 and not web.cookies.get("sk_console")
        away = web.post("/console/login", data={"key": API_KEY, "next": "//evil.example/x"})
        assert away.status_code == 303 and away.headers["location"] == "/console"
        assert web.get("/console/login?next=/console/metrics").headers["location"] == "/console/metrics"


def test_security_headers_on_every_console_answer(daemon):
    with login(daemon) as web:
        for path in ("/console/login", "/console/sessions", "/console/static/console.js", "/console/nope"):
            r = httpx.get(daemon.url + path, cookies=web.cookies) if path != "/console/login" else web.get(path)
            policy = r.headers["content-security-policy"]
            assert "script-src 'self';" in policy and "unsafe" not in policy and "frame-ancestors 'none'" in policy
            assert "default-src 'none'" in policy
            assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff"
        page = web.get("/console/sessions")
        nonce = re.search(r"'nonce-([^']+)'", page.headers["content-security-policy"]).group(1)
        assert f'<meta name="csp-nonce" content="{nonce}">' in page.text
        assert "<script>" not in page.text and re.search(r"\son[a-z]+\s*=", page.text) is None   # nothing inline
        assert page.headers["cache-control"] == "no-store"
        assert "/v1/" not in page.headers["content-security-policy"]


def test_bad_input_gets_a_clear_error_never_a_500(daemon):
    sid = daemon.client.post("/v1/sessions", json={}).json()["id"]
    with login(daemon) as web:
        html = {"accept": "text/html"}
        cases = [
            ("/console/audit?since=yesterday", 400, "INVALID_REQUEST", "invalid since 'yesterday'"),
            ("/console/audit/export?format=xml", 400, "INVALID_REQUEST", "format 'xml'"),
            ("/console/sessions/s-nope", 404, "SESSION_NOT_FOUND", "s-nope"),
            ("/console/sessions/..%2F..%2Fetc", 404, None, None),
            (f"/console/sessions/{sid}/files?path=/workspace/../../etc", 400, "PATH_REFUSED", "escapes"),
            (f"/console/sessions/{sid}/files/download?path=/etc/passwd", 400, "PATH_REFUSED", "escapes"),
            (f"/console/sessions/{sid}/files/download?path=nothing-here", 404, "FILE_NOT_FOUND", None),
            (f"/console/sessions/{sid}/execs/x-nope/output", 404, "EXEC_NOT_FOUND", "x-nope"),
            (f"/console/sessions/{sid}/processes/p-000000000000", 404, "PROCESS_NOT_FOUND", "p-000000000000"),
            ("/console/workspaces/nope/files", 404, "WORKSPACE_NOT_FOUND", "nope"),
            ("/console/assets/..%2F..%2Fpackage.json", 404, None, None),
            ("/console/assets/leftpad.js", 404, "NOT_FOUND", "not one of"),
            ("/console/static/nope.js", 404, "NOT_FOUND", None),
            ("/console/feed/sessions?ended=maybe", 400, "INVALID_REQUEST", "ended"),
            ("/console/feed/sessions/s-nope", 404, "SESSION_NOT_FOUND", None),
        ]
        for path, status, code, words in cases:
            r = web.get(path)
            assert r.status_code == status, (path, r.status_code, r.text[:300])
            if code:
                assert r.json()["error_code"] == code, (path, r.text)
            if words:
                assert words in r.json()["message"], (path, r.text)
            page = web.get(path, headers=html)
            assert page.status_code == status and "Traceback" not in page.text
            if code and page.headers["content-type"].startswith("text/html"):
                assert code in page.text
        assert "unhandled error" not in daemon.read_log() and " 500 " not in daemon.read_log()


def test_audit_export_filters_by_actor_and_time(daemon):
    sid = daemon.client.post("/v1/sessions", json={}).json()["id"]
    daemon.client.post(f"/v1/sessions/{sid}/exec", json={"cmd": "echo by-api"})
    with login(daemon) as web:
        token = csrf_of(web)
        r = web.post(f"/v1/sessions/{sid}/exec", json={"cmd": "echo by-console"}, headers={"x-csrf-token": token})
        assert r.status_code == 200, r.text
        everything = web.get("/console/audit/export?format=jsonl").text.splitlines()
        assert len(everything) == 2
        console_actor = re.search(r'"actor": "(console:[0-9a-f]+)"', everything[1]).group(1)
        mine = web.get("/console/audit/export", params={"format": "csv", "actor": console_actor}).text.splitlines()
        assert len(mine) == 2 and "echo by-console" in mine[1]
        later = (datetime.now(timezone.utc) + timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M")
        assert web.get("/console/audit/export", params={"since": later}).text == ""
        assert len(web.get("/console/audit/export", params={"until": later}).text.splitlines()) == 2
        page = web.get("/console/audit", params={"actor": console_actor})
        assert "echo by-console" in page.text and "echo by-api" not in page.text
        assert 'data-ok="true"' in page.text


def test_a_daemon_without_the_console(daemon_factory):
    daemon = daemon_factory(console={"enabled": False}).start()
    assert httpx.get(daemon.url + "/console/login").status_code == 404   # no such page (and nothing revealed)
    assert daemon.client.get("/console/login").status_code == 404
    assert daemon.client.get("/v1/sessions").status_code == 200


def test_a_separate_console_key(daemon_factory):
    daemon = daemon_factory(console={"key": "console-secret"}).start()
    with httpx.Client(base_url=daemon.url) as web:
        assert web.post("/console/login", data={"key": API_KEY}).status_code == 401
        assert "wrong console key" in web.post("/console/login", data={"key": API_KEY}).text
    with login(daemon, "console-secret") as web:
        assert web.get("/console/metrics").status_code == 200
        assert web.get("/v1/sessions").status_code == 200
    assert httpx.get(daemon.url + "/v1/sessions", headers={"authorization": "Bearer console-secret"}).status_code == 401


def test_a_daemon_without_an_api_key_has_an_open_console(daemon_factory):
    daemon = daemon_factory(api_key="").start()
    with httpx.Client(base_url=daemon.url) as web:
        page = web.get("/console/login")
        assert "has no API key" in page.text
        assert web.post("/console/login", data={"key": ""}).status_code == 303
        assert web.get("/console/sessions").status_code == 200
