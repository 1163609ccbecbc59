"""Profiles of the daemon while a benchmark runs (`tools/bench --profile DIR`): py-spy
samples the live daemon from outside (no code change, no restart), writes collapsed stacks,
and this module boils them down to what dominates: CPU by package of the innermost frame,
and the heaviest functions inclusive of what they call.

Who runs this: the bench process, as root (py-spy reads the daemon's memory via ptrace).
py-spy comes from the venv (`uv pip install py-spy`); without it profiles are skipped.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

from benchlib.daemon import REPO

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]+)(?::\d+)?\)$")


def py_spy() -> str | None:
    venv = REPO / ".venv/bin/py-spy"
    return str(venv) if venv.exists() else shutil.which("py-spy")


class Recording:
    """py-spy attached to a running pid for the duration of a `with` block."""

    def __init__(self, pid: int, out: Path, rate: int = 500, idle: bool = False):
        self.out = out
        tool = py_spy()
        if tool is None:
            raise RuntimeError("py-spy is not installed (.venv/bin/uv pip install --python .venv/bin/python py-spy)")
        argv = [tool, "record", "--pid", str(pid), "--format", "raw", "--output", str(out), "--rate", str(rate),
                "--nonblocking", "--threads"]
        if idle:
            argv.append("--idle")
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.5)  # attach

    def __enter__(self) -> Recording:
        return self

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stderr.close()


def launch_prefix(out: Path, rate: int = 1000) -> list[str]:
    """Argv prefix that starts a program under py-spy from its first instruction."""
    tool = py_spy()
    if tool is None:
        raise RuntimeError("py-spy is not installed")
    return [tool, "record", "--format", "raw", "--output", str(out), "--rate", str(rate), "--threads", "--"]


WRAPPERS = ("threading.py", "concurrent/futures/thread.py", "sandkasten/cli/main.py", "sanic/mixins/",
            "sanic/worker/", "sanic/server/runners.py", "asyncio/events.py", "asyncio/base_events.py",
            "<frozen importlib", "runpy.py")


def package_of(path: str) -> str:
    """`sandkasten/store/journal.py` stays a module path; libraries become their top package."""
    path = path.split("site-packages/", 1)[-1]
    if path.startswith(("sandkasten/", "runner/")):
        return path
    m = re.search(r"/lib/python3\.\d+/(.+)", path)
    if m:
        path = m.group(1)
    return path.split("/", 1)[0].removesuffix(".py")


def summarize(raw: Path, top: int = 12) -> str:
    """CPU samples by thread, by package of the innermost frame, and the heaviest functions
    (inclusive, wrappers such as thread bootstraps and the server loop left out)."""
    if not raw.exists():
        return f"(no profile written to {raw})"
    threads, leaf_pkg, inclusive = Counter(), Counter(), Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        try:
            n = int(count)
        except ValueError:
            continue
        frames = stack.split(";")
        thread = "?"
        if frames and frames[0].startswith(("thread (", "process (")):
            thread = frames.pop(0).split(": ", 1)[-1]
            thread = re.sub(r"_\d+$|-\d+", "", thread)   # journal-writer_0, Thread-3 (...) → one name
        total += n
        threads[thread] += n
        if frames:
            m = _FRAME.match(frames[-1])
            leaf_pkg[package_of(m.group("file")) if m else frames[-1]] += n
        seen = set()
        for f in frames:
            m = _FRAME.match(f)
            if m is None or any(w in m.group("file") for w in WRAPPERS) or m.group("func") == "<module>":
                continue
            key = f"{m.group('func')} ({m.group('file')})"
            if key not in seen:
                seen.add(key)
                inclusive[key] += n
    if not total:
        return "(empty profile)"
    out = [f"{total} samples"]
    out.append("by thread: " + ", ".join(f"{t} {c / total:.0%}" for t, c in threads.most_common(6)))
    out.append("innermost frame by package:")
    out += [f"  {c / total:6.1%}  {p}" for p, c in leaf_pkg.most_common(top)]
    out.append("heaviest functions (inclusive):")
    out += [f"  {c / total:6.1%}  {f}" for f, c in inclusive.most_common(top)]
    return "\n".join(out)
