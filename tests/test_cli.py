"""The `sandkasten` console script against a real journal file.

Most tests run without a daemon: the journal is seeded through the Journal API (the same
events the daemon would append) and exec logs are written in the runner's frame format, then
`ps`, `logs`, `audit`, `create`, `exec` and `rm` are checked by their output and exit code,
called in process (tests/inprocess.py). The installed script runs as a real subprocess where
the process boundary is the point: `version` through the script, `daemon -d` (it forks the
daemon and waits for it), `logs --follow` read while it runs and stopped by SIGINT, and one
test that starts a real daemon in the background and drives a session end to end.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import os
import re
import selectors
import signal
import socket
import sqlite3
import subprocess
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest

from runner import protocol
from sandkasten import __version__
from sandkasten.cli.args import Usage, call_args, exec_args, parse_since, split_config
from sandkasten.cli.render import duration, exec_header, humanize
from sandkasten.domain import commands as c
from sandkasten.runtime.layout import Layout
from sandkasten.store.journal import Journal
from tests.inprocess import run_cli

REPO = Path(__file__).resolve().parent.parent
SANDKASTEN = REPO / ".venv" / "bin" / "sandkasten"
LIVE, ENDED = "s-live00000001", "s-gone00000002"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Env:
    """A tmp sandkasten.yaml + data dir, and a way to run the CLI against it."""

    def __init__(self, root: Path, data: Path, extra: str = "") -> None:
        self.root, self.data = root, data
        self.config = root / "sandkasten.yaml"
        self.config.write_text(f"data_dir: {data}\nlisten: 127.0.0.1:{free_port()}\n{extra}")
        self.db = data / "sandkasten.db"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SANDKASTEN_")}

    def run(self, *args: str, config: bool = True) -> subprocess.CompletedProcess:
        """`sandkasten ARGS`, called in this process."""
        return run_cli([*(["--config", str(self.config)] if config else []), *args], cwd=self.root, env=self.env)

    def spawn(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """`sandkasten ARGS` run by the installed console script, in a process of its own."""
        return subprocess.run([str(SANDKASTEN), "--config", str(self.config), *args], capture_output=True,
                              text=True, cwd=self.root, env=self.env, timeout=timeout)

    def popen(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen([str(SANDKASTEN), "--config", str(self.config), *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, cwd=self.root, env=self.env)

    def journal(self, *steps: tuple[str, c.Command, str]) -> None:
        """Append (stream, command, actor) steps through the Journal API."""
        async def go() -> None:
            j = await Journal.open(self.db)
            try:
                for sid, command, actor in steps:
                    await j.execute(sid, command, actor=actor)
            finally:
                await j.close()
        asyncio.run(go())

    def exec_done(self, sid: str, exec_id: str, cmd: str, frames: list[tuple[int, bytes]], exit_code: int,
                  cwd: str, actor: str = "api-key:alice", truncated: bool = False) -> str:
        """Journal one finished exec and write its log like the runner does; returns its sha256."""
        logs = self.data / "logs" / sid
        logs.mkdir(parents=True, exist_ok=True)
        (logs / f"{exec_id}.log").write_bytes(b"".join(protocol.frame(s, d, time.time()) for s, d in frames))
        both = b"".join(d for _, d in frames)
        sha = hashlib.sha256(both).hexdigest()
        self.journal(
            (sid, c.RequestExec(exec_id=exec_id, cmd=cmd, timeout_ms=5000), actor),
            (sid, c.RecordExecStarted(exec_id=exec_id), "executor"),
            (sid, c.RecordExecFinished(
                exec_id=exec_id, exit_code=exit_code, cwd=cwd, duration_ms=12,
                stdout_bytes=sum(len(d) for s, d in frames if s == protocol.STDOUT),
                stderr_bytes=sum(len(d) for s, d in frames if s == protocol.STDERR),
                output_sha256=sha, truncated=truncated), "executor"),
        )
        return sha


def session(image: str = "base") -> c.RequestSession:
    return c.RequestSession(image=image, expires_at=datetime.now(timezone.utc) + timedelta(hours=1))


@pytest.fixture
def env(tmp_path) -> Env:
    return Env(tmp_path, tmp_path / "data")


@pytest.fixture
def seeded(env) -> Env:
    """A running session with two finished execs and one lost, and a destroyed session."""
    env.journal(
        (LIVE, session(), "api-key:alice"),
        (LIVE, c.RecordSandboxStarted(pid=4242, start_time=1), "executor"),
        (ENDED, session(), "cli"),
        (ENDED, c.RecordSandboxStarted(pid=4243, start_time=1), "executor"),
    )
    env.sha1 = env.exec_done(LIVE, "x-one", "echo hello", [(protocol.STDOUT, b"hello\n")], 0, "/workspace")
    env.sha2 = env.exec_done(LIVE, "x-two", "cd /tmp\nls nope", [(protocol.STDOUT, b"listing\n"),
                                                                 (protocol.STDERR, b"ls: nope: No such file\n")],
                             1, "/tmp")
    env.journal(
        (LIVE, c.RequestExec(exec_id="x-three", cmd="sleep 100", timeout_ms=5000), "api-key:bob"),
        (LIVE, c.RecordExecLost(exec_id="x-three", reason="runner died"), "reconciler"),
        (ENDED, c.RequestDestroy(reason="api"), "api-key:alice"),
        (ENDED, c.RecordSandboxStopped(), "executor"),
        (ENDED, c.RecordSessionDestroyed(), "executor"),
    )
    return env


# ---------------------------------------------------------------- argument handling (in process)

def test_exec_args_take_one_quoted_command_or_words_after_double_dash():
    assert exec_args(["s-1", "echo hi"]) == ("s-1", "echo hi", None, False)
    assert exec_args(["s-1", "--", "ls", "-la"]) == ("s-1", "ls -la", None, False)
    assert exec_args(["s-1", "ls", "-la"]) == ("s-1", "ls -la", None, False)
    assert exec_args(["s-1", "123"]) == ("s-1", "123", None, False)  # stays a string
    assert exec_args(["s-1", "--timeout", "500", "--json", "--", "grep", "--json", "f"]) == \
        ("s-1", "grep --json f", "500", True)
    assert exec_args(["s-1", "echo hi", "--timeout=7"]) == ("s-1", "echo hi", "7", False)
    assert exec_args(["--help"]) is None
    for bad in ([], ["s-1"], ["s-1", "--"], ["--bogus", "s-1", "ls"]):
        with pytest.raises(Usage):
            exec_args(bad)


def test_arguments_are_bound_strictly_before_the_command_runs():
    def logs(session: str, follow: bool = False, json: bool = False) -> None: ...
    def rm(*sessions: str, json: bool = False) -> None: ...
    def create(image: str | None = None, ttl: int | None = None) -> None: ...

    assert call_args(logs, ["--follow", "s-1"]) == ([], {"follow": True, "session": "s-1"})  # id was --follow's value
    assert call_args(logs, ["s-1", "-j", "--nofollow"]) == ([], {"session": "s-1", "json": True, "follow": False})
    assert call_args(logs, ["--session=s-1", "--json=false"]) == ([], {"session": "s-1", "json": False})
    assert call_args(rm, ["--json", "s-1", "s-2"]) == (["s-1", "s-2"], {"json": True})
    assert call_args(create, ["--ttl", "120", "--image=base"]) == ([], {"ttl": 120, "image": "base"})
    for fn, bad, message in ((logs, ["s-1", "yes"], "unexpected argument 'yes'"),  # was --follow
                             (logs, [], "missing SESSION"),
                             (logs, ["s-1", "--json=maybe"], "--json takes no value"),
                             (logs, ["s-1", "--dry-run"], "unknown option --dry-run"),
                             (logs, ["s-1", "-x"], "unknown option -x"),
                             (create, ["base"], "unexpected argument 'base'"),
                             (create, ["--ttl", "--image", "x"], "--ttl needs a value"),
                             (create, ["--ttl"], "--ttl needs a value")):
        with pytest.raises(Usage, match=re.escape(message)):
            call_args(fn, bad)


def test_config_is_taken_out_anywhere_before_double_dash():
    assert split_config(["ps", "--config", "a.yaml", "--all"]) == ("a.yaml", ["ps", "--all"])
    assert split_config(["--config=b.yaml"]) == ("b.yaml", [])
    assert split_config(["exec", "s-1", "--", "x", "--config", "c"]) == (None, ["exec", "s-1", "--", "x", "--config", "c"])
    with pytest.raises(Usage):
        split_config(["ps", "--config"])


def test_since_accepts_ages_and_iso_times():
    now = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
    assert parse_since("1h", now) == now - timedelta(hours=1)
    assert parse_since("2d", now) == now - timedelta(days=2)
    assert parse_since("30m", now) == now - timedelta(minutes=30)
    assert parse_since("2024-04-30T10:00:00Z", now) == datetime(2024, 4, 30, 10, tzinfo=timezone.utc)
    assert parse_since("2024-04-30", now) == datetime(2024, 4, 30, tzinfo=timezone.utc)
    assert parse_since(None, now) is None
    with pytest.raises(Exception, match="--since"):
        parse_since("yesterday", now)


def test_render_humanizes_times_and_durations():
    now = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
    assert humanize("2024-05-01T11:58:00+00:00", now) == "2 minutes ago"
    assert humanize("2024-05-01T12:29:30+00:00", now) == "in 29 minutes"
    assert humanize("2024-04-30T12:00:00+00:00", now) == "1 day ago"
    assert humanize("2024-05-01T12:00:00+00:00", now) == "just now"
    assert humanize(None, now) == "-"
    assert (duration(12), duration(1500), duration(125_000)) == ("12 ms", "1.5 s", "2m05s")
    row = {"id": "x-1", "cmd": "cd /tmp\nls", "requested_at": "2024-05-01T12:00:01.5+00:00", "status": "finished",
           "exit_code": 2, "duration_ms": 5, "cwd": "/tmp", "timed_out": False}
    assert exec_header(row) == "[2024-05-01T12:00:01Z] x-1 $ cd /tmp\n> ls  (exit 2, 5 ms, cwd /tmp, finished)"


# ---------------------------------------------------------------- the console script, no daemon

def test_version_and_help_need_no_config(tmp_path):
    env = Env(tmp_path, tmp_path / "data")
    env.config.write_text("not_a_key: 1\n")  # never read by version/help
    out = env.spawn("version")  # the installed console script reaches the entry point
    assert (out.returncode, out.stdout, out.stderr) == (0, f"sandkasten {__version__}\n", "")
    out = env.run("version")
    assert (out.returncode, out.stdout) == (0, f"sandkasten {__version__}\n")
    assert json.loads(env.run("version", "--json").stdout) == {"version": __version__}
    out = env.run("--help")
    assert out.returncode == 0 and "sandkasten ps" in out.stdout and "audit export" in out.stdout
    out = env.run("exec", "--help")
    assert out.returncode == 0 and "-- CMD WORDS" in out.stdout


def test_bad_config_key_exits_2_naming_the_key(env):
    env.config.write_text(f"data_dir: {env.data}\nbogus_key: 1\n")
    out = env.run("ps")
    assert out.returncode == 2
    assert out.stderr.strip() == "sandkasten: unknown config key 'bogus_key'"
    env.config.write_text(f"data_dir: {env.data}\ndefaults:\n  mem_limit_mb: lots\n")
    out = env.run("ps")
    assert out.returncode == 2 and "defaults.mem_limit_mb" in out.stderr and "Traceback" not in out.stderr


def test_every_bad_config_is_one_line_naming_the_key(env):
    cases = {
        "listen: [1\n": "unable to parse config",                     # bad YAML: where, on one line
        "session_ttl_seconds: 99999999999999999999999\n": "session_ttl_seconds: too large",
        "limits:\n  max_ttl_seconds: 400000000\n": "limits.max_ttl_seconds: at most",
        "defaults:\n  cpu_limit: .nan\n": "defaults.cpu_limit: expected a finite number",
        "defaults:\n  pids_limit: many\n": "defaults.pids_limit: expected an integer (got 'many')",
    }
    for text, message in cases.items():
        env.config.write_text(f"data_dir: {env.data}\n{text}")
        out = env.run("ps")
        assert out.returncode == 2 and message in out.stderr, (text, out.stderr)
        assert len(out.stderr.splitlines()) == 1 and "Traceback" not in out.stderr, out.stderr
    env.config.write_bytes(b"\xff\xfe not utf-8")
    out = env.run("ps")
    assert out.returncode == 2 and out.stderr.strip() == f"sandkasten: unable to read config {env.config}: " \
        "not UTF-8 text (byte 0)"


def test_environment_overrides_with_bad_values_name_the_variable(env):
    env.config.write_text(f"data_dir: {env.data}\n")
    for name, value, message in (
            ("SANDKASTEN_DEFAULTS__CPU_LIMIT", "[1", "defaults.cpu_limit: expected a number (got '[1')"),
            ("SANDKASTEN_DEFAULTS__BOGUS", "1", "from environment SANDKASTEN_DEFAULTS__BOGUS"),
            ("SANDKASTEN_SESSION_TTL_SECONDS", "1e99", "session_ttl_seconds: expected an integer")):
        out = env.run("security")  # loads the config, opens no journal
        assert out.returncode == 0, out.stderr
        env.env[name] = value
        out = env.run("security")
        del env.env[name]
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr
    env.env["SANDKASTEN_MIGRATIONS_DIR"] = str(REPO / "migrations")  # the journal's, not a config key
    assert env.run("security").returncode == 0


def test_config_comes_from_env_var_or_cwd_file(env):
    env.config.write_text(f"data_dir: {env.data}\nbogus_from_file: 1\n")
    assert "bogus_from_file" in env.run("ps", config=False).stderr  # ./sandkasten.yaml
    other = env.root / "other.yaml"
    other.write_text("bogus_from_env: 1\n")
    env.env["SANDKASTEN_CONFIG"] = str(other)
    assert "bogus_from_env" in env.run("ps", config=False).stderr


def test_unknown_command_and_usage_errors_exit_2(env):
    assert env.run("frobnicate").returncode == 2
    out = env.run("audit")
    assert out.returncode == 2 and "export, verify" in out.stderr
    assert env.run("daemon", "--bogus").returncode == 2


def test_ps_lists_live_sessions_and_all_with_ended(seeded):
    out = seeded.run("ps")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["SESSION", "ID", "IMAGE", "STATUS", "CREATED", "EXPIRES", "EXECS", "CWD", "WORKSPACE"]
    assert len(lines) == 2 and lines[1].startswith(LIVE)
    cells = re.split(r"\s{2,}", lines[1])
    assert cells[:3] == [LIVE, "base", "running"]
    assert cells[3] == "just now" or cells[3].endswith(" ago")
    assert cells[4].startswith("in ")
    assert cells[5:] == ["3", "/tmp", "-"]  # execs, cwd of the last exec, no workspace
    everything = seeded.run("ps", "--all").stdout
    assert LIVE in everything and ENDED in everything and "destroyed" in everything


def test_ps_json_gives_session_objects(seeded):
    rows = json.loads(seeded.run("ps", "--json").stdout)
    assert [r["id"] for r in rows] == [LIVE]
    live = rows[0]
    assert (live["status"], live["image"], live["cwd"], live["exec_count"]) == ("running", "base", "/tmp", 3)
    rows = json.loads(seeded.run("ps", "-a", "--json").stdout)
    assert {r["id"]: r["status"] for r in rows} == {LIVE: "running", ENDED: "destroyed"}


def test_logs_replays_every_command_with_its_output(seeded):
    out = seeded.run("logs", LIVE)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("[") and "x-one $ echo hello  (exit 0, 12 ms, cwd /workspace, finished)" in lines[0]
    assert lines[1] == "hello"
    assert "x-two $ cd /tmp" in lines[2]
    assert lines[3] == "> ls nope  (exit 1, 12 ms, cwd /tmp, finished)"
    assert lines[4:6] == ["listing", "ls: nope: No such file"]
    assert "x-three $ sleep 100  (lost)" in lines[6]
    assert lines[7] == "(lost: runner died)"
    assert len(lines) == 8


def test_logs_json_and_truncation_note(seeded):
    seeded.exec_done(LIVE, "x-big", "yes | head", [(protocol.STDOUT, b"y\n" * 3)], 0, "/tmp", truncated=True)
    rows = json.loads(seeded.run("logs", LIVE, "--json").stdout)
    assert [r["exec_id"] for r in rows] == ["x-one", "x-two", "x-three", "x-big"]
    assert rows[1]["stdout"] == "listing\n" and rows[1]["stderr"] == "ls: nope: No such file\n"
    assert rows[1]["exit_code"] == 1 and rows[1]["output_sha256"] == seeded.sha2
    assert rows[2]["status"] == "lost" and rows[2]["lost_reason"] == "runner died"
    text = seeded.run("logs", LIVE).stdout
    assert text.rstrip("\n").endswith("y\ny\ny\n(output truncated)")


def test_unknown_session_is_a_clear_error(seeded):
    for args in (("logs", "s-nope"), ("exec", "s-nope", "ls"), ("rm", "s-nope")):
        out = seeded.run(*args)
        assert out.returncode == 1, args
        assert "s-nope" in out.stderr and "no such session" in out.stderr and "Traceback" not in out.stderr


def test_logs_follow_prints_new_commands_until_the_session_ends(seeded):
    with seeded.popen("logs", LIVE, "--follow") as proc:
        try:
            seen = read_until(proc, b"(lost: runner died)")
            assert b"x-one" in seen
            seeded.exec_done(LIVE, "x-four", "echo later", [(protocol.STDOUT, b"later\n")], 0, "/tmp")
            assert b"later\n" in read_until(proc, b"later\n")
            seeded.journal((LIVE, c.RequestDestroy(reason="cli"), "cli"), (LIVE, c.RecordSandboxStopped(), "executor"),
                           (LIVE, c.RecordSessionDestroyed(), "executor"))
            assert proc.wait(timeout=60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


def test_logs_follow_stops_quietly_on_ctrl_c(seeded):
    with seeded.popen("logs", LIVE, "--follow") as proc:
        try:
            read_until(proc, b"(lost: runner died)")
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=60) == 0
            assert b"Traceback" not in proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()


def read_until(proc: subprocess.Popen, marker: bytes, limit_s: float = 60) -> bytes:
    """Read the process's stdout until `marker` shows up (fails the test after limit_s)."""
    seen = b""
    fd = proc.stdout.fileno()
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        deadline = time.monotonic() + limit_s
        while marker not in seen:
            if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                raise AssertionError(f"no {marker!r} in output: {seen!r}")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise AssertionError(f"output ended without {marker!r}: {seen!r}")
            seen += chunk
    return seen


def test_audit_export_jsonl_and_csv(seeded):
    out = seeded.run("audit", "export")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(r["exec_id"], r["cmd"], r["status"]) for r in rows] == [
        ("x-one", "echo hello", "finished"), ("x-two", "cd /tmp\nls nope", "finished"), ("x-three", "sleep 100", "lost")]
    assert rows[0]["output_sha256"] == seeded.sha1 and rows[1]["output_sha256"] == seeded.sha2
    assert (rows[0]["actor"], rows[0]["session"], rows[0]["exit_code"], rows[0]["cwd"]) == \
        ("api-key:alice", LIVE, 0, "/workspace")
    out = seeded.run("audit", "export", "--format", "csv")
    table = list(csv.DictReader(io.StringIO(out.stdout)))
    assert [r["exec_id"] for r in table] == ["x-one", "x-two", "x-three"]
    assert table[1]["cmd"] == "cd /tmp\nls nope" and table[1]["exit_code"] == "1"
    assert table[1]["output_sha256"] == seeded.sha2 and table[2]["exit_code"] == ""


def test_audit_export_filters_and_output_file(seeded):
    assert seeded.run("audit", "export", "--session", ENDED).stdout == ""
    assert len(seeded.run("audit", "export", "--since", "1h").stdout.splitlines()) == 3
    future = (datetime.now(timezone.utc) + timedelta(days=1)).isoformat()
    assert seeded.run("audit", "export", "--since", future).stdout == ""
    target = seeded.root / "audit.csv"
    out = seeded.run("audit", "export", "--format", "csv", "--output", str(target))
    assert out.returncode == 0 and out.stdout == "" and "exported 3 commands" in out.stderr
    assert len(list(csv.DictReader(io.StringIO(target.read_text())))) == 3
    bad = seeded.run("audit", "export", "--format", "xml")
    assert bad.returncode == 2 and "jsonl, csv" in bad.stderr
    bad = seeded.run("audit", "export", "--since", "yesterday")
    assert bad.returncode == 2 and "--since" in bad.stderr  # a usage error, like --format


def test_audit_export_errors_name_what_failed(seeded):
    for since in ("99999999999d", "999999999d"):  # was an OverflowError traceback
        out = seeded.run("audit", "export", "--since", since)
        assert (out.returncode, out.stderr) == (2, f"sandkasten: invalid --since '{since}': that is before the "
                                                   "year 1\n")
    target = seeded.root / "missing" / "audit.jsonl"
    out = seeded.run("audit", "export", "--output", str(target))
    assert (out.returncode, out.stderr) == (1, f"sandkasten: unable to write the audit export to {target}: "
                                               f"directory {target.parent} does not exist\n")
    out = seeded.run("audit", "export", "--session", "s-typo")  # was an empty export and exit 0
    assert (out.returncode, out.stdout) == (1, "")
    assert out.stderr == "sandkasten: unable to export the audit of session 's-typo': no such session\n"
    written = seeded.root / "nothing.jsonl"
    assert seeded.run("audit", "export", "--session", "s-typo", "--output", str(written)).returncode == 1
    assert not written.exists()  # no empty file left behind


def test_group_help_and_reading_a_missing_journal(env):
    for group, words in (("audit", ("audit export", "audit verify")), ("journal", ("journal rebuild",))):
        out = env.run(group, "--help")  # was a KeyError traceback
        assert out.returncode == 0 and all(w in out.stdout for w in words), out.stderr
    for args in (("ps",), ("logs", "s-1"), ("audit", "export"), ("audit", "verify"), ("doctor",)):
        out = env.run(*args)  # data_dir has no journal: say so, do not make an empty one
        assert out.returncode == 1 and out.stderr.startswith(
            f"sandkasten: unable to open the journal {env.db}: no such file"), (args, out.stderr)
        assert not env.data.exists()


def test_audit_verify_ok_then_tampered(seeded):
    out = seeded.run("audit", "verify")
    assert (out.returncode, out.stdout) == (0, "ok: 15 events verified\n")
    with sqlite3.connect(seeded.db) as db:
        seq = db.execute("SELECT seq FROM events WHERE payload LIKE '%echo hello%'").fetchone()[0]
        db.execute("DROP TRIGGER events_no_update")
        db.execute("UPDATE events SET payload = replace(payload, 'echo hello', 'echo HACKED') WHERE seq = ?", (seq,))
    db.close()
    out = seeded.run("audit", "verify")
    assert out.returncode == 1
    assert out.stdout.startswith(f"journal tampered: first bad event seq={seq} (")
    assert json.loads(seeded.run("audit", "verify", "--json").stdout)["first_bad_seq"] == seq
    out = seeded.run("journal", "rebuild")  # would carry the tampered command into the read tables
    assert out.returncode == 1 and f"hash chain breaks at event {seq}" in out.stderr and "--force" in out.stderr
    out = seeded.run("journal", "rebuild", "--force")
    assert (out.returncode, out.stdout) == (0, "rebuilt the read tables and indexes from 15 events\n"), out.stderr


def test_journal_rebuild_replays_every_event(seeded):
    out = seeded.run("journal", "rebuild")
    assert (out.returncode, out.stdout) == (0, "rebuilt the read tables and indexes from 15 events\n")
    assert [r["id"] for r in json.loads(seeded.run("ps", "--json").stdout)] == [LIVE]


def test_create_without_daemon_is_queued(data_dir, tmp_path):
    env = Env(tmp_path, data_dir)
    out = env.run("create", "--ttl", "120")
    assert out.returncode == 0, out.stderr
    sid = out.stdout.strip()
    assert sid.startswith("s-") and "queued" in out.stderr and sid in out.stderr
    rows = json.loads(env.run("ps", "--json").stdout)
    assert [(r["id"], r["status"], r["image"]) for r in rows] == [(sid, "requested", "base")]
    out = env.run("create", "--image", "nope", "--json")
    assert out.returncode == 1 and "nope" in out.stderr
    out = env.run("create", "--ttl", "abc")
    assert out.returncode == 1 and "ttl_seconds" in out.stderr
    out = env.run("exec", sid, "ls")  # not started yet: refused, not queued, and says why
    assert (out.returncode, out.stderr) == (1, f"sandkasten: unable to exec in session {sid}: its sandbox has not "
                                               "started yet, and no daemon is running to start it "
                                               "(sandkasten daemon -d)\n")


def test_exec_without_daemon_is_queued_and_exits_3(seeded):
    out = seeded.run("exec", LIVE, "--", "ls", "-la")
    assert out.returncode == 3 and "queued" in out.stderr and "no daemon" in out.stderr
    rows = [json.loads(line) for line in seeded.run("audit", "export").stdout.splitlines()]
    assert (rows[-1]["cmd"], rows[-1]["status"], rows[-1]["actor"]) == ("ls -la", "requested", "cli")
    out = seeded.run("exec", LIVE, "true", "--timeout", "99999999")
    assert out.returncode == 1 and "timeout_ms" in out.stderr
    out = seeded.run("exec", LIVE, "true", "--timeout", "-5")  # was "expected an integer"
    assert out.returncode == 1 and out.stderr == "sandkasten: invalid timeout_ms -5: the minimum is 1\n"


def test_unknown_flag_is_refused_before_anything_runs(seeded):
    out = seeded.run("rm", LIVE, "--jsno")
    assert out.returncode == 2 and "--jsno" in out.stderr
    assert json.loads(seeded.run("ps", "--json").stdout)[0]["status"] == "running"
    out = seeded.run("ps", LIVE, "extra")  # a word beyond SESSION (a bare `ps extra` was `ps --all` once)
    assert (out.returncode, out.stdout, out.stderr) == (2, "", "sandkasten: ps: unexpected argument 'extra'\n")
    out = seeded.run("logs", "--follow")
    assert (out.returncode, out.stderr) == (2, "sandkasten: logs: missing SESSION\n")
    out = seeded.run("logs", "--json", LIVE)  # flags before the id (Fire took the id as --json's value)
    assert out.returncode == 0 and [e["exec_id"] for e in json.loads(out.stdout)] == ["x-one", "x-two", "x-three"]
    out = seeded.run("logs", "--help")
    assert out.returncode == 0 and "--follow" in out.stdout and "INFO" not in out.stdout + out.stderr


def test_rm_without_daemon_requests_destroy_and_lists_unknown_ids(seeded):
    out = seeded.run("rm", LIVE, "s-nope", ENDED)
    assert out.returncode == 1
    assert out.stdout.split() == [LIVE, ENDED]
    assert "s-nope" in out.stderr and "no daemon is running" in out.stderr
    rows = {r["id"]: r["status"] for r in json.loads(seeded.run("ps", "--all", "--json").stdout)}
    assert rows == {LIVE: "destroying", ENDED: "destroyed"}
    assert json.loads(seeded.run("rm", LIVE, "--json").stdout) == [{"id": LIVE, "status": "destroying", "error": None}]


def test_daemon_d_on_a_port_in_use_fails_instead_of_reporting_the_other_process(env):
    with socket.socket() as other:  # e.g. a daemon of another data_dir answering /healthz
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        env.config.write_text(f"data_dir: {env.data}\nlisten: 127.0.0.1:{port}\n")
        out = env.spawn("daemon", "-d")
    assert (out.returncode, out.stdout) == (1, "")
    assert out.stderr == f"sandkasten: unable to start the daemon: 127.0.0.1:{port} is already in use by " \
                         "another process\n"
    assert env.run("stop").stdout == "sandkasten: no daemon is running for this data_dir\n"


# ---------------------------------------------------------------- with a real daemon

@pytest.fixture
def daemon_env(data_dir, tmp_path, cgroup_parent, runtime):
    """A daemon started with `sandkasten daemon -d`; stopped (and its sandboxes destroyed by the
    `runtime` fixture) even when the test fails."""
    env = Env(tmp_path, data_dir, extra=f"cgroup_parent: {cgroup_parent}\n")
    yield env
    stopped = env.run("stop")
    assert stopped.returncode == 0, stopped.stderr


def test_daemon_runs_what_the_cli_asks(daemon_env):
    env = daemon_env
    out = env.spawn("daemon", "-d")
    assert out.returncode == 0, out.stderr + (env.data / "run" / "daemon.log").read_text()
    out = env.run("create")
    assert out.returncode == 0, out.stderr
    sid = out.stdout.strip()
    first = env.run("exec", sid, "cd /tmp; export X=1")
    assert first.returncode == 0, first.stderr
    second = env.run("exec", sid, "pwd; echo $X; echo oops >&2; exit 4")
    assert (second.returncode, second.stdout, second.stderr) == (4, "/tmp\n1\n", "oops\n")
    assert env.run("exec", sid, "--", "echo", "123").stdout == "123\n"
    assert "exit 4" in env.run("logs", sid).stdout
    # --follow shows a command while it runs: its header says running, not "waiting for the daemon"
    gate = Layout(env.data).of(sid).workspace / "go"
    with env.popen("logs", sid, "--follow") as follow, \
            env.popen("exec", sid, "while [ ! -e /workspace/go ]; do sleep 0.1; done; echo released") as running:
        try:
            header = read_until(follow, b"echo released").splitlines()[-1]
            assert header.endswith(b"(running)"), header
            gate.write_text("")
            assert read_until(follow, b"finished)")
            assert running.wait(timeout=60) == 0
        finally:
            for proc in (follow, running):
                if proc.poll() is None:
                    proc.kill()
    out = env.run("rm", sid)
    assert (out.returncode, out.stdout.strip()) == (0, sid), out.stderr
    rows = {r["id"]: r["status"] for r in json.loads(env.run("ps", "--all", "--json").stdout)}
    assert rows[sid] == "destroyed"
    assert env.run("journal", "rebuild").returncode == 1  # refused while the daemon runs


def test_security_reports_the_confinement(tmp_path):
    cfg = tmp_path / "sandkasten.yaml"
    cfg.write_text(f"data_dir: {tmp_path / 'data'}\nsecurity:\n  seccomp: strict\n")
    r = run_cli(["--config", str(cfg), "security", "--json"])
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["run_as"] == {"uid": 65534, "gid": 65534} and report["seccomp"]["profile"] == "strict"
    assert {"mount", "unshare", "ptrace", "bpf"} <= set(report["seccomp"]["denied"])
    cfg.write_text(f"data_dir: {tmp_path / 'data'}\nsecurity:\n  userns: true\n")
    r = run_cli(["--config", str(cfg), "security"])
    assert r.returncode == 2 and "security.userns" in r.stderr


def test_security_states_the_remaining_gaps(tmp_path):
    cfg = tmp_path / "sandkasten.yaml"
    cfg.write_text(f"data_dir: {tmp_path / 'data'}\n")
    r = run_cli(["--config", str(cfg), "security", "--json"])
    gaps = json.loads(r.stdout)["gaps"]
    assert any("no user namespace" in g and "security.userns is not implemented" in g for g in gaps)
    assert any("same uid (65534)" in g and "inotify" in g for g in gaps)
    assert not any("no disk quota" in g for g in gaps)
    cfg.write_text(f"data_dir: {tmp_path / 'data'}\ndefaults:\n  disk_limit_mb: 0\nsecurity:\n  seccomp: 'off'\n")
    r = run_cli(["--config", str(cfg), "security"])
    assert r.returncode == 0, r.stderr
    text = r.stdout.split("remaining gaps")[1]
    assert "no disk quota" in text and "seccomp is off" in text


def test_daemon_d_returns_once_the_daemon_is_ready(data_dir, tmp_path, cgroup_parent, runtime):
    """`daemon -d` says started when the daemon takes changes: after the start-up reconcile (here:
    recreating a sandbox that died while no daemon ran), not when it merely answers /healthz."""
    env = Env(tmp_path, data_dir, extra=f"cgroup_parent: {cgroup_parent}\nreconcile:\n  lost_sandbox_policy: recreate\n")
    url = "http://" + env.config.read_text().split("listen: ")[1].split()[0]
    try:
        assert env.spawn("daemon", "-d").returncode == 0
        sids = [env.run("create").stdout.strip() for _ in range(6)]
        assert env.run("stop").returncode == 0
        for sid in sids:
            runtime.cgroups.kill(sid)   # they die while no daemon runs: the next start recreates them
        out = env.spawn("daemon", "-d")
        assert out.returncode == 0, out.stderr
        assert httpx.get(url + "/readyz").status_code == 200
        assert httpx.post(url + "/v1/sessions", json={}).status_code == 201   # changes are taken at once
        rows = {r["id"]: r["status"] for r in json.loads(env.run("ps", "--json").stdout)}
        assert all(rows[sid] == "running" for sid in sids), rows
    finally:
        env.run("stop")
