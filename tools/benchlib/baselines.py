"""The physical limits Sandkasten is measured against, taken in the same run: spawning
`/bin/true` (plain, in `unshare`, in `bwrap --unshare-all`), a round trip through a pipe to
a persistent bash, a Python interpreter importing the daemon, and SQLite committing a row.

Who runs this: the bench process, as root. Processes are started with `os.posix_spawn`
(vfork + exec) — the cheapest way from Python — and every baseline uses the same method.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from benchlib.samples import Summary, time_ms

TRUE = shutil.which("true") or "/bin/true"


def spawn_and_wait(argv: list[str]) -> None:
    pid = os.posix_spawn(argv[0], argv, os.environ)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with status {os.waitstatus_to_exitcode(status)}")


def ensure_bwrap() -> str | None:
    """bwrap's path, installing Debian's bubblewrap if it is missing (root, apt-get)."""
    found = shutil.which("bwrap")
    if found:
        return found
    print("bench: installing bubblewrap (apt-get) for the bwrap baseline", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "install", "-y", "-q", "bubblewrap"], ["apt-get", "update", "-q"],
                 ["apt-get", "install", "-y", "-q", "bubblewrap"]):
        r = subprocess.run(argv, env=env, capture_output=True)
        if argv[1] == "install" and r.returncode == 0:
            break
    return shutil.which("bwrap")


def bwrap_argv(bwrap: str) -> list[str]:
    return [bwrap, "--unshare-all", "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev",
            "--tmpfs", "/tmp", TRUE]


def unshare_argv() -> list[str]:
    return [shutil.which("unshare") or "/usr/bin/unshare", "-m", "-p", "-f", "-u", "-i", "-n",
            "--mount-proc", TRUE]


def spawn_true(n: int) -> Summary:
    return time_ms(lambda: spawn_and_wait([TRUE]), n)


def spawn(argv: list[str], n: int) -> Summary:
    return time_ms(lambda: spawn_and_wait(argv), n)


class BashPipe:
    """A persistent bash on two pipes: write a command and a marker line, read until the
    marker. The floor for "a command round trip to a shell that keeps state"."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(["bash", "--norc", "--noprofile"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, bufsize=0)
        self.fin, self.fout = self.proc.stdin.fileno(), self.proc.stdout.fileno()

    def run(self, cmd: str) -> bytes:
        os.write(self.fin, cmd.encode() + b"; echo __sk_done $?\n")
        buf = b""
        while not buf.endswith(b"__sk_done 0\n"):
            chunk = os.read(self.fout, 65536)
            if not chunk:
                raise RuntimeError("bash went away")
            buf += chunk
        return buf

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=5)
        self.proc.stdout.close()


def python_start(repo: Path, n: int) -> tuple[Summary, Summary]:
    """A bare interpreter start, and one importing what the daemon imports before serving."""
    py = str(repo / ".venv/bin/python")
    bare = time_ms(lambda: spawn_and_wait([py, "-c", "pass"]), n, warmup=1)
    imports = "import sandkasten.daemon, sandkasten.api.app, sandkasten.store.journal, sanic"
    daemon = time_ms(lambda: spawn_and_wait([py, "-c", imports]), n, warmup=1)
    return bare, daemon


def import_breakdown(repo: Path, top: int = 10) -> list[tuple[str, float]]:
    """Import time of what the daemon imports, by top-level package (sum of the modules'
    own times from `python -X importtime`), in ms, largest first."""
    r = subprocess.run([str(repo / ".venv/bin/python"), "-X", "importtime", "-c",
                        "import sandkasten.daemon, sandkasten.api.app"], capture_output=True, text=True,
                       cwd=repo)
    totals: dict[str, float] = {}
    for line in r.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        own, _, name = line[len("import time:"):].split("|")
        try:
            us = int(own.strip())
        except ValueError:
            continue   # the header line
        pkg = name.strip().split(".")[0]
        totals[pkg] = totals.get(pkg, 0) + us / 1000
    return sorted(((k, round(v, 1)) for k, v in totals.items()), key=lambda kv: -kv[1])[:top]


def sqlite_commit(db: Path, sync: str, n: int) -> Summary:
    """One INSERT + COMMIT in WAL mode with `synchronous=sync`: the floor of a journal append."""
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={sync}")
    conn.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, payload TEXT)")
    payload = "x" * 300

    def one() -> None:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO t (payload) VALUES (?)", (payload,))
        conn.execute("COMMIT")
    try:
        return time_ms(one, n)
    finally:
        conn.close()




def ping_pong(n: int, idle_s: float) -> Summary:
    """One byte to another process over a pipe and one back, the floor of every hop between
    processes (daemon → runner → shell → runner → daemon is four of them); with `idle_s` both
    sleep that long first, as a sandbox does between a client's commands."""
    echo = "import os\nwhile (b := os.read(0, 1)):\n    os.write(1, b)\n"
    proc = subprocess.Popen([sys.executable, "-c", echo], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
    try:
        out, back = proc.stdin.fileno(), proc.stdout.fileno()
        values = []
        for i in range(n + 5):
            if idle_s:
                time.sleep(idle_s)
            t = time.perf_counter()
            os.write(out, b"x")
            os.read(back, 1)
            if i >= 5:
                values.append((time.perf_counter() - t) * 1000)
        return Summary.of(values)
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)
        proc.stdout.close()
