"""The spawner ("zygote"): a small single-threaded process that creates sandboxes.

Who runs this: `python -m sandkasten.runtime.zygote`, started by the daemon (or a test, or
a tool) through `sandkasten.runtime.spawner.Spawner`, talking JSON lines on stdin/stdout.
Why a separate process: fork and unshare are unsafe in the multi-threaded daemon. Why a
zygote: everything the runner needs is imported once here, so each sandbox is a plain
fork (about a millisecond, pages shared with its siblings) and the image needs no Python.

Per sandbox (all as host root):
  zygote ── fork ──> A: setsid, join the session cgroup, unshare namespaces
                        └─ fork ──> B: PID 1 of the new pid namespace: setup steps,
                                       pivot_root, then the runner (never returns)
                     A exits at once, so B belongs to nobody who can die with it.

Rebinding /workspace of a running sandbox (a claimed pool sandbox, `mount_workspace`):
  zygote ── fork ──> C: open_tree(host dir, CLONE) while still in the host mount namespace,
                        setns into the runner's mount namespace (by pidfd), move_mount the
                        copy on top of /workspace, exit. The runner and its shell never see
                        the host path; C is single-threaded, as setns(CLONE_NEWNS) requires.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import select
import signal
import sys
import time
from pathlib import Path

from runner import runner as runner_main
from sandkasten.errors import SandboxError
from sandkasten.runtime import cgroups as cgroups_mod
from sandkasten.runtime import network
from sandkasten.runtime import privileges
from sandkasten.runtime import syscalls as sc
from sandkasten.runtime.setup import Context, SetupFailed, run_steps
from sandkasten.runtime.procfs import proc_start_time
from sandkasten.runtime.spares import Spares
from sandkasten.runtime.spec import SandboxSpec

NAMESPACES = (os.CLONE_NEWNS | os.CLONE_NEWUTS | os.CLONE_NEWIPC | os.CLONE_NEWNET
              | os.CLONE_NEWPID | os.CLONE_NEWCGROUP)
READY_TIMEOUT = 20.0
PR_SET_CHILD_SUBREAPER, PR_SET_DUMPABLE, PR_SET_PDEATHSIG = 36, 4, 1
OOM_SCORE_ADJ_MIN = -1000
_libc = ctypes.CDLL(None, use_errno=True)
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/workspace", "LANG": "C.UTF-8", "TERM": "xterm", "SHELL": "/bin/sh",
}


class Zygote:
    def __init__(self, cgroups: cgroups_mod.Cgroups, spares_dir: Path | None = None):
        self.cgroups = cgroups
        self.prepared: dict[tuple[str, int, int], privileges.Prepared] = {}
        self.spares = Spares(cgroups, spares_dir, _libc)

    def fill_spares(self) -> None:
        self.spares.fill(lambda procs, cmd_r, ready_w: _spare_a(self, procs, cmd_r, ready_w))

    def spawn(self, req: dict) -> dict:
        """Create one sandbox; the reply carries `steps`: [name, ms since the request arrived]
        for each step of the zygote and of the children (CLOCK_MONOTONIC is one clock for
        all of them), so a benchmark can say which kernel step costs what."""
        t0 = time.monotonic()
        clock: list = []
        spec = SandboxSpec.from_json(req["spec"]).validate()
        paths = req["paths"]
        key = (spec.seccomp, spec.uid, spec.gid)
        if key not in self.prepared:
            self.prepared[key] = privileges.prepare(*key)
        prepared = self.prepared[key]
        clock.append(("read the request", time.monotonic()))
        limits = cgroups_mod.Limits(mem_bytes=spec.mem_limit_mb * 1024 * 1024, pids=spec.pids_limit,
                                    cpu=spec.cpu_limit)
        paths = {**paths, "oom_events": str(self.cgroups.oom_events(spec.session_id))}  # the runner counts OOM kills
        env = {**BASE_ENV, "USER": "root" if spec.uid == 0 else "sandbox", **spec.env}
        net = req.get("network")  # bridge mode: B waits on net_r until we connected it
        spare = None if net else self.spares.take(spec.session_id, req["spec"], paths, env, limits)
        if spare is not None:   # cgroups joined, namespaces made, PID 1 forked long ago: it sets up now
            clock.append(("spare: limits set, spec handed over", time.monotonic()))
            report = {"pid": spare.pid, **_read_report(spare.ready_r, READY_TIMEOUT, until_pid=False)}
            return self._finish(spec, paths, report, spare.ready_r, t0, clock)
        self.cgroups.create(spec.session_id, limits)
        procs = [str(p) for p in self.cgroups.procs_paths(spec.session_id)]
        clock.append(("create cgroups", time.monotonic()))
        net_r, net_w = os.pipe() if net else (-1, -1)
        ctx = _context(spec, paths, net_r)
        ready_r, ready_w = os.pipe()
        pid_a = os.fork()
        if pid_a == 0:
            os.close(ready_r)
            if net:
                os.close(net_w)
            self.spares.close_in_child()
            _child_a(ctx, procs, ready_w, env, lambda: privileges.apply(prepared))
        os.close(ready_w)
        if net:
            os.close(net_r)
        try:
            os.waitpid(pid_a, 0)
        except ChildProcessError:  # already reaped by the SIGCHLD handler
            pass
        report = (_read_report(ready_r, READY_TIMEOUT) if not net
                  else _connect_network(net, spec.session_id, ready_r, net_w))
        return self._finish(spec, paths, report, ready_r, t0, clock)

    def _finish(self, spec: SandboxSpec, paths: dict, report: dict, ready_r: int, t0: float, clock: list) -> dict:
        os.close(ready_r)
        clock.append(("ready report read", time.monotonic()))
        pid = report.get("pid")
        if not report.get("ok") or not isinstance(pid, int):   # ok without a pid: A died before saying it
            if pid or report.get("ok"):
                self.cgroups.kill(spec.session_id)
            raise SetupFailed(report.get("error") or "sandbox did not report ready")
        st = proc_start_time(pid)
        tmp = paths["pidfile"] + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{pid} {st}\n")
        os.rename(tmp, paths["pidfile"])
        clock.append(("write pid file", time.monotonic()))
        steps = sorted([*clock, *[(name, t) for name, t in report.get("clock") or ()]], key=lambda kv: kv[1])
        return {"ok": True, "pid": pid, "start_time": st,
                "steps": [[name, round((t - t0) * 1000, 3)] for name, t in steps]}

    def mount_workspace(self, req: dict) -> dict:
        """Bind host dir `source` over /workspace inside the running sandbox of runner `pid`
        (checked against its `start_time`, so a reused pid is never entered)."""
        pid, source = int(req["pid"]), str(req["source"])
        pidfd = os.pidfd_open(pid)
        try:
            if proc_start_time(pid) != int(req["start_time"]):
                raise SetupFailed(f"unable to bind workspace: runner pid {pid} is gone (or was reused)")
            report_r, report_w = os.pipe()
            pid_c = os.fork()
            if pid_c == 0:
                os.close(report_r)
                _child_c(pidfd, source, report_w)
            os.close(report_w)
            try:
                os.waitpid(pid_c, 0)
            except ChildProcessError:  # already reaped by the SIGCHLD handler
                pass
            report = _read_report(report_r, READY_TIMEOUT, until_pid=False)
            os.close(report_r)
        finally:
            os.close(pidfd)
        if not report.get("ok"):
            raise SetupFailed(report.get("error") or "unable to bind workspace: no report")
        return {"ok": True}

    def reap(self) -> None:
        # We are a child subreaper: runners whose parent A exited are ours to reap.
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return


def _context(spec: SandboxSpec, paths: dict, net_r: int = -1) -> Context:
    return Context(spec=spec, rootfs=paths["rootfs"], upper=paths["upper"], work=paths["work"],
                   run_dir=paths["run"], logs_dir=paths["logs"], net_fd=net_r, clock=[],
                   oom_events=paths.get("oom_events", ""))


def _join(procs: list[str]) -> None:
    """Join the session's cgroups (before unsharing the cgroup namespace: they become its root)."""
    pid = str(os.getpid()).encode()
    for path in procs:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, pid)
        finally:
            os.close(fd)


def _child_a(ctx: Context, procs: list[str], ready_w: int, env: dict, before_exec) -> None:
    """Intermediate child: never returns."""
    try:
        ctx.clock.append(("fork A", time.monotonic()))
        os.setsid()
        _join(procs)
        ctx.clock.append(("A: join cgroups", time.monotonic()))
        _unshare_and_fork(ctx, ready_w, env, before_exec)
    except BaseException as e:  # noqa: BLE001 - report to the zygote, then die
        _write(ready_w, {"ok": False, "error": f"unable to create namespaces: {e}"})
        os._exit(1)


def _spare_a(zygote: Zygote, procs: list[str], cmd_r: int, ready_w: int) -> None:
    """A spare child A (see spares.py): join the cgroups, unshare and fork the sandbox's PID 1
    now — it waits for a spec (`_spare_b`) — and leave, as `_child_a` does. Never returns."""
    try:
        os.setsid()
        _join(procs)
        os.unshare(NAMESPACES & ~os.CLONE_NEWNS)   # the mount namespace once the spec came (_spare_b)
        pid_b = os.fork()
        if pid_b == 0:
            _spare_b(zygote, cmd_r, ready_w)
        os.write(ready_w, f"pid {pid_b}\n".encode())
        os._exit(0)
    except BaseException as e:  # noqa: BLE001 - report to the zygote, then die
        _write(ready_w, {"ok": False, "error": f"unable to create namespaces: {e}"})
        os._exit(1)


def _spare_b(zygote: Zygote, cmd_r: int, ready_w: int) -> None:
    """A spare sandbox's PID 1: in its cgroups and namespaces already, it waits for a spec,
    then sets up as `_child_b` does. The spec is one line of JSON; the end of the pipe (the
    zygote is gone, or dropped this spare) makes it leave. Never returns."""
    try:
        data = bytearray()
        while not data.endswith(b"\n"):
            chunk = os.read(cmd_r, 65536)
            if not chunk:
                os._exit(0)
            data += chunk
        os.close(cmd_r)
        # A copy of the host's mounts as they are now, not as they were when this spare was
        # made: the create mounted the sandbox's own disk (upper, work, workspace) since.
        os.unshare(os.CLONE_NEWNS)
        req = json.loads(data)
        spec = SandboxSpec.from_json(req["spec"])
        ctx = _context(spec, req["paths"])
        key = (spec.seccomp, spec.uid, spec.gid)
        prepared = zygote.prepared.get(key) or privileges.prepare(*key)
        _child_b(ctx, ready_w, req["env"], lambda: privileges.apply(prepared), "spare PID 1: spec read")
    except BaseException as e:  # noqa: BLE001 - report to the zygote, then die
        _write(ready_w, {"ok": False, "error": f"unable to set up the sandbox: {e}"})
        os._exit(1)


def _unshare_and_fork(ctx: Context, ready_w: int, env: dict, before_exec) -> None:
    os.unshare(NAMESPACES)
    ctx.clock.append(("A: unshare namespaces", time.monotonic()))
    pid_b = os.fork()
    if pid_b == 0:
        _child_b(ctx, ready_w, env, before_exec)
    os.write(ready_w, f"pid {pid_b}\n".encode())
    os._exit(0)


def _child_b(ctx: Context, ready_w: int, env: dict, before_exec, first: str = "fork B (PID 1)") -> None:
    """PID 1 of the sandbox: set it up, report, become the runner."""
    try:
        ctx.clock.append((first, time.monotonic()))
        _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
        devnull = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        # The OOM killer must never pick PID 1: its death takes the whole sandbox, and a runner
        # forked from the zygote is bigger than any small process of the workload. -1000 needs
        # CAP_SYS_RESOURCE (some container hosts withhold it); the shell raises its own score to
        # +1000 either way (runner.shell), so every command is always chosen before the runner.
        try:
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write(str(OOM_SCORE_ADJ_MIN))
        except PermissionError:
            pass
        run_steps(ctx)
        listener = ctx.listener
        if listener is None:
            raise SetupFailed(f"unable to set up sandbox {ctx.spec.session_id}: no runner socket was opened")
        keep = {ready_w, ctx.logs_fd, ctx.oom_fd, listener.fileno()}
        for fd in _open_fds():
            if fd > 2 and fd not in keep:
                try:
                    os.close(fd)
                except OSError:
                    pass
        ctx.clock.append(("close inherited fds", time.monotonic()))
        _write(ready_w, {"ok": True, "clock": ctx.clock})
        os.close(ready_w)
        gc.enable()
        gc.collect(0)
        _libc.malloc_trim(0)   # hand back the heap pages setup dirtied and freed: they would count against it
        runner_main.run(listener, ctx.logs_fd, env, before_exec, oom_fd=ctx.oom_fd)
        os._exit(0)
    except BaseException as e:  # noqa: BLE001
        _write(ready_w, {"ok": False, "error": str(e) if isinstance(e, SetupFailed)
                         else f"unable to set up sandbox {ctx.spec.session_id}: {e}"})
        os._exit(1)


def _child_c(pidfd: int, source: str, report_w: int) -> None:
    """Rebinds /workspace in a sandbox's mount namespace: never returns."""
    try:
        tree = sc.open_tree(source)  # in the host namespace: the only place `source` exists
        sc.mount_setattr(tree, sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NODEV)
        os.setns(pidfd, os.CLONE_NEWNS)  # root and cwd become the sandbox's root
        sc.move_mount(tree, "/workspace")  # on top of the old one, which the shell leaves
        _write(report_w, {"ok": True})
        os._exit(0)
    except BaseException as e:  # noqa: BLE001 - report to the zygote, then die
        _write(report_w, {"ok": False, "error": f"unable to bind workspace {source}: {e}"})
        os._exit(1)


def _connect_network(net: dict, sid: str, ready_r: int, net_w: int) -> dict:
    """Bridge mode: once A told us B's pid, connect B's netns from the host side, then hand
    B the plan (closing net_w without one makes B fail), then wait for B's report."""
    try:
        report = _read_until(ready_r, READY_TIMEOUT, "pid", "pid")
        if "pid" not in report or "ok" in report:
            return report
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})  # `ip`'s status is ours
        try:
            plan = network.attach(network.Settings.from_json(net["settings"]), sid, report["pid"],
                                  net["allow"], net["marker"], net["data_dir"])
        except (SandboxError, OSError) as e:
            return {**report, "ok": False, "error": f"unable to connect sandbox {sid} to the bridge: "
                                                    f"{getattr(e, 'message', None) or e}"}
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        os.write(net_w, json.dumps(plan).encode())
    finally:
        os.close(net_w)
    return {**report, **_read_until(ready_r, READY_TIMEOUT, "ok", "readiness")}


def _read_until(fd: int, timeout: float, key: str, what: str) -> dict:
    """Report lines (A's `pid N`, B's JSON) until one gives `key`, one byte at a time so
    nothing after that line is consumed."""
    deadline, line = time.monotonic() + timeout, b""
    report: dict = {}
    while key not in report:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return {**report, "error": report.get("error") or f"timed out waiting for the sandbox's {what}"}
        byte = os.read(fd, 1)
        if not byte:
            return {**report, "error": report.get("error") or f"sandbox exited before reporting its {what}"}
        if byte != b"\n":
            line += byte
            continue
        if line.startswith(b"pid "):
            report["pid"] = int(line[4:])
        else:
            report.update(json.loads(line))
        line = b""
    return report


def _open_fds() -> list[int]:
    try:
        return [int(n) for n in os.listdir("/proc/self/fd")]
    except OSError:
        return list(range(3, 1024))


def _write(fd: int, msg: dict) -> None:
    try:
        os.write(fd, (json.dumps(msg) + "\n").encode())
    except OSError:
        pass


def _read_report(fd: int, timeout: float, until_pid: bool = True) -> dict:
    """Lines from A (`pid N`) and B (`{"ok": ...}`); done when B reported or all closed.
    With `until_pid=False` (one child, no pid line) the first JSON line is the report."""
    deadline = time.monotonic() + timeout
    buf = b""
    report: dict = {}
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            report.setdefault("error", "timed out waiting for the sandbox to report ready")
            return report
        r, _, _ = select.select([fd], [], [], left)
        if not r:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            report.setdefault("error", "sandbox exited before reporting ready")
            return report
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if line.startswith(b"pid "):
                report["pid"] = int(line[4:])
            else:
                msg = json.loads(line)
                report.update(msg)
                if "pid" in report or not until_pid:
                    return report


def _immortalize() -> int:
    """Make every object reachable from the collector's lists immortal (PEP 683, CPython
    3.12+ on a little-endian 64-bit build): Py_INCREF/Py_DECREF leave such an object's
    reference count alone, so a forked runner running through the runner's code no longer
    writes a copy of each page holding a function, code object, module dict or string it
    touches. (They are never freed — the zygote's imports live as long as the zygote anyway.)
    Returns how many objects; 0 where the layout is not the one described."""
    if sys.implementation.name != "cpython" or sys.version_info < (3, 12) or sys.byteorder != "little" \
            or sys.maxsize <= 2**32:
        return 0
    seen: set[int] = set()
    stack = gc.get_objects()
    own = {id(seen), id(stack)}
    while stack:
        obj = stack.pop()
        key = id(obj)
        if key in seen or key in own:
            continue
        seen.add(key)
        stack.extend(gc.get_referents(obj))
    for key in seen:   # the low half of ob_refcnt (first field of every object) = immortal
        ctypes.c_uint32.from_address(key).value = 0xFFFFFFFF
    return len(seen)


def main() -> None:
    """Serve spawn requests on stdin/stdout until stdin closes (the daemon died or left)."""
    cgroup_root, parent = sys.argv[1], sys.argv[2]
    spares_dir = Path(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[3] else None
    _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    zygote = Zygote(cgroups_mod.detect(root=Path(cgroup_root), parent=parent), spares_dir)
    zygote.cgroups.ensure_parent()
    gc.collect()
    _immortalize()   # a runner then never writes these objects' reference counts ...
    gc.freeze()      # ... nor its collector their GC headers: their pages stay shared
    signal.signal(signal.SIGCHLD, lambda *_: zygote.reap())
    out = sys.stdout.buffer
    out.write(b'{"ok": true, "ready": true}\n')
    out.flush()
    try:   # however the loop ends (the daemon gone mid-answer: BrokenPipeError), the spares go
        zygote.fill_spares()
        for line in sys.stdin.buffer:
            zygote.reap()
            try:
                req = json.loads(line)
                if req.get("op") == "spawn":
                    reply = zygote.spawn(req)
                elif req.get("op") == "mount_workspace":
                    reply = zygote.mount_workspace(req)
                elif req.get("op") == "ping":
                    reply = {"ok": True}
                else:
                    reply = {"ok": False, "error": f"unknown op {req.get('op')!r}"}
            except SetupFailed as e:
                reply = {"ok": False, "error": str(e)}
            except Exception as e:  # noqa: BLE001 - one failed sandbox never takes the spawner down
                reply = {"ok": False, "error": f"{type(e).__name__}: {e}",
                         "code": getattr(e, "code", None)}
            out.write((json.dumps(reply) + "\n").encode())
            out.flush()
            try:   # between requests: the next creates' slow half
                zygote.fill_spares()
            except Exception:  # noqa: BLE001 - without spares, creates take the ordinary path
                pass
    finally:
        zygote.spares.close()
        zygote.reap()


if __name__ == "__main__":
    main()
