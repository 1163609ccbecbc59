"""Smoke test of tools/bench: a minimal selection runs, prints its table rows and exits 0,
and leaves no cgroup behind. Benchmarks are not tests: no timing is asserted here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="tools/bench needs root")


def test_bench_quick_exec_and_journal(tmp_path, host_tools):
    out_json = tmp_path / "bench.json"
    proc = subprocess.Popen([sys.executable, str(REPO / "tools" / "bench"), "--quick", "--only", "exec,journal",
                             "--json", str(out_json)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    for row in ("## exec round trip", "HTTP exec `:`", "runner socket exec `:`", "raw pipe to bash `:` (floor)",
                "local spawn of /bin/true", "HTTP GET /healthz", "## journal",
                "3 appends of one exec, durability normal", "floor: sqlite3 INSERT+COMMIT",
                "## ratios (medians)", "HTTP exec `:` / runner socket exec `:`",
                "## targets (issue 12)", "HTTP exec `:` median <= 1 ms"):
        assert row in stdout, f"missing {row!r} in:\n{stdout}"
    assert "cold create" not in stdout   # not selected
    assert out_json.exists()
    leftovers = [p for h in ("unified", "memory", "pids", "cpu")
                 for p in Path("/sys/fs/cgroup", h).glob(f"sandkasten-bench-{proc.pid}-*")]
    assert leftovers == []
