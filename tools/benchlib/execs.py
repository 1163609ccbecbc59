"""Running commands: the round trip of one exec (HTTP, the runner socket, a bash pipe,
a spawn of /bin/true), throughput across concurrent sessions, and streaming latency.

Who runs this: the bench process. HTTP goes through one keep-alive connection per client
thread; the runner socket is called directly with `runtime.client.call` (one connection per
request), with exec ids the daemon never sees, sent as the daemon sends a new exec (`fresh`).
"""

from __future__ import annotations

import http.client
import itertools
import json
import resource
import threading
import time

from sandkasten.runtime import client

from benchlib import baselines
from benchlib.daemon import API_KEY, BenchDaemon, Http
from benchlib.report import Report
from benchlib.samples import Summary, time_ms

_ids = itertools.count()
RTT = "exec round trip"
THROUGHPUT = "throughput (execs/s, `:` per session in a loop)"
STREAM = "streaming (SSE)"


def http_exec(http: Http, sid: str, cmd: str) -> dict:
    reply = http.ok("POST", f"/v1/sessions/{sid}/exec", {"cmd": cmd})
    if reply.get("exit_code") != 0:
        raise RuntimeError(f"exec {cmd!r} in {sid}: {reply}")
    return reply


def socket_exec(d: BenchDaemon, sid: str, cmd: str) -> dict:
    reply = client.call(d.socket_of(sid), {"op": "exec", "id": f"bench{next(_ids)}", "cmd": cmd,
                                           "timeout_ms": 10_000, "wait": True, "fresh": True})
    if not reply.get("ok") or reply.get("exit_code") != 0:
        raise RuntimeError(f"runner exec {cmd!r} in {sid}: {reply}")
    return reply


def round_trips(report: Report, d: BenchDaemon, n: int) -> None:
    http = d.http()
    bash = baselines.BashPipe()
    try:
        sid = http.ok("POST", "/v1/sessions", {})["id"]
        for cmd in (":", "echo hello"):
            report.add(RTT, f"exec.http.{cmd}", f"HTTP exec `{cmd}`",
                       time_ms(lambda cmd=cmd: http_exec(http, sid, cmd), n, warmup=10))
            report.add(RTT, f"exec.socket.{cmd}", f"runner socket exec `{cmd}`",
                       time_ms(lambda cmd=cmd: socket_exec(d, sid, cmd), n, warmup=10))
            report.add(RTT, f"exec.bash.{cmd}", f"raw pipe to bash `{cmd}` (floor)",
                       time_ms(lambda cmd=cmd: bash.run(cmd), n, warmup=10))
        report.add(RTT, "spawn.true", "local spawn of /bin/true", baselines.spawn_true(n))
        report.add(RTT, "wake.busy", "baseline: pipe ping-pong, two processes, back to back",
                   baselines.ping_pong(n, idle_s=0))
        report.add(RTT, "wake.idle", "baseline: pipe ping-pong after 20 ms idle (wake-up of a sleeping process)",
                   baselines.ping_pong(max(20, n // 5), idle_s=0.02))
        report.add(RTT, "http.healthz", "HTTP GET /healthz (no journal, no sandbox)",
                   time_ms(lambda: http.ok("GET", "/healthz"), n, warmup=10))
        http.ok("DELETE", f"/v1/sessions/{sid}")
    finally:
        bash.close()
        http.close()


def throughput(report: Report, d: BenchDaemon, widths: list[int], seconds: float) -> None:
    """Each of `w` threads owns one session and loops `:` for `seconds`; execs/s overall.
    The same over the runner sockets gives the ceiling without daemon and journal."""
    http = d.http()
    try:
        sids = [http.ok("POST", "/v1/sessions", {})["id"] for _ in range(max(widths))]
        for w in widths:
            for via in ("http", "socket"):
                rate, cpu = _loop(d, sids[:w], via, seconds)
                label = f"{w:>2} sessions, {'HTTP' if via == 'http' else 'runner socket'}"
                report.add(THROUGHPUT, f"throughput.{via}.{w}", label, value=rate, unit="execs/s",
                           note=f"bench client used {cpu:.0%} of a core")
        for sid in sids:
            http.ok("DELETE", f"/v1/sessions/{sid}")
    finally:
        http.close()


def _loop(d: BenchDaemon, sids: list[str], via: str, seconds: float) -> tuple[float, float]:
    counts = [0] * len(sids)
    errors: list[str] = []
    stop = time.perf_counter() + seconds

    def work(i: int, sid: str) -> None:
        http = d.http() if via == "http" else None
        try:
            while time.perf_counter() < stop:
                if http is not None:
                    http_exec(http, sid, ":")
                else:
                    socket_exec(d, sid, ":")
                counts[i] += 1
        except Exception as e:  # noqa: BLE001 - reported after the run
            errors.append(str(e))
        finally:
            if http is not None:
                http.close()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=work, args=(i, sid)) for i, sid in enumerate(sids)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    if errors:
        raise RuntimeError(f"throughput ({via}, {len(sids)} sessions): {errors[0]}")
    used = (cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime) / elapsed
    return sum(counts) / elapsed, used


# ------------------------------------------------------------------------------ streaming
def streaming(report: Report, d: BenchDaemon, n: int) -> None:
    """Two numbers per chunk: from the runner reading the bytes off the shell's pipe (the
    frame's `timestamp`, UNIX time, taken within microseconds of the write) to the SSE chunk
    parsed at the client; and from sending the POST to the first chunk of `echo hello`."""
    http = d.http()
    try:
        sid = http.ok("POST", "/v1/sessions", {})["id"]
        first = _sse(d.port, sid, "echo hello")
        if first is None:
            report.na(STREAM, "stream.first", "POST exec/stream → first chunk (`echo hello`)")
            report.na(STREAM, "stream.idle", "byte written → SSE chunk, after 50 ms idle")
            return
        firsts, lag_first, lag_idle, ends = [], [], [], []
        for _ in range(n):
            chunks, t_post, t_done = _sse(d.port, sid, "echo hello")
            firsts.append((chunks[0][1] - t_post) * 1000)
            lag_first.append((chunks[0][2] - chunks[0][0]) * 1000)
            ends.append((t_done - chunks[-1][1]) * 1000)
        per_exec = 20
        for _ in range(max(1, n // per_exec)):
            loop = f"for i in $(seq {per_exec}); do sleep 0.05; echo x$i; done"
            chunks, _, _ = _sse(d.port, sid, loop)
            lag_idle += [(wall - ts) * 1000 for ts, _, wall in chunks]
        report.add(STREAM, "stream.first", "POST exec/stream → first chunk (`echo hello`)", Summary.of(firsts))
        report.add(STREAM, "stream.write", "  byte written → SSE chunk (first output)", Summary.of(lag_first))
        report.add(STREAM, "stream.idle", "byte written → SSE chunk, after 50 ms idle", Summary.of(lag_idle))
        report.add(STREAM, "stream.end", "last chunk → `done` event (`echo hello` ends right after)",
                   Summary.of(ends))
        http.ok("DELETE", f"/v1/sessions/{sid}")
    finally:
        http.close()


def _sse(port: int, sid: str, cmd: str):
    """Run `cmd` through the SSE endpoint; ([(frame ts, perf_counter, wall clock) per chunk],
    perf_counter at the POST, perf_counter at the `done` event), or None when the endpoint
    does not exist."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        t_post = time.perf_counter()
        conn.request("POST", f"/v1/sessions/{sid}/exec/stream", body=json.dumps({"cmd": cmd}),
                     headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json",
                              "Accept": "text/event-stream"})
        r = conn.getresponse()
        if r.status in (404, 405):
            return None
        if r.status != 200:
            raise RuntimeError(f"exec/stream: HTTP {r.status} {r.read()[:300]!r}")
        chunks, kind = [], ""
        while True:
            line = r.readline()
            if not line:
                break
            if line.startswith(b"event:"):
                kind = line[6:].strip().decode()
            elif line.startswith(b"data:") and kind == "chunk":
                now, wall = time.perf_counter(), time.time()
                chunks.append((json.loads(line[5:])["timestamp"], now, wall))
            elif line.startswith(b"data:") and kind in ("done", "error"):
                if kind == "error":
                    raise RuntimeError(f"exec/stream error: {line[5:300]!r}")
                return chunks, t_post, time.perf_counter()
        return chunks, t_post, time.perf_counter()
    finally:
        conn.close()
