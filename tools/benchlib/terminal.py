"""Terminals: keystroke → echo latency through the process API, next to a local PTY echo.

Who runs this: the bench process. In the sandbox, `cat` runs on a PTY (processes API, cooked
mode: the terminal's line discipline echoes each key). One connection follows its SSE stream,
another POSTs each key to …/stdin (journaled as a process.input event, then written to the
PTY by the runner); the time is from sending the POST to parsing the SSE chunk that carries the
echo. The baseline is the same echo on a PTY of this host: write a key to the master, read it
back — the floor any remote terminal adds its costs to. Keys are typed 20 ms apart, as a person
types (so every key meets an idle stream).
"""

from __future__ import annotations

import http.client
import json
import os
import select
import subprocess
import time

from benchlib.daemon import API_KEY, BenchDaemon
from benchlib.report import Report
from benchlib.samples import Summary

SECTION = "terminal (process PTY)"
GAP_S = 0.02


def local_pty_echo(n: int) -> Summary:
    master, slave = os.openpty()
    proc = subprocess.Popen(["cat"], stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    try:
        times = []
        for i in range(n + 5):
            key = b"abcdefghij"[i % 10:i % 10 + 1]
            t0 = time.perf_counter()
            os.write(master, key)
            seen = b""
            while key not in seen:
                select.select([master], [], [], 5)
                seen += os.read(master, 1024)
            if i >= 5:
                times.append((time.perf_counter() - t0) * 1000)
            time.sleep(GAP_S)
        return Summary.of(times)
    finally:
        proc.kill()
        proc.wait()
        os.close(master)


def keystroke_echo(report: Report, d: BenchDaemon, n: int) -> None:
    report.add(SECTION, "terminal.local", "baseline: key → echo on a local PTY (`cat`)", local_pty_echo(n))
    http = d.http()
    try:
        sid = http.ok("POST", "/v1/sessions", {})["id"]
        pid = http.ok("POST", f"/v1/sessions/{sid}/processes", {"cmd": "cat", "pty": {"rows": 24, "cols": 80}})[
            "process_id"]
        stream = http_stream(d.port, f"/v1/sessions/{sid}/processes/{pid}/stream")
        times = []
        for i in range(n + 5):
            key = "abcdefghij"[i % 10]
            t0 = time.perf_counter()
            http.ok("POST", f"/v1/sessions/{sid}/processes/{pid}/stdin", {"data": key})
            while key not in next_chunk(stream):
                pass
            if i >= 5:
                times.append((time.perf_counter() - t0) * 1000)
            time.sleep(GAP_S)
        stream.close()
        report.add(SECTION, "terminal.http", "key → echo: POST …/stdin to the SSE chunk of the echo",
                   Summary.of(times))
        http.ok("DELETE", f"/v1/sessions/{sid}")
    finally:
        http.close()


def http_stream(port: int, path: str) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", path, headers={"Authorization": f"Bearer {API_KEY}", "Accept": "text/event-stream"})
    r = conn.getresponse()
    if r.status != 200:
        raise RuntimeError(f"GET {path}: HTTP {r.status} {r.read()[:300]!r}")
    return r


def next_chunk(r: http.client.HTTPResponse) -> str:
    """The text of the next `chunk` event (skipping others)."""
    kind = ""
    while True:
        line = r.readline()
        if not line:
            raise RuntimeError("the process stream ended")
        if line.startswith(b"event:"):
            kind = line[6:].strip().decode()
        elif line.startswith(b"data:") and kind == "chunk":
            return json.loads(line[5:])["chunk"]
