"""Processes and terminals beside the shell (issue 10), against a real daemon and real sandboxes:
background servers, a REPL on a PTY, a full-screen program resized, a daemon SIGKILL while a
terminal program runs, limits and bad input, and the journal's record of what was typed."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import time

import httpx
import pytest

from tests.test_stream import events


def create(daemon, **body) -> str:
    r = daemon.client.post("/v1/sessions", json=body)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def start(daemon, sid, cmd, status=201, headers=None, **body) -> dict:
    r = daemon.client.post(f"/v1/sessions/{sid}/processes", json={"cmd": cmd, **body}, headers=headers or {})
    assert r.status_code == status, r.text
    return r.json()


def stdin(daemon, sid, pid, data: str | None = None, status=200, **body) -> dict:
    payload = {**({"data": data} if data is not None else {}), **body}
    r = daemon.client.post(f"/v1/sessions/{sid}/processes/{pid}/stdin", json=payload)
    assert r.status_code == status, r.text
    return r.json()


def get(daemon, sid, pid) -> dict:
    r = daemon.client.get(f"/v1/sessions/{sid}/processes/{pid}")
    assert r.status_code == 200, r.text
    return r.json()


class Output:
    """Polls …/output from where it left off, keeping every byte once."""

    def __init__(self, daemon, sid, pid):
        self.daemon, self.sid, self.pid = daemon, sid, pid
        self.offset, self.data = 0, b""

    def poll(self) -> dict:
        r = self.daemon.client.get(f"/v1/sessions/{self.sid}/processes/{self.pid}/output",
                                   params={"offset": self.offset})
        assert r.status_code == 200, r.text
        body = r.json()
        self.data += base64.b64decode(body["output_base64"])
        self.offset = body["next_offset"]
        return body

    def until(self, needle: bytes, timeout=20.0) -> bytes:
        deadline = time.monotonic() + timeout
        while needle not in self.data:
            assert time.monotonic() < deadline, f"{needle!r} not in output: {self.data[-2000:]!r}"
            self.poll()
            time.sleep(0.05)
        return self.data

    def to_end(self, timeout=20.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            body = self.poll()
            if body["eof"]:
                return body
            assert time.monotonic() < deadline, f"no end: {body}"
            time.sleep(0.05)


def wait_status(daemon, sid, pid, statuses=("exited", "lost"), timeout=20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        row = get(daemon, sid, pid)
        if row["status"] in statuses:
            return row
        assert time.monotonic() < deadline, f"process still {row['status']}"
        time.sleep(0.05)


def journal_events(daemon, sid) -> list[dict]:
    import sqlite3
    conn = sqlite3.connect(daemon.data_dir / "sandkasten.db")
    try:
        rows = conn.execute("SELECT type, payload, actor FROM events WHERE stream_id = ? ORDER BY seq", (sid,))
        return [{"type": t, "payload": json.loads(p), "actor": a} for t, p, a in rows]
    finally:
        conn.close()


# ------------------------------------------------------------------ what agents run beside the shell
def test_background_http_server_is_reached_from_an_exec_in_the_same_session(daemon, python_image):
    sid = create(daemon, image=python_image)
    proc = start(daemon, sid, "python3 -m http.server 8765 --bind 127.0.0.1", cwd="/workspace")
    assert proc["status"] == "running" and proc["pid"] > 1 and proc["process_id"].startswith("p-")
    daemon.client.post(f"/v1/sessions/{sid}/fs/write", json={"path": "hello.txt", "text": "served from the box"})
    probe = ("for i in $(seq 50); do python3 -c \"import urllib.request as u;"
             "print(u.urlopen('http://127.0.0.1:8765/hello.txt').read().decode())\" 2>/dev/null && break;"
             " sleep 0.1; done")
    r = daemon.client.post(f"/v1/sessions/{sid}/exec", json={"cmd": probe})
    assert r.json()["output"].strip() == "served from the box"
    # the shell stays free while the server runs, and the server runs beside it, not in it
    assert daemon.client.post(f"/v1/sessions/{sid}/exec", json={"cmd": "jobs | wc -l"}).json()["output"].strip() == "0"
    listed = daemon.client.get(f"/v1/sessions/{sid}/processes").json()
    assert [p["process_id"] for p in listed] == [proc["process_id"]]
    assert listed[0]["stderr_bytes"] > 0   # the server's request log, counted live
    killed = daemon.client.delete(f"/v1/sessions/{sid}/processes/{proc['process_id']}")
    assert killed.status_code == 200 and killed.json()["process"]["signal"] == "SIGKILL"
    assert daemon.client.get(f"/v1/sessions/{sid}/processes").json() == []
    assert len(daemon.client.get(f"/v1/sessions/{sid}/processes", params={"all": "true"}).json()) == 1


def test_python_repl_driven_through_a_pty(daemon, python_image):
    sid = create(daemon, image=python_image)
    proc = start(daemon, sid, "python3 -i -q", pty={"rows": 24, "cols": 80})
    pid = proc["process_id"]
    assert proc["pty"] == {"rows": 24, "cols": 80}
    out = Output(daemon, sid, pid)
    out.until(b">>> ")
    stdin(daemon, sid, pid, "6 * 7\n")
    out.until(b"42\r\n>>> ")
    stdin(daemon, sid, pid, "import os, sys; print(os.isatty(0), os.getuid())\n")
    out.until(b"True 65534")
    stdin(daemon, sid, pid, eof=True)   # ^D on a terminal: the REPL ends
    final = out.to_end()
    assert final["status"] == "exited" and final["exit_code"] == 0
    row = get(daemon, sid, pid)
    assert row["stdout_bytes"] == len(out.data) and row["stderr_bytes"] == 0   # one stream on a terminal
    assert row["output_sha256"] == hashlib.sha256(out.data).hexdigest()
    # every keystroke is in the journal, in order, with its bytes and their hash
    typed = [e["payload"] for e in journal_events(daemon, sid) if e["type"] == "process.input"]
    assert [t["kind"] for t in typed] == ["stdin", "stdin", "eof"]
    assert base64.b64decode(typed[0]["data_base64"]) == b"6 * 7\n"
    assert typed[0]["sha256"] == hashlib.sha256(b"6 * 7\n").hexdigest() and typed[0]["size"] == 6


FULL_SCREEN = r'''
import curses, sys
def main(scr):
    curses.curs_set(0)
    while True:
        rows, cols = scr.getmaxyx()
        scr.erase(); scr.addstr(0, 0, f"SIZE {rows}x{cols}"); scr.refresh()
        ch = scr.getch()
        if ch == ord("q"):
            return
curses.wrapper(main)
print("bye")
'''


def test_full_screen_program_survives_a_resize(daemon, python_image):
    sid = create(daemon, image=python_image)
    daemon.client.post(f"/v1/sessions/{sid}/fs/write", json={"path": "screen.py", "text": FULL_SCREEN})
    pid = start(daemon, sid, "python3 screen.py", pty={"rows": 24, "cols": 80}, env={"TERM": "xterm"})["process_id"]
    out = Output(daemon, sid, pid)
    out.until(b"SIZE 24x80")
    r = daemon.client.post(f"/v1/sessions/{sid}/processes/{pid}/resize", json={"rows": 40, "cols": 132})
    assert r.status_code == 200, r.text
    out.until(b"SIZE 40x132")   # SIGWINCH reached it; it redrew at the new size
    assert get(daemon, sid, pid)["pty"] == {"rows": 40, "cols": 132}
    stdin(daemon, sid, pid, "q")
    final = out.to_end()
    assert final["exit_code"] == 0 and b"bye" in out.data
    resized = [e["payload"] for e in journal_events(daemon, sid) if e["type"] == "process.input"
               and e["payload"]["kind"] == "resize"]
    assert resized == [{"process_id": pid, "kind": "resize", "rows": 40, "cols": 132}]


# ------------------------------------------------------------------ crash safety
def test_daemon_sigkill_while_a_terminal_program_runs_then_reattach(daemon, python_image):
    sid = create(daemon, image=python_image)
    pid = start(daemon, sid, "python3 -i -q", pty={"rows": 24, "cols": 80})["process_id"]
    seen = []
    with daemon.client.stream("GET", f"/v1/sessions/{sid}/processes/{pid}/stream") as r:
        assert r.status_code == 200
        stdin(daemon, sid, pid, "print('before', 6 * 7)\n")
        for e in events(r):
            seen.append(e)
            if "before 42" in "".join(x["data"].get("chunk", "") for x in seen):
                break
    resume_at = seen[-1]["id"]
    daemon.kill()   # SIGKILL: the REPL is the runner's child, it keeps running
    daemon.start()
    assert get(daemon, sid, pid)["status"] == "running"
    stdin(daemon, sid, pid, "print('after', 6 * 8)\n")
    stdin(daemon, sid, pid, "raise SystemExit(5)\n")
    rest = []
    with daemon.client.stream("GET", f"/v1/sessions/{sid}/processes/{pid}/stream",
                              headers={"Last-Event-ID": resume_at}) as r:
        assert r.status_code == 200
        for e in events(r):
            rest.append(e)
            if e["event"] in ("done", "error"):
                break
    assert rest[-1]["event"] == "done" and rest[-1]["data"]["exit_code"] == 5
    text = "".join(e["data"].get("chunk", "") for e in seen + rest if e["event"] == "chunk")
    log = (daemon.data_dir / "logs" / sid / f"{pid}.log")
    from runner.protocol import read_output
    assert text.encode() == read_output(log)[2]   # every byte once: nothing lost, nothing repeated
    assert "before 42" in text and "after 48" in text


def test_a_process_that_ends_while_the_daemon_is_down_gets_its_real_exit_code(daemon):
    sid = create(daemon)
    pid = start(daemon, sid, "sleep 1; echo done late; exit 7")["process_id"]
    daemon.kill()
    time.sleep(1.5)
    daemon.start()
    row = wait_status(daemon, sid, pid)
    assert row["status"] == "exited" and row["exit_code"] == 7
    out = Output(daemon, sid, pid)
    out.to_end()
    assert out.data == b"done late\n"


def test_a_dead_sandbox_settles_its_processes(daemon):
    sid = create(daemon)
    quick = start(daemon, sid, "exit 3")["process_id"]
    slow = start(daemon, sid, "sleep 60")["process_id"]
    wait_status(daemon, sid, quick)
    daemon.kill()
    from sandkasten.runtime.layout import Layout
    runner_pid = int(Layout(daemon.data_dir).of(sid).pidfile.read_text().split()[0])
    os.kill(runner_pid, signal.SIGKILL)   # our own sandbox's runner: the sandbox dies
    daemon.start()
    assert get(daemon, sid, quick)["exit_code"] == 3
    lost = wait_status(daemon, sid, slow)
    assert lost["status"] == "lost" and "died" in lost["lost_reason"]


# ------------------------------------------------------------------ limits and bad input
def test_limits_and_bad_input(daemon_factory):
    daemon = daemon_factory(processes={"max_per_session": 2, "max_log_bytes": 65536}).start()
    sid = create(daemon)
    c = daemon.client
    a = start(daemon, sid, "sleep 30")["process_id"]
    start(daemon, sid, "sleep 30")
    full = start(daemon, sid, "sleep 30", status=409)
    assert full["error_code"] == "TOO_MANY_PROCESSES"
    for body, field in (({}, "cmd"), ({"cmd": ""}, "cmd"), ({"cmd": "x", "pty": {"rows": 0, "cols": 80}}, "rows"),
                        ({"cmd": "x", "pty": {"rows": 24, "cols": 5000}}, "cols"), ({"cmd": "x", "cwd": "rel"}, "cwd"),
                        ({"cmd": "x", "bogus": 1}, None), ({"cmd": "x", "timeout_ms": -1}, "timeout_ms")):
        r = c.post(f"/v1/sessions/{sid}/processes", json=body)
        assert r.status_code == 400 and r.json()["error_code"] == "INVALID_REQUEST", (body, r.text)
        if field:
            assert field in r.json()["message"]
    r = c.post(f"/v1/sessions/{sid}/processes/{a}/signal", json={"signal": "SIGNOPE"})
    assert r.status_code == 400 and "SIGNOPE" in r.json()["message"]
    r = c.post(f"/v1/sessions/{sid}/processes/{a}/resize", json={"rows": 30, "cols": 100})
    assert r.status_code == 400 and "no terminal" in r.json()["message"]
    assert c.post(f"/v1/sessions/{sid}/processes/{a}/stdin", json={}).status_code == 400
    assert c.post(f"/v1/sessions/{sid}/processes/{a}/stdin", json={"data_base64": "***"}).status_code == 400
    assert c.get(f"/v1/sessions/{sid}/processes/p-000000000000").json()["error_code"] == "PROCESS_NOT_FOUND"
    assert c.get(f"/v1/sessions/{sid}/processes/../../etc").status_code == 404
    r = c.post(f"/v1/sessions/{sid}/processes/{a}/signal", json={"signal": "TERM"})
    assert r.status_code == 200
    ended = wait_status(daemon, sid, a)
    assert ended["signal"] == "SIGTERM" and ended["exit_code"] is None
    r = c.post(f"/v1/sessions/{sid}/processes/{a}/stdin", json={"data": "late"})
    assert r.status_code == 409 and r.json()["error_code"] == "PROCESS_EXITED"
    # room again for one more; a timeout ends it
    t = start(daemon, sid, "sleep 30", timeout_ms=300)["process_id"]
    assert wait_status(daemon, sid, t)["timed_out"] is True


def test_output_log_is_bounded_and_the_drop_is_flagged(daemon_factory):
    daemon = daemon_factory(processes={"max_log_bytes": 65536}).start()
    sid = create(daemon)
    cmd = "i=0; while [ $i -lt 3000 ]; do echo line-$i-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx; i=$((i+1)); done"
    pid = start(daemon, sid, cmd)["process_id"]
    row = wait_status(daemon, sid, pid)
    assert row["exit_code"] == 0 and row["stdout_bytes"] > 150_000 and row["dropped_bytes"] > 0
    log = daemon.data_dir / "logs" / sid / f"{pid}.log"
    assert log.stat().st_blocks * 512 < 200_000   # the disk holds about the bound, not everything
    out = Output(daemon, sid, pid)
    first = out.poll()
    assert first["dropped"] is True and first["offset"] > 0
    out.to_end()
    assert out.data.endswith(b"line-2999-" + b"x" * 50 + b"\n")
    assert len(out.data) + row["dropped_bytes"] == row["stdout_bytes"]
    with daemon.client.stream("GET", f"/v1/sessions/{sid}/processes/{pid}/stream") as r:
        seen = [e for e in events(r)]
    assert seen[1]["event"] == "dropped" and seen[-1]["event"] == "done"


def test_destroying_the_session_kills_every_process(daemon):
    sid = create(daemon)
    pids = [start(daemon, sid, "sleep 300")["process_id"] for _ in range(3)]
    assert daemon.client.get(f"/v1/sessions/{sid}/stats").json()["pids"] >= 5   # runner, shell, 3 sleeps
    deadline = time.monotonic() + 10
    while len(sleeps := _host_processes_of(sid, b"sleep\x00300")) < 3:   # each `sh -c` has to exec first
        assert time.monotonic() < deadline, sleeps
        time.sleep(0.05)
    assert daemon.client.delete(f"/v1/sessions/{sid}").status_code == 200
    from sandkasten.runtime.procfs import proc_start_time
    assert [p for p, st in sleeps if proc_start_time(p) == st] == []
    for pid in pids:
        row = daemon.client.get(f"/v1/sessions/{sid}/processes/{pid}").json()
        assert row["status"] == "lost" and row["lost_reason"] == "session destroyed"
    r = daemon.client.post(f"/v1/sessions/{sid}/processes", json={"cmd": "true"})
    assert r.status_code == 410


def _host_processes_of(sid: str, cmdline: bytes) -> list[tuple[int, int]]:
    """(pid, start time) of host processes in the session's cgroup running `cmdline`."""
    from sandkasten.runtime.procfs import proc_start_time
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cgroup", "rb") as f:
                groups = f.read()
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if f"/{sid}".encode() in groups and cmd.rstrip(b"\x00") == cmdline:
            found.append((int(name), proc_start_time(int(name))))
    return found


def test_idempotency_key_starts_a_process_once(daemon):
    sid = create(daemon)
    first = start(daemon, sid, "echo once >> /workspace/count; sleep 30", headers={"Idempotency-Key": "k-1"})
    again = start(daemon, sid, "echo once >> /workspace/count; sleep 30", headers={"Idempotency-Key": "k-1"})
    assert again["process_id"] == first["process_id"]
    other = daemon.client.post(f"/v1/sessions/{sid}/processes", json={"cmd": "true"},
                               headers={"Idempotency-Key": "k-1"})
    assert other.status_code == 409
    time.sleep(0.3)
    r = daemon.client.post(f"/v1/sessions/{sid}/exec", json={"cmd": "cat /workspace/count"})
    assert r.json()["output"] == "once\n"


def test_record_input_false_keeps_size_and_hash_but_not_the_bytes(daemon_factory):
    daemon = daemon_factory(audit={"record_input": False}).start()
    sid = create(daemon)
    pid = start(daemon, sid, "cat")["process_id"]
    stdin(daemon, sid, pid, "secret password\n", eof=True)
    wait_status(daemon, sid, pid)
    typed = [e["payload"] for e in journal_events(daemon, sid) if e["type"] == "process.input"]
    assert typed[0]["kind"] == "stdin" and "data_base64" not in typed[0]
    assert typed[0]["sha256"] == hashlib.sha256(b"secret password\n").hexdigest()
    assert "secret" not in (daemon.data_dir / "sandkasten.db").read_bytes().decode("latin-1")


def test_python_client_drives_a_process(daemon):
    from sandkasten.client import Client, ProcessDone, ProcessExited

    with Client(daemon.url, api_key="test-key-123") as client, client.attach(create(daemon)) as sb:
        proc = sb.start_process("read line; echo got:$line; exit 2")
        assert sb.write_stdin(proc.process_id, "hello\n") == 6
        events_seen = list(sb.process_stream(proc.process_id))
        assert isinstance(events_seen[-1], ProcessDone) and events_seen[-1].exit_code == 2
        assert "".join(e.chunk for e in events_seen[:-1]) == "got:hello\n"
        with pytest.raises(ProcessExited):
            sb.write_stdin(proc.process_id, "late\n")
        assert sb.get_process(proc.process_id).exit_code == 2
        assert sb.process_output(proc.process_id).text == "got:hello\n"


def test_unauthenticated_process_routes_are_refused(daemon):
    sid = create(daemon)
    r = httpx.post(f"{daemon.url}/v1/sessions/{sid}/processes", json={"cmd": "true"})
    assert r.status_code == 401


# ------------------------------------------------------------------ the CLI: ps, logs, audit, attach
def test_cli_ps_logs_and_audit_show_processes_in_order_with_the_commands(daemon):
    sid = create(daemon)
    daemon.client.post(f"/v1/sessions/{sid}/exec", json={"cmd": "echo first"})
    pid = start(daemon, sid, "read a; echo typed:$a; sleep 30")["process_id"]
    stdin(daemon, sid, pid, "hello there\n")
    Output(daemon, sid, pid).until(b"typed:hello there")
    daemon.client.post(f"/v1/sessions/{sid}/exec", json={"cmd": "echo second"})
    ps = daemon.cli("ps", sid, "--processes")
    assert ps.returncode == 0, ps.stderr
    assert pid in ps.stdout and "running" in ps.stdout and "read a" in ps.stdout
    daemon.client.delete(f"/v1/sessions/{sid}/processes/{pid}")
    assert "no running processes" in daemon.cli("ps", sid).stdout
    ended = daemon.cli("ps", sid, "--all", "--json")
    [row] = json.loads(ended.stdout)
    assert row["process_id"] == pid and row["signal"] == "SIGKILL" and row["input_bytes"] == 12
    logs = daemon.cli("logs", sid).stdout
    order = [logs.index(s) for s in ("$ echo first", f"{pid} & read a", f"{pid} < 'hello there\\n'",
                                     "$ echo second", f"{pid} sent SIGKILL", f"{pid} ended (killed by SIGKILL")]
    assert order == sorted(order), logs
    assert "typed:hello there" in logs
    audit = [json.loads(line) for line in daemon.cli("audit", "export", "--session", sid).stdout.splitlines()]
    kinds = [(r["kind"], r["exec_id"] if r["kind"] != "exec" else r["cmd"]) for r in audit]
    assert kinds == [("exec", "echo first"), ("process", pid), ("input", pid), ("exec", "echo second"),
                     ("input", pid)]
    assert audit[2]["input"] == "hello there\n" and audit[1]["exit_code"] == "SIGKILL"
    assert daemon.cli("ps", "--processes").returncode == 2


def _attach(daemon, sid, pid, size=(24, 80)):
    """`sandkasten attach` on a pseudo-terminal of our own; (child pid, our end of its terminal)."""
    import fcntl
    import pty
    import struct
    import termios

    child, fd = pty.fork()
    if child == 0:
        os.execv(sys_executable(), [sys_executable(), "-m", "sandkasten.cli.main", "--config", str(daemon.config_path), "attach", sid, pid])
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", *size, 0, 0))
    return child, fd


def sys_executable() -> str:
    from tests.daemons import BIN
    return str(BIN / "python")


def _read_until(fd, needle: bytes, seen: bytearray, timeout=20.0) -> bytes:
    import select
    deadline = time.monotonic() + timeout
    while needle not in seen:
        assert time.monotonic() < deadline, f"{needle!r} not on the terminal: {bytes(seen[-1500:])!r}"
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                seen += os.read(fd, 65536)
            except OSError:
                break
    return bytes(seen)


def test_attach_is_a_real_terminal_with_resize_and_detach(daemon, python_image):
    import fcntl
    import struct
    import termios

    sid = create(daemon, image=python_image)
    daemon.client.post(f"/v1/sessions/{sid}/fs/write", json={"path": "screen.py", "text": FULL_SCREEN})
    pid = start(daemon, sid, "python3 -i -q", pty={"rows": 10, "cols": 40})["process_id"]
    child, fd = _attach(daemon, sid, pid, size=(30, 100))
    seen = bytearray()
    try:
        _read_until(fd, b">>> ", seen)
        assert wait_resized(daemon, sid, pid, {"rows": 30, "cols": 100})   # took our terminal's size
        os.write(fd, b"print(6 * 7)\r")
        _read_until(fd, b"42", seen)
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 120, 0, 0))   # SIGWINCH to attach
        assert wait_resized(daemon, sid, pid, {"rows": 50, "cols": 120})
        os.write(fd, b"import shutil; shutil.get_terminal_size()\r")
        _read_until(fd, b"columns=120, lines=50", seen)
        os.write(fd, b"\x1d")   # Ctrl-]: detach
        _, status = os.waitpid(child, 0)
        child = 0
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        if child:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
        os.close(fd)
    assert get(daemon, sid, pid)["status"] == "running"   # detached, not ended
    typed = [e["payload"] for e in journal_events(daemon, sid) if e["type"] == "process.input"
             and e["payload"]["kind"] == "stdin"]
    assert b"print(6 * 7)\r" in b"".join(base64.b64decode(t["data_base64"]) for t in typed)
    # attach again and end it: attach exits with the process's code
    child, fd = _attach(daemon, sid, pid)
    try:
        _read_until(fd, b"columns=120", bytearray())   # the replay of what it printed before
        os.write(fd, b"raise SystemExit(3)\r")
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 3
    finally:
        os.close(fd)


def wait_resized(daemon, sid, pid, size, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if get(daemon, sid, pid)["pty"] == size:
            return True
        time.sleep(0.05)
    return False


def test_attach_refuses_an_unknown_process_with_one_line(daemon):
    sid = create(daemon)
    r = daemon.cli("attach", sid, "p-000000000000")
    assert r.returncode == 1 and "unable to attach" in r.stderr and "Traceback" not in r.stderr


def test_stdin_retries_type_once_and_input_journaled_before_a_crash_still_arrives(daemon):
    import asyncio

    from sandkasten.domain import commands as c
    from sandkasten.store.journal import Journal

    sid = create(daemon)
    pid = start(daemon, sid, "cat")["process_id"]
    for _ in range(3):   # a client retrying the same write
        r = daemon.client.post(f"/v1/sessions/{sid}/processes/{pid}/stdin", json={"data": "once\n"},
                               headers={"Idempotency-Key": "w-1"})
        assert r.status_code == 200, r.text
    out = Output(daemon, sid, pid)
    out.until(b"once\n")
    daemon.kill()

    async def journal_only():   # what a daemon that died right after journaling leaves behind
        journal = await Journal.open(daemon.data_dir / "sandkasten.db")
        try:
            data = b"typed while the daemon died\n"
            await journal.execute(sid, c.RecordProcessInput(
                process_id=pid, kind="stdin", size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                data_base64=base64.b64encode(data).decode()), actor="test")
        finally:
            await journal.close()

    asyncio.run(journal_only())
    daemon.start()
    stdin(daemon, sid, pid, "after\n", eof=True)
    out.to_end()
    assert out.data == b"once\ntyped while the daemon died\nafter\n"


def test_async_client_drives_a_terminal(daemon, python_image):
    import asyncio

    from sandkasten.client import AsyncClient, ExecChunk, ProcessDone

    async def scenario():
        async with AsyncClient(daemon.url, api_key="test-key-123") as client:
            sid = (await client.create_session("python")).id
            proc = await client.start_process(sid, "python3 -i -q", pty=(24, 80))
            assert proc.pty == {"rows": 24, "cols": 80} and proc.running
            await client.write_stdin(sid, proc.process_id, "print(6 * 7)\n")
            await client.resize(sid, proc.process_id, 30, 100)
            await client.write_stdin(sid, proc.process_id, "raise SystemExit(4)\n")
            seen = [e async for e in client.process_stream(sid, proc.process_id)]
            assert isinstance(seen[-1], ProcessDone) and seen[-1].exit_code == 4
            assert "42" in "".join(e.chunk for e in seen if isinstance(e, ExecChunk))
            [ended] = await client.list_processes(sid, include_ended=True)
            assert ended.status == "exited" and ended.exit_code == 4
            await client.destroy_session(sid)

    asyncio.run(scenario())
