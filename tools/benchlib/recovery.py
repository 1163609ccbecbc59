"""Recovery: SIGKILL the daemon while N sessions live, start it again, time until /healthz
answers (interpreter + imports + app) and until /readyz is green (journal opened, every
sandbox observed and adopted). Baselines: a bare interpreter start and one that only imports
what the daemon imports.
"""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor

from benchlib import baselines
from benchlib.daemon import REPO, BenchDaemon
from benchlib.report import Report
from benchlib.samples import Summary

SECTION = "recovery"


def recovery(report: Report, d: BenchDaemon, sessions: int, rounds: int) -> None:
    def make(count: int) -> None:
        http = d.http()
        try:
            for _ in range(count):
                http.ok("POST", "/v1/sessions", {})
        finally:
            http.close()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(make, [sessions // 4 + (1 if i < sessions % 4 else 0) for i in range(4)]))
    restart(report, d, sessions, rounds, "recovery")
    bare, imports = baselines.python_start(REPO, max(3, rounds))
    report.add(SECTION, "python.bare", "baseline: python -c pass", bare)
    report.add(SECTION, "python.imports", "baseline: python importing the daemon's modules", imports)
    report.facts["import_breakdown_ms"] = dict(baselines.import_breakdown(REPO))


PHASES = (("imported_s", "imports done (serve() begins)"), ("serving_s", "app built, server starting"),
          ("journal_open_s", "journal open"), ("ready_s", "reconciled: /readyz green"))


def restart(report: Report, d: BenchDaemon, sessions: int, rounds: int, key: str, section: str = SECTION) -> None:
    """SIGKILL the daemon while `sessions` live, start it again: time to /healthz and /readyz
    (client side), and where the daemon says its time went (`startup` in /readyz, seconds since
    its process started) with the reconcile's own count."""
    healthy, ready, phases = [], [], {name: [] for name, _ in PHASES}
    detail: dict = {}
    for _ in range(rounds):
        d.kill(signal.SIGKILL)
        h, r = d.start()
        healthy.append(h * 1000)
        ready.append(r * 1000)
        http = d.http()
        try:
            detail = http.ok("GET", "/readyz").get("detail", {})
        finally:
            http.close()
        for name, _ in PHASES:
            if name in detail.get("startup", {}):
                phases[name].append(detail["startup"][name] * 1000)
    reconcile = detail.get("reconcile", {})
    report.add(section, f"{key}.ready", f"SIGKILL with {sessions} live sessions → /readyz", Summary.of(ready),
               note=f"adopted {reconcile.get('adopted')}")
    report.add(section, f"{key}.healthz", "  of which until /healthz answers", Summary.of(healthy))
    for name, label in PHASES:
        if phases[name]:
            report.add(section, f"{key}.phase.{name}", f"  daemon: {label}", Summary.of(phases[name]),
                       note="since its process started (10 ms ticks)")
    if "seconds" in reconcile:
        parts = ", ".join(f"{name} {reconcile[name] * 1000:.0f} ms" for name in ("observe_s", "adopt_s")
                          if name in reconcile)
        report.add(section, f"{key}.reconcile", "  daemon: the reconcile itself (last round)",
                   value=reconcile["seconds"] * 1000, note=f"observe + ping, adopt: {parts}" if parts else "")
