"""Kernel facts read from /proc: a process's start time (which, with its pid, names a
process uniquely — a reused pid has another start time) and the mounts below a path. One
place for both, so the runtime, the reconciler, the image store and the tools agree."""

from __future__ import annotations

import re
from pathlib import Path


def proc_start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (clock ticks after boot); None if there is no such process
    or it has exited and waits to be reaped (a zombie: a runner orphaned by a daemon crash has
    a parent that may never reap it, and it must still count as dead)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return None if fields[0] in (b"Z", b"X") else int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def unescape(field: str) -> str:
    """A mountinfo field with its octal escapes (`\\040` for a space) decoded."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts_under(root: Path) -> list[str]:
    """Mount points at or below `root` in *our* mount namespace, deepest first."""
    prefix = str(root).rstrip("/")
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = unescape(line.split(" ")[4])
            if mp == prefix or mp.startswith(prefix + "/"):
                found.append(mp)
    return sorted(found, key=len, reverse=True)
