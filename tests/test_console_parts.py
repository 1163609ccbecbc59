"""The console's pure parts: login tokens and CSRF, the timeline fold, chart numbers, asset
lookup, template escaping and the `console` config section. (Browser tests: test_console.py;
HTTP tests against a real daemon: test_console_http.py.)"""

from __future__ import annotations

import base64
from datetime import datetime, timedelta, timezone

import pytest

from sandkasten import config
from sandkasten.console import assets, auth, charts, render, timeline
from sandkasten.domain import events as ev
from sandkasten.errors import ConfigError


# --- login tokens ---------------------------------------------------------------------

def test_a_token_proves_a_login_until_it_expires_or_is_revoked():
    gate = auth.Gate("api-key", "")
    token = gate.issue(now=1000)
    login = gate.read(token, now=1000)
    assert login is not None and login.expires == 1000 + auth.LIFETIME_S
    assert gate.read(token, now=1000 + auth.LIFETIME_S + 1) is None          # expired
    expires, nonce, mac = token.split(".")
    assert gate.read(f"{int(expires) + 999999}.{nonce}.{mac}", now=1000) is None   # a longer life is forged
    assert gate.read(f"{expires}.{nonce}.{'0' * 64}", now=1000) is None
    assert gate.read("", now=1000) is None and gate.read("a.b", now=1000) is None and gate.read(None) is None
    assert auth.Gate("other-key", "").read(token, now=1000) is None           # another key, another secret
    assert auth.Gate("api-key", "").read(token, now=1000) is not None          # a restart keeps the login
    gate.revoke(login)
    assert gate.read(token, now=1000) is None


def test_csrf_tokens_differ_per_login_and_the_key_compare_takes_any_bytes():
    gate = auth.Gate("api-key", "")
    one, two = gate.read(gate.issue()), gate.read(gate.issue())
    assert one.csrf != two.csrf and len(one.csrf) == 40
    assert gate.key_matches("api-key") and not gate.key_matches("api-kex") and not gate.key_matches("\udcff")
    assert gate.actor.startswith("console:") and not gate.open


def test_a_console_key_replaces_the_api_key_for_login_and_no_key_means_open():
    separate = auth.Gate("api-key", "console-key")
    assert separate.key_matches("console-key") and not separate.key_matches("api-key") and separate.separate_key
    nobody = auth.Gate("", "")
    assert nobody.open and nobody.key_matches("") and nobody.actor == "console:anonymous"


def test_cookie_flags():
    gate = auth.Gate("k", "")
    plain = gate.cookie_header("t", secure=False)
    assert plain.startswith("sk_console=t;") and "HttpOnly" in plain and "SameSite=Strict" in plain
    assert "Secure" not in plain.split("; ") and "Path=/" in plain
    assert gate.cookie_header("t", secure=True).endswith("; Secure")
    assert "Max-Age=0" in auth.Gate.clear_header(False)


@pytest.mark.parametrize("target, expected", [
    ("/console/audit?session=s-1", "/console/audit?session=s-1"), (None, "/console"), ("", "/console"),
    ("//evil.example/console", "/console"), ("https://evil.example/", "/console"), ("/console//x", "/console"),
    ("/consolex", "/console"), ("/console", "/console"), ("/v1/sessions", "/console"), ("/console/login", "/console"),
    ("/console/\\evil", "/console"), ("/console/\u00e9", "/console"), ("/console/\n", "/console"),
])
def test_a_login_only_sends_the_browser_on_to_a_console_page(target, expected):
    assert auth.safe_next(target) == expected


# --- the timeline -----------------------------------------------------------------------

def recorded(seq: int, kind: str, payload: dict, actor: str = "api:1") -> ev.RecordedEvent:
    return ev.RecordedEvent(seq=seq, stream_id="s-1", stream_version=seq, type=kind, schema_version=1,
                            payload=payload, actor=actor, request_id=None,
                            created_at=f"2024-05-01T10:00:{seq:02d}+00:00", hash="h")


def test_the_timeline_folds_commands_processes_and_facts_from_events():
    events = [
        recorded(1, ev.SESSION_REQUESTED, {"image": "base", "env": {"TOKEN": "hunter2"}, "workspace_id": "w"}),
        recorded(2, ev.SANDBOX_STARTED, {"pid": 42}, actor="executor"),
        recorded(3, ev.EXEC_REQUESTED, {"exec_id": "x-1", "cmd": "ls", "timeout_ms": 1000}),
        recorded(4, ev.EXEC_STARTED, {"exec_id": "x-1"}),
        recorded(5, ev.EXEC_FINISHED, {"exec_id": "x-1", "exit_code": 2, "cwd": "/tmp", "duration_ms": 3.5,
                                      "stdout_bytes": 1, "stderr_bytes": 2, "output_sha256": "ab",
                                      "truncated": False, "timed_out": False}),
        recorded(6, ev.EXEC_REQUESTED, {"exec_id": "x-2", "cmd": "sleep 9"}),
        recorded(7, ev.PROCESS_REQUESTED, {"process_id": "p-1", "cmd": "sh", "pty": {"rows": 24, "cols": 80},
                                          "env": {"SECRET": "x"}}),
        recorded(8, ev.PROCESS_STARTED, {"process_id": "p-1", "pid": 7}),
        recorded(9, ev.PROCESS_INPUT, {"process_id": "p-1", "kind": "stdin", "size": 8,
                                      "data_base64": base64.b64encode(b"echo hi\r").decode()}),
        recorded(10, ev.PROCESS_INPUT, {"process_id": "p-1", "kind": "resize", "rows": 30, "cols": 90}),
        recorded(11, ev.PROCESS_INPUT, {"process_id": "p-1", "kind": "stdin", "size": 3}),
        recorded(12, ev.SANDBOX_ADOPTED, {"pid": 42}, actor="reconciler"),
        recorded(13, ev.EXEC_LOST, {"exec_id": "x-2", "reason": "runner gone"}),
        recorded(14, ev.PROCESS_EXITED, {"process_id": "p-1", "exit_code": None, "signal": 9, "duration_ms": 5}),
        recorded(15, "session.future_fact", {"answer": 42, "env": {"A": "b"}, "data": "zzz"}),
    ]
    entries = timeline.fold(events)
    assert [e.key for e in entries] == ["f1", "f2", "x-1", "x-2", "p-1", "f12", "f15"]
    first = entries[0]
    assert first.text == "session requested: image base, workspace w" and "hunter2" not in first.text
    ls = entries[2]
    assert (ls.status, ls.exit_code, ls.cwd, ls.duration_ms, ls.output_sha256) == ("finished", 2, "/tmp", 3.5, "ab")
    assert (entries[3].status, entries[3].lost_reason) == ("lost", "runner gone")
    proc = entries[4]
    assert (proc.status, proc.pid, proc.signal, proc.pty) == ("exited", 7, 9, {"rows": 24, "cols": 80})
    assert [what for _, _, what in proc.inputs] == [
        "echo hi\\r", "resize to 90×30", "3 bytes (not recorded: audit.record_input is off)"]
    assert proc.input_bytes == 11
    assert entries[5].text.startswith("sandbox adopted by a restarted daemon")
    assert entries[6].text == "session.future_fact: answer=42"   # no env, no data


def test_replay_names_the_entry_each_later_event_changed():
    replay = timeline.Replay()
    entry, new = replay.apply(recorded(1, ev.EXEC_REQUESTED, {"exec_id": "x-1", "cmd": "true"}))
    assert new and entry.status == "requested"
    again, new = replay.apply(recorded(2, ev.EXEC_FINISHED, {"exec_id": "x-1", "exit_code": 0}))
    assert again is entry and not new and entry.status == "finished" and entry.last_seq == 2
    assert replay.apply(recorded(3, ev.EXEC_FINISHED, {"exec_id": "x-unknown"})) == (None, False)


# --- charts -----------------------------------------------------------------------------

def test_latency_histogram_buckets_and_percentiles():
    h = charts.histogram([0.5, 0.7, 3, 150, 70_000, None])
    counts = {b.label: b.count for b in h.bars}
    assert counts["1ms"] == 2 and counts["5ms"] == 1 and counts["200ms"] == 1 and counts[">60s"] == 1
    assert (h.total, h.p50, h.p90, h.p99, h.peak) == (5, 3, 70_000, 70_000, 2)
    tallest = max(h.bars, key=lambda b: b.height)
    assert tallest.label == "1ms" and tallest.y == 160 - tallest.height
    empty = charts.histogram([])
    assert empty.total == 0 and empty.p50 is None and all(b.height == 0 for b in empty.bars)


def test_sessions_alive_over_time():
    now = datetime(2024, 5, 1, 12, tzinfo=timezone.utc)
    spans = [(now - timedelta(hours=2), None), (now - timedelta(hours=1), now - timedelta(minutes=30)),
             (now - timedelta(minutes=10), None)]
    s = charts.live_over_time(spans, now, steps=12)
    assert s.start == now - timedelta(hours=2) and s.last == 2 and s.peak == 2
    assert len(s.points.split()) == 13
    assert charts.live_over_time([], now).last == 0


def test_pool_fill():
    fill = charts.pool_fill({"base": 4, "python": 2}, ["base", "base", "python", "python", "python", "old"])
    assert [(f.image, f.idle, f.target, f.width) for f in fill] == [
        ("base", 2, 4, 150.0), ("old", 1, 0, 300.0), ("python", 3, 2, 300.0)]


# --- assets, templates, config ------------------------------------------------------------

def test_missing_libraries_are_named_and_the_terminal_page_says_how_to_install_them(tmp_path, monkeypatch):
    assert assets.missing() == [], "run tools/console-assets: the console's libraries are not installed"
    monkeypatch.setattr(assets, "MODULES", tmp_path)
    assert assets.missing() == list(assets.LIBRARIES)
    with pytest.raises(assets.AssetNotFound, match="make install"):
        assets._send(tmp_path / assets.LIBRARIES["xterm.js"], "xterm.js")
    html = render.ENV.get_template("terminal.html").render(
        csrf="c", nonce="n", nav=render.NAV, section="sessions", version="0", logged_in=True, process_id="p-1",
        s={"id": "s-1"}, missing=assets.missing(), hint=assets.INSTALL_HINT)
    assert 'id="assets-missing"' in html and "/console/assets/xterm.js" not in html


def test_templates_escape_what_they_show():
    html = render.fragment("_entry.html", item={"sid": "s-1", "limit": 10, "out": None, "e": timeline.FactEntry(
        seq=1, type="x", at="2024-05-01T10:00:00+00:00", actor="<b>me</b>", text="<script>alert(1)</script>",
        severe=False)})
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "&lt;b&gt;me" in html


def test_the_console_config_section():
    assert config.from_mapping({}).console == config.Console(enabled=True, key="")
    assert config.from_mapping({"console": {"enabled": False}}).console.enabled is False
    with pytest.raises(ConfigError, match="unknown config key 'console.port'"):
        config.from_mapping({"console": {"port": 1}})
    with pytest.raises(ConfigError, match="console.enabled"):
        config.from_mapping({"console": {"enabled": "sometimes"}})
    cfg = config.load(None, env={"SANDKASTEN_CONSOLE__KEY": "yes", "SANDKASTEN_CONSOLE__ENABLED": "false"})
    assert cfg.console == config.Console(enabled=False, key="yes")   # a key is text, even 'yes'


def test_time_and_size_words():
    assert render.duration(0.25) == "0.25 ms" and render.duration(12) == "12 ms"
    assert render.duration(1500) == "1.5 s" and render.duration(200_000) == "3m 20s"
    assert render.duration(None) == "—" and render.size(None) == "—"
    assert render.size(10) == "10 B" and render.size(2048) == "2.0 KiB" and render.size(5 << 30) == "5.0 GiB"
    assert render.short_time("2024-05-01T10:00:00.123456+00:00") == "2024-05-01 10:00:00"
    assert render.short_time("garbage") == "—" and render.epoch_time(0) == "1970-01-01 00:00:00"
