"""Density: N idle sandboxes at once — how long they take to start, what each one costs in
memory, and whether every one still answers (and how fast).

Memory per sandbox = PSS summed over all its processes (runner pid from
`run/<sid>/runner.pid`, the rest from the session's `cgroup.procs` in every hierarchy),
read from `/proc/<pid>/smaps_rollup`; next to it the cgroup's own usage (v1
`memory.usage_in_bytes`: also page cache and kernel memory charged to it), and the drop of
the host's MemAvailable divided by N (everything: page tables, overlay, sockets, cgroups).
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sandkasten.runtime.sandboxes import read_pidfile

from benchlib import recovery
from benchlib.daemon import BenchDaemon
from benchlib.execs import http_exec
from benchlib.report import Report
from benchlib.samples import Summary

SECTION = "density"


def pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def mem_available_kb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1])
    return 0


def limits_note(n: int) -> str:
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    import resource
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return f"pid_max {pid_max}, ulimit -n {nofile}, ~{2 * n + 10} pids needed"


def density(report: Report, d: BenchDaemon, n: int, creators: int = 4) -> None:
    label = f"{n} idle sandboxes"
    before = mem_available_kb()
    sids: list[str] = []
    lock = threading.Lock()
    failures: list[str] = []

    def make(count: int) -> None:
        http = d.http()
        try:
            for _ in range(count):
                status, reply = http.call("POST", "/v1/sessions", {})
                with lock:
                    if status == 201:
                        sids.append(reply["id"])
                    else:
                        failures.append(f"HTTP {status} {reply.get('error_code')}: {reply.get('message')}")
                if failures and len(failures) > 20:
                    return
        finally:
            http.close()

    t0 = time.perf_counter()
    share = [n // creators + (1 if i < n % creators else 0) for i in range(creators)]
    with ThreadPoolExecutor(creators) as pool:
        list(pool.map(make, share))
    elapsed = time.perf_counter() - t0
    report.add(SECTION, f"density.{n}.started", f"{label}: started", value=len(sids), unit="sandboxes",
               note=f"{elapsed:.1f} s with {creators} concurrent creators"
                    + (f"; {len(failures)} failed, first: {failures[0]}" if failures else ""))
    report.add(SECTION, f"density.{n}.create_rate", f"{label}: creates per second", value=len(sids) / elapsed,
               unit="creates/s")
    time.sleep(1.0)  # let pages settle (lazy frees, page cache of the first execs)
    cg = d.cgroups()
    pss, usage, procs = [], [], []
    for sid in sids:
        runner, _ = read_pidfile(d.data / "run" / sid / "runner.pid")
        pids = set(cg.pids(sid)) | ({runner} if runner else set())
        procs.append(len(pids))
        pss.append(sum(pss_kb(p) for p in pids) / 1024)
        usage.append(cg.stats(sid).memory_bytes / 1048576)
    after = mem_available_kb()
    if sids:
        report.add(SECTION, f"density.{n}.pss", f"{label}: PSS per sandbox (all its processes)",
                   Summary.of(pss), unit="MB", note=f"{statistics.median(procs):.0f} processes each")
        report.add(SECTION, f"density.{n}.cgroup", f"{label}: cgroup memory usage per sandbox",
                   Summary.of(usage), unit="MB")
        report.add(SECTION, f"density.{n}.host", f"{label}: host MemAvailable drop / N",
                   value=(before - after) / 1024 / len(sids), unit="MB")
        daemon_pid = d.pid()
        if daemon_pid:
            report.add(SECTION, f"density.{n}.daemon", f"{label}: daemon PSS", value=pss_kb(daemon_pid) / 1024,
                       unit="MB")
    # every one still answering?
    http = d.http()
    lat, dead = [], []
    try:
        for sid in sids:
            t = time.perf_counter()
            try:
                http_exec(http, sid, ":")
                lat.append((time.perf_counter() - t) * 1000)
            except Exception as e:  # noqa: BLE001 - counted
                dead.append(f"{sid}: {e}")
    finally:
        http.close()
    report.add(SECTION, f"density.{n}.answering", f"{label}: answering an exec", value=len(lat),
               unit=f"of {n}", note=f"first failure: {dead[0][:120]}" if dead else "")
    if lat:
        report.add(SECTION, f"density.{n}.exec", f"{label}: HTTP exec `:` across all", Summary.of(lat))
    report.facts[f"density.{n}.limits"] = limits_note(n)
    if sids:
        runner, _ = read_pidfile(d.data / "run" / sids[len(sids) // 2] / "runner.pid")
        for mapping, kb in dirty_by_mapping(runner)[:6] if runner else []:
            report.add(SECTION, f"density.{n}.dirty.{mapping}", f"  one runner's private dirty: {mapping}",
                       value=kb / 1024, unit="MB", note="after its first exec (smaps)")
    # every one of them live while the daemon is SIGKILLed and starts again
    recovery.restart(report, d, len(sids), 1, f"density.{n}.recovery", SECTION)


def dirty_by_mapping(pid: int) -> list[tuple[str, int]]:
    """Private_Dirty kB of a process by mapping (file name, [heap], [anon], ...), largest
    first: what a runner wrote after it was forked from the zygote."""
    found: dict[str, int] = {}
    name = "?"
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                parts = line.split()
                if parts and "-" in parts[0] and not parts[0].endswith(":"):
                    name = os.path.basename(parts[5]) if len(parts) > 5 else "[anon]"
                elif parts and parts[0] == "Private_Dirty:":
                    found[name] = found.get(name, 0) + int(parts[1])
    except (OSError, ValueError, IndexError):
        return []
    return sorted(((k, v) for k, v in found.items() if v), key=lambda kv: -kv[1])


def host_free_note() -> str:
    return f"MemAvailable {mem_available_kb() / 1048576:.1f} GB, {os.cpu_count()} cores"
