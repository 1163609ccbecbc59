"""Resource limits and lifecycle of sandboxes through cgroups.

Who runs this: the spawner (create, then the forked runner writes itself into `procs_paths`),
the daemon and the reconciler (stats, kill, remove, orphan sweep by `names`), and test runs
(`destroy_parent`). All as root, all plain reads and writes of cgroupfs files: no cgroup
library, no systemd. Every sandbox group lives under one parent group per daemon (or per test
run), `<hierarchy>/<parent>/<session id>`, so one parent can be swept as a whole. Nothing
outside that parent is ever written (the host's own groups, e.g. `process_api`, stay untouched).

Two layouts exist, detected once at start (`detect`), behind one interface (`Cgroups`):

- hybrid (this project's kind of machine, measured): v1 hierarchies `memory`, `pids`, `cpu`
  carry the limits; the v2 tree at `unified/` has no controllers but still gives
  `cgroup.kill`, `cgroup.events` (`populated`) and `cpu.stat` (`usage_usec`, also without the
  cpu controller), so the lifecycle and cpu accounting come from there and `cpuacct` is unused.
- v2 (most modern hosts): one tree; the parent enables `+memory +pids +cpu` for its children.

Foreign exceptions (OSError) become `SandboxError` here; messages name verb, path and errno.
"""

from __future__ import annotations

import errno
import math
import os
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from sandkasten.errors import InvalidRequest, SandboxError
from sandkasten.schema.vocabulary import MIN_CPU   # the kernel refuses a cfs quota below 1000 us

CPU_PERIOD_US = 100_000
KILL_TIMEOUT = 5.0
_V2_CONTROLLERS = ("memory", "pids", "cpu")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_RMDIR_RETRIES = 8


@dataclass(frozen=True)
class Limits:
    """What a sandbox may use: memory in bytes (swap included, i.e. no swap), number of
    tasks, and cpu in cores (0.5 = half of one core per 100 ms period)."""

    mem_bytes: int
    pids: int
    cpu: float

    def __post_init__(self) -> None:
        for field in ("mem_bytes", "pids"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidRequest(f"invalid limit {field}={value!r}: must be a positive integer")
        cpu = self.cpu
        if isinstance(cpu, bool) or not isinstance(cpu, int | float) or not math.isfinite(cpu) or cpu <= 0:
            raise InvalidRequest(f"invalid limit cpu={cpu!r}: must be a positive number of cores")
        if cpu < MIN_CPU:
            raise InvalidRequest(f"invalid limit cpu={cpu!r}: must be at least {MIN_CPU} cores")

    @property
    def cpu_quota_us(self) -> int:
        return max(1000, round(self.cpu * CPU_PERIOD_US))


@dataclass(frozen=True)
class Stats:
    """What a sandbox uses now. `memory_limit` 0 means the group has no memory limit."""

    memory_bytes: int
    memory_limit: int
    cpu_usage_usec: int
    pids: int
    oom_kills: int


class Cgroups(Protocol):
    kind: str  # "hybrid" | "v2"
    parent: str

    def ensure_parent(self) -> None: ...
    def create(self, name: str, limits: Limits) -> None: ...
    def attach(self, name: str, pid: int) -> None: ...
    def procs_paths(self, name: str) -> list[Path]: ...
    def exists(self, name: str) -> bool: ...
    def populated(self, name: str) -> bool: ...
    def pids(self, name: str) -> list[int]: ...
    def kill(self, name: str, timeout: float = KILL_TIMEOUT) -> None: ...
    def remove(self, name: str) -> None: ...
    def stats(self, name: str) -> Stats: ...
    def oom_events(self, name: str) -> Path: ...
    def names(self) -> list[str]: ...
    def destroy_parent(self) -> None: ...
    def release_parent(self) -> bool: ...


def orphaned_run_parents(prefix: str, root: Path = Path("/sys/fs/cgroup")) -> list[str]:
    """Parents named `<prefix><pid>` or `<prefix><pid>-<anything>` (a test or bench run's own,
    named by its process) whose process is gone: what a run killed before its cleanup left.
    Never a live process's, never a name of another shape."""
    shape = re.compile(re.escape(prefix) + r"(\d+)(?:-.*)?")
    found = set()
    for path in [*root.glob(prefix + "*"), *root.glob("*/" + prefix + "*")]:   # v2; hybrid hierarchies
        match = shape.fullmatch(path.name)
        if match and path.is_dir() and not _running(int(match.group(1))):
            found.add(path.name)
    return sorted(found)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def detect(root: Path = Path("/sys/fs/cgroup"), parent: str = "sandkasten") -> Cgroups:
    """Pick the backend for the cgroup layout under `root`. Decided by files only the kernel
    creates: `cgroup.controllers` exists only in a cgroup2 mount, `memory.limit_in_bytes` only
    in a v1 memory hierarchy, `cpu.cfs_period_us` only in a v1 cpu hierarchy."""
    root = Path(root)
    if (root / "cgroup.controllers").is_file():
        return V2Cgroups(root, parent)
    hybrid_marks = [
        root / "unified" / "cgroup.controllers",
        root / "memory" / "memory.limit_in_bytes",
        root / "pids" / "cgroup.procs",
        root / "cpu" / "cpu.cfs_period_us",
    ]
    if all(mark.is_file() for mark in hybrid_marks):
        return HybridCgroups(root, parent)
    missing = ", ".join(str(mark) for mark in hybrid_marks if not mark.is_file())
    raise SandboxError(
        f"unable to detect cgroups under {root}: neither cgroup v2 ({root}/cgroup.controllers) "
        f"nor hybrid v1+v2 (missing {missing})",
        root=str(root),
    )


def check_name(name: str, what: str = "cgroup name") -> str:
    """A group name is one path component we chose: session ids, the parent's name."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidRequest(f"invalid {what} {name!r}: expected 1-128 of [A-Za-z0-9_.-], starting alphanumeric")
    return name


class _Groups:
    """What both layouts share: a v2 tree for the lifecycle (kill, populated, cpu.stat) and a
    list of hierarchies in which every group exists (for the v2 layout, just that tree)."""

    kind = ""

    def __init__(self, root: Path, parent: str, hierarchies: list[Path], lifecycle: Path) -> None:
        self.root = Path(root)
        self.parent = check_name(parent, "cgroup parent")
        self.hierarchies = hierarchies  # where every group exists, the lifecycle tree included
        self.lifecycle = lifecycle  # the v2 tree: cgroup.kill, cgroup.events, cpu.stat

    def _dirs(self, name: str = "") -> list[Path]:
        """The group in every hierarchy; `name=""` is the parent itself."""
        return [h / self.parent / name for h in self.hierarchies]

    # -- the interface ----------------------------------------------------------------------

    def ensure_parent(self) -> None:
        """The parent group in every hierarchy; each layout makes it its own way."""
        raise NotImplementedError

    def procs_paths(self, name: str) -> list[Path]:
        return [d / "cgroup.procs" for d in self._dirs(check_name(name))]

    def attach(self, name: str, pid: int) -> None:
        for procs in self.procs_paths(name):
            write_file(procs, str(pid))

    def exists(self, name: str) -> bool:
        return any(d.is_dir() for d in self._dirs(check_name(name)))

    def populated(self, name: str) -> bool:
        return self._populated(self.lifecycle / self.parent / check_name(name))

    def pids(self, name: str) -> list[int]:
        return self._pids(self._dirs(check_name(name)))

    def kill(self, name: str, timeout: float = KILL_TIMEOUT) -> None:
        self._kill(check_name(name), timeout)

    def remove(self, name: str) -> None:
        for group in self._dirs(check_name(name)):
            remove_tree(group)

    def names(self) -> list[str]:
        found: set[str] = set()
        for parent in self._dirs():
            if parent.is_dir():
                found.update(p.name for p in parent.iterdir() if p.is_dir() and _NAME.fullmatch(p.name))
        return sorted(found)

    def destroy_parent(self) -> None:
        """Kill and remove every child, then the parent (test runs, uninstall). Tries every
        step and raises the first failure at the end, so one stuck group leaves the least."""
        failures: list[SandboxError] = []
        for name in self.names():
            for step in (self.kill, self.remove):
                try:
                    step(name)
                except SandboxError as failure:
                    failures.append(failure)
        try:
            self._kill("", KILL_TIMEOUT)  # strays written into the parent directly
            for group in self._dirs():
                remove_tree(group)
        except SandboxError as failure:
            failures.append(failure)
        if failures:
            raise failures[0]

    def release_parent(self) -> bool:
        """Remove the parent if it holds nothing (a daemon stopping with no sandboxes left):
        rmdir only, which the kernel refuses for a group with children or processes."""
        if self.names():
            return False
        removed = True
        for group in reversed(self._dirs()):
            try:
                os.rmdir(group)
            except FileNotFoundError:
                pass
            except OSError:
                removed = False
        return removed

    # -- shared mechanics -------------------------------------------------------------------

    def _reensure_parent(self) -> None:
        """The parent again, if a daemon sharing it released it meanwhile (`release_parent`)."""
        if not all(d.is_dir() for d in self._dirs()):
            self.ensure_parent()

    def _populated(self, group: Path) -> bool:
        events = group / "cgroup.events"
        if not events.exists():
            return False
        return read_keyed(events).get("populated", 0) == 1

    def _pids(self, groups: list[Path]) -> list[int]:
        found: set[int] = set()
        for group in groups:
            try:
                text = read_file(group / "cgroup.procs")
            except SandboxError:
                if group.is_dir():
                    raise
                continue  # this hierarchy has no such group (partial create or removed)
            found.update(int(line) for line in text.split())
        return sorted(found)

    def _kill(self, name: str, timeout: float) -> None:
        """`cgroup.kill` in the v2 tree, then wait until the group is empty. A process that
        escaped the v2 tree (attached to a v1 hierarchy only) or a kernel without
        `cgroup.kill` falls back to SIGKILL for every pid still listed, until none is left."""
        groups, lifecycle = self._dirs(name), self.lifecycle / self.parent / name
        if not any(g.is_dir() for g in groups):
            return

        def busy() -> bool:
            return self._populated(lifecycle) or bool(self._pids(groups))

        if (lifecycle / "cgroup.kill").exists():
            write_file(lifecycle / "cgroup.kill", "1")
            if wait_until(lambda: not busy(), timeout):
                return
        deadline = time.monotonic() + timeout
        while busy():
            if time.monotonic() >= deadline:
                raise SandboxError(
                    f"unable to kill cgroup {lifecycle}: still populated after {timeout:g}s "
                    f"(pids {self._pids(groups)})",
                    path=str(lifecycle),
                )
            for pid in self._pids(groups):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.01)


class HybridCgroups(_Groups):
    """v1 `memory`, `pids`, `cpu` carry the limits; `unified/` (v2, no controllers) the
    lifecycle; `create` unpacks `_dirs` in this order."""

    kind = "hybrid"

    def __init__(self, root: Path, parent: str) -> None:
        hierarchies = [root / "memory", root / "pids", root / "cpu", root / "unified"]
        super().__init__(root, parent, hierarchies, lifecycle=root / "unified")

    def ensure_parent(self) -> None:
        for group in self._dirs():
            make_dir(group)

    def create(self, name: str, limits: Limits) -> None:
        self._reensure_parent()
        memory, pids, cpu, unified = self._dirs(check_name(name))
        for group in (memory, pids, cpu, unified):
            make_dir(group)
        self._limit_memory(memory, limits.mem_bytes)
        write_file(pids / "pids.max", str(limits.pids))
        write_file(cpu / "cpu.cfs_period_us", str(CPU_PERIOD_US))
        write_file(cpu / "cpu.cfs_quota_us", str(limits.cpu_quota_us))

    def _limit_memory(self, memory: Path, mem_bytes: int) -> None:
        # The kernel keeps memsw >= limit at every step: when raising past the current memsw
        # limit, memsw goes first; otherwise the plain limit goes first. Equal values = no swap.
        limit = memory / "memory.limit_in_bytes"
        memsw = memory / "memory.memsw.limit_in_bytes"
        if not memsw.exists():  # swap accounting off: nothing to keep in step
            write_file(limit, str(mem_bytes))
            return
        order = [memsw, limit] if mem_bytes > int(read_file(memsw)) else [limit, memsw]
        for path in order:
            write_file(path, str(mem_bytes))

    def oom_events(self, name: str) -> Path:
        """The file whose `oom_kill N` line counts the group's OOM kills (kernel >= 4.13)."""
        return self._dirs(check_name(name))[0] / "memory.oom_control"

    def stats(self, name: str) -> Stats:
        memory, pids, _cpu, unified = self._dirs(check_name(name))
        limit = int(read_file(memory / "memory.limit_in_bytes"))
        return Stats(
            memory_bytes=int(read_file(memory / "memory.usage_in_bytes")),
            memory_limit=0 if limit >= 2**62 else limit,  # v1 spells "no limit" as PAGE_COUNTER_MAX
            cpu_usage_usec=read_keyed(unified / "cpu.stat")["usage_usec"],
            pids=int(read_file(pids / "pids.current")),
            oom_kills=read_keyed(memory / "memory.oom_control").get("oom_kill", 0),
        )


class V2Cgroups(_Groups):
    """One cgroup2 tree at `root`. The parent holds no processes (the v2 "no internal
    processes" rule) and delegates memory, pids and cpu to its children."""

    kind = "v2"

    def __init__(self, root: Path, parent: str) -> None:
        super().__init__(root, parent, hierarchies=[root], lifecycle=root)

    def ensure_parent(self) -> None:
        available = read_file(self.root / "cgroup.controllers").split()
        missing = [c for c in _V2_CONTROLLERS if c not in available]
        if missing:
            raise SandboxError(
                f"unable to use cgroup v2 at {self.root}: controllers {' '.join(missing)} not available",
                path=str(self.root),
            )
        (parent,) = self._dirs()
        enable_controllers(self.root)
        make_dir(parent)
        enable_controllers(parent)

    def create(self, name: str, limits: Limits) -> None:
        self._reensure_parent()
        (group,) = self._dirs(check_name(name))
        make_dir(group)
        write_file(group / "memory.max", str(limits.mem_bytes))
        if (group / "memory.swap.max").exists():  # absent when swap accounting is off
            write_file(group / "memory.swap.max", "0")
        write_file(group / "pids.max", str(limits.pids))
        write_file(group / "cpu.max", f"{limits.cpu_quota_us} {CPU_PERIOD_US}")

    def oom_events(self, name: str) -> Path:
        """The file whose `oom_kill N` line counts the group's OOM kills."""
        (group,) = self._dirs(check_name(name))
        return group / "memory.events"

    def stats(self, name: str) -> Stats:
        (group,) = self._dirs(check_name(name))
        limit = read_file(group / "memory.max").strip()
        return Stats(
            memory_bytes=int(read_file(group / "memory.current")),
            memory_limit=0 if limit == "max" else int(limit),
            cpu_usage_usec=read_keyed(group / "cpu.stat")["usage_usec"],
            pids=int(read_file(group / "pids.current")),
            oom_kills=read_keyed(group / "memory.events").get("oom_kill", 0),
        )


def enable_controllers(group: Path) -> None:
    """Write only the controllers not yet enabled, in one write (`+memory +pids +cpu`)."""
    enabled = read_file(group / "cgroup.subtree_control").split()
    missing = [c for c in _V2_CONTROLLERS if c not in enabled]
    if missing:
        write_file(group / "cgroup.subtree_control", " ".join(f"+{c}" for c in missing))


# -- cgroupfs file access: the one place OSError becomes SandboxError ----------------------------


def read_file(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as e:
        raise os_failure(f"read {path}", path, e) from e


def read_keyed(path: Path) -> dict[str, int]:
    """Parse `key value` lines (cgroup.events, cpu.stat, memory.events, memory.oom_control)."""
    pairs = (line.split() for line in read_file(path).splitlines())
    return {fields[0]: int(fields[1]) for fields in pairs if len(fields) == 2}


def write_file(path: Path, value: str) -> None:
    # No O_CREAT: a control file the kernel did not create means the layout is not what we
    # think it is, and must fail loudly rather than leave a stray regular file.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
    except OSError as e:
        raise os_failure(f"write {value!r} to {path}", path, e) from e


def make_dir(group: Path) -> None:
    try:
        group.mkdir(exist_ok=True)
    except OSError as e:
        raise os_failure(f"create cgroup {group}", group, e) from e


def remove_tree(group: Path) -> None:
    """rmdir the group and any groups nested in it, deepest first (cgroupfs removes a
    directory together with its control files). EBUSY right after a kill is common while the
    kernel finishes releasing tasks, so it is retried a few times with a growing pause."""
    if not group.is_dir():
        return
    nested = [Path(top) / d for top, dirs, _ in os.walk(group, topdown=False) for d in dirs]
    for path in [*nested, group]:
        for attempt in range(_RMDIR_RETRIES):
            try:
                path.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as e:
                if e.errno == errno.EBUSY and attempt + 1 < _RMDIR_RETRIES:
                    time.sleep(0.01 * 2**attempt)
                    continue
                raise os_failure(f"remove cgroup {path}", path, e) from e


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    pause = 0.001
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(pause)
        pause = min(pause * 2, 0.05)
    return True


def os_failure(action: str, path: Path, e: OSError) -> SandboxError:
    """`unable to remove cgroup …/ab12: EBUSY`, with path and errno as details."""
    cause = errno.errorcode.get(e.errno, str(e.errno)) if e.errno else str(e)
    return SandboxError(f"unable to {action}: {cause}", path=str(path), errno=e.errno)
