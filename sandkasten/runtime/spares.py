"""Spare sandboxes-to-be: the slow half of a create done before anybody asks.

Who runs this: the spawner (zygote), between requests. Joining a process to a cgroup waits
for an RCU grace period on the host kernel (cgroup_threadgroup_rwsem: 5-20 ms here, more than
everything else a create does), and a fork of the zygote costs another millisecond or more.
So the zygote keeps SPARES ready: for each, cgroups made under a session id picked in advance,
a child A that joined them, unshared the namespaces and forked the sandbox's PID 1, which now
waits on a pipe (its mount namespace is made when the spec comes: the create mounts the
sandbox's own disk on the host first, and PID 1 must see it). A create for that session id
(the daemon takes the ids from the markers, see Runtime.reserve_id) only rewrites the limits
if they differ and hands PID 1 the spec: it runs the setup steps as usual. Any other id, or
bridge networking, takes the ordinary path.

On disk: `run/.spares/<sid>` holds the spare's pid and start time, so the daemon can find the
ids and no sweep or doctor mistakes a spare's cgroups for an orphan while its process lives.
A spare leaves when its pipe ends (the zygote exited or was killed: no other process keeps a
copy of it), or is killed with its cgroup; what it leaves (cgroups, marker) has no session in
the journal and is swept like any orphan.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sandkasten.runtime import cgroups as cgroups_mod
from sandkasten.runtime.procfs import proc_start_time

SPARES = 2
PLACEHOLDER = cgroups_mod.Limits(mem_bytes=256 * 1024 * 1024, pids=64, cpu=1.0)   # until the spec's own
PID_TIMEOUT = 10.0


@dataclass
class Spare:
    sid: str
    pid: int
    cmd_w: int       # the spec goes here, one line of JSON
    ready_r: int     # A's `pid N` line, then B's report, as on the ordinary path
    limits: cgroups_mod.Limits   # what its cgroups say now
    start_time: int | None = None


class Spares:
    def __init__(self, cgroups: cgroups_mod.Cgroups, directory: Path | None, libc) -> None:
        self.cgroups, self.directory, self.libc = cgroups, directory, libc
        self.ready: dict[str, Spare] = {}
        self.limits = PLACEHOLDER   # a new spare gets the last create's limits: most creates ask the same

    def fill(self, wait: Callable[[list[str], int, int], None]) -> None:
        """Make spares until there are SPARES. `wait(procs, cmd_r, ready_w)` is what child A
        runs: join the cgroups, then wait for the spec (see zygote._spare_a); never returns."""
        if self.directory is None:
            return
        self.reap()
        while len(self.ready) < SPARES:
            sid = "s-" + secrets.token_hex(6)
            try:
                self.cgroups.create(sid, self.limits)
                procs = [str(p) for p in self.cgroups.procs_paths(sid)]
            except OSError:
                return
            cmd_r, cmd_w = os.pipe()
            ready_r, ready_w = os.pipe()
            pid_a = os.fork()
            if pid_a == 0:
                os.close(cmd_w)
                os.close(ready_r)
                self.close_in_child()
                wait(procs, cmd_r, ready_w)
            os.close(cmd_r)
            os.close(ready_w)
            pid = _pid_line(ready_r)   # A made PID 1 (it waits for a spec) and left
            if pid is None:
                for fd in (cmd_w, ready_r):
                    os.close(fd)
                self.cgroups.kill(sid)
                self.cgroups.remove(sid)
                return
            self.ready[sid] = Spare(sid, pid, cmd_w, ready_r, self.limits, proc_start_time(pid))
            self._mark(sid, pid)

    def close_in_child(self) -> None:
        """In a process just forked from the zygote: drop its copies of the spares' pipes (a
        spare notices the zygote's end by the end of its pipe)."""
        for spare in self.ready.values():
            for fd in (spare.cmd_w, spare.ready_r):
                try:
                    os.close(fd)
                except OSError:
                    pass

    def take(self, sid: str, spec_json: dict, paths: dict, env: dict, limits: cgroups_mod.Limits) -> Spare | None:
        """Hand the spec to the spare made for `sid`; None when there is none (or it died)."""
        spare = self.ready.pop(sid, None)
        if spare is None:
            return None
        self.limits = limits
        try:
            if limits != spare.limits:
                self.cgroups.create(sid, limits)
            os.write(spare.cmd_w, json.dumps({"spec": spec_json, "paths": paths, "env": env}).encode() + b"\n")
            os.close(spare.cmd_w)
        except OSError:
            self._drop(spare)
            return None
        self._unmark(sid)
        return spare

    def reap(self) -> None:
        """Forget spares whose process is gone (killed by a sweep, say)."""
        for sid, spare in list(self.ready.items()):
            if proc_start_time(spare.pid) != spare.start_time:
                del self.ready[sid]
                self._drop(spare)

    def close(self) -> None:
        """The zygote is leaving: every spare exits, its cgroups and marker go."""
        for spare in self.ready.values():
            if proc_start_time(spare.pid) == spare.start_time:   # (ours, not a reused pid)
                try:
                    os.kill(spare.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for spare in list(self.ready.values()):
            self._drop(spare)
        self.ready.clear()

    def _drop(self, spare: Spare) -> None:
        for fd in (spare.cmd_w, spare.ready_r):
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            self.cgroups.kill(spare.sid)
            self.cgroups.remove(spare.sid)
        except Exception:  # noqa: BLE001 - a leftover is swept as an orphan
            pass
        self._unmark(spare.sid)

    def _mark(self, sid: str, pid: int) -> None:
        assert self.directory is not None
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.directory / f".{sid}.tmp"
        tmp.write_text(f"{pid} {self.ready[sid].start_time}\n")
        tmp.rename(self.directory / sid)

    def _unmark(self, sid: str) -> None:
        if self.directory is not None:
            try:
                (self.directory / sid).unlink()
            except OSError:
                pass


def _pid_line(fd: int) -> int | None:
    """Child A's `pid N` line (one byte at a time: what follows is PID 1's report, read at the
    spawn); None when A failed or said nothing in time."""
    line = b""
    deadline = time.monotonic() + PID_TIMEOUT
    while not line.endswith(b"\n"):
        if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
            return None
        byte = os.read(fd, 1)
        if not byte:
            return None
        line += byte
    return int(line[4:]) if line.startswith(b"pid ") else None


def is_live(directory: Path, sid: str) -> bool:
    """Whether `sid` is a spare whose process lives."""
    try:
        pid, st = (int(x) for x in (directory / sid).read_text().split())
    except (OSError, ValueError):
        return False
    return proc_start_time(pid) == st


def live(directory: Path) -> set[str]:
    """Session ids of the spares whose process lives (read by the daemon and `doctor`)."""
    found: set[str] = set()
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return found
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            pid, st = (int(x) for x in Path(entry.path).read_text().split())
        except (OSError, ValueError):
            continue
        if proc_start_time(pid) == st:
            found.add(entry.name)
    return found
