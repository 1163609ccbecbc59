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
    healthy, ready = [], []
    for _ in range(rounds):
        d.kill(signal.SIGKILL)
        h, r = d.start()
        healthy.append(h * 1000)
        ready.append(r * 1000)
    adopted = d.http().ok("GET", "/readyz").get("detail", {}).get("reconcile", {}).get("adopted")
    report.add(SECTION, "recovery.ready", f"SIGKILL with {sessions} live sessions → /readyz", Summary.of(ready),
               note=f"adopted {adopted}")
    report.add(SECTION, "recovery.healthz", "  of which until /healthz answers", Summary.of(healthy))
    bare, imports = baselines.python_start(REPO, max(3, rounds))
    report.add(SECTION, "python.bare", "baseline: python -c pass", bare)
    report.add(SECTION, "python.imports", "baseline: python importing the daemon's modules", imports)
    report.facts["import_breakdown_ms"] = dict(baselines.import_breakdown(REPO))
