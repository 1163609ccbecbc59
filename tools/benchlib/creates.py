"""Creating sandboxes: cold (through the HTTP API, and straight through the runtime with no
daemon), from the pre-warmed pool, and with bridge networking.

"Cold create" = `POST /v1/sessions` until the shell has answered its first command
(`POST …/exec {"cmd": ":"}`), measured at the client. Sessions are deleted between
samples (not timed), so every sample starts from the same number of live sandboxes.
"""

from __future__ import annotations

import itertools
import time

from sandkasten.runtime import client

from benchlib.daemon import BenchDaemon, Http
from benchlib.report import Report
from benchlib.samples import Summary

_ids = itertools.count()
SECTION = "create (to the first answered command)"


def create_and_answer(http: Http, body: dict) -> tuple[float, float, dict]:
    """(ms until POST returned, ms until the first command answered, session)."""
    t0 = time.perf_counter()
    session = http.ok("POST", "/v1/sessions", body)
    t1 = time.perf_counter()
    reply = http.ok("POST", f"/v1/sessions/{session['id']}/exec", {"cmd": ":"})
    t2 = time.perf_counter()
    if reply.get("exit_code") != 0:
        raise RuntimeError(f"first command in {session['id']} failed: {reply}")
    return (t1 - t0) * 1000, (t2 - t0) * 1000, session


def cold(report: Report, d: BenchDaemon, n: int) -> None:
    http = d.http()
    try:
        posts, answered = [], []
        for i in range(n + 2):
            post, total, s = create_and_answer(http, {})
            http.ok("DELETE", f"/v1/sessions/{s['id']}")
            if i >= 2:  # warm-up: first spawner/zygote use, page cache
                posts.append(post)
                answered.append(total)
        report.add(SECTION, "create.cold", "cold create, HTTP (POST + first exec)", Summary.of(answered))
        report.add(SECTION, "create.cold.post", "  of which POST /v1/sessions", Summary.of(posts))
    finally:
        http.close()


STEPS = "create: the spawner's steps (ms each, median; from the zygote's and its children's clock)"


def runtime_direct(report: Report, rt, n: int) -> None:
    """The same work without the daemon: Runtime.create (zygote fork, namespaces, overlay,
    pivot_root, cgroup) and one exec on the runner socket; and, from the spawner's report of
    each create (`steps`), how long each step took."""
    values, creates, steps = [], [], {}
    for i in range(n + 2):
        time.sleep(0.05)   # as between two clients' creates: the spawner makes its spare meanwhile
        sid = (rt.reserve_id() if hasattr(rt, "reserve_id") else None) or f"s-bench-rt-{i}"   # (spares: newer runtimes)
        t0 = time.perf_counter()
        rt.create(rt.spec(sid, "base"))
        t1 = time.perf_counter()
        client.call(rt.paths(sid).socket, {"op": "exec", "id": f"b{next(_ids)}", "cmd": ":",
                                          "timeout_ms": 10_000, "wait": True, "fresh": True})
        elapsed = (time.perf_counter() - t0) * 1000
        rt.destroy(sid)
        if i >= 2:
            values.append(elapsed)
            creates.append((t1 - t0) * 1000)
            before = 0.0
            for name, at in getattr(rt, "last_steps", ()):   # (the spawner's report: newer runtimes)
                steps.setdefault(name, []).append(at - before)
                before = at
    report.add(SECTION, "create.runtime", "create via Runtime (no daemon) + first exec", Summary.of(values))
    report.add(SECTION, "create.runtime.create", "  of which Runtime.create", Summary.of(creates))
    for name, took in steps.items():
        report.add(STEPS, f"create.step.{name}", f"  {name}", Summary.of(took))


def pooled(report: Report, d: BenchDaemon, n: int, refill_s: float = 0.3) -> None:
    """Needs a daemon started with `pool: {enabled: true, images: {base: K}}`. Samples whose
    response does not say `"pooled": true` are counted as misses, not as pooled creates."""
    http = d.http()
    try:
        time.sleep(1.0)  # let the pool fill after /readyz
        values, posts, misses = [], [], 0
        for i in range(n):
            post, total, s = create_and_answer(http, {})
            http.ok("DELETE", f"/v1/sessions/{s['id']}")
            if not s.get("pooled"):
                misses += 1
                if i == 0:
                    report.na(SECTION, "create.pooled", "pooled create, HTTP (POST + first exec)",
                              "n/a (not available: create responses do not say pooled: true)")
                    return
                continue
            values.append(total)
            posts.append(post)
            time.sleep(refill_s)
        if not values:
            report.na(SECTION, "create.pooled", "pooled create, HTTP (POST + first exec)",
                      f"n/a (all {misses} creates missed the pool)")
            return
        report.add(SECTION, "create.pooled", "pooled create, HTTP (POST + first exec)", Summary.of(values),
                   note=f"{misses} pool misses" if misses else "")
        report.add(SECTION, "create.pooled.post", "  of which POST /v1/sessions", Summary.of(posts))
    finally:
        http.close()


def bridge(report: Report, d: BenchDaemon, n: int) -> None:
    http = d.http()
    try:
        status, reply = http.call("POST", "/v1/sessions", {"network_mode": "bridge"})
        if status >= 300:
            report.na(SECTION, "create.bridge", "cold create, bridge network",
                      f"n/a (not available: HTTP {status} {reply.get('error_code', '')})")
            return
        http.ok("DELETE", f"/v1/sessions/{reply['id']}")
        values = []
        for _ in range(n):
            _, total, s = create_and_answer(http, {"network_mode": "bridge"})
            http.ok("DELETE", f"/v1/sessions/{s['id']}")
            values.append(total)
        report.add(SECTION, "create.bridge", "cold create, bridge network", Summary.of(values))
    finally:
        http.close()

