"""The runtime's front: create, observe, exec in and tear down sandboxes by session id.

Who calls this: the daemon (executor, reconciler), the CLI's `doctor`, tools and tests.
Everything about a sandbox is found again from its session id alone (`layout`), so any
process — not only the one that created a sandbox — can use it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from runner import protocol, results
from sandkasten.errors import (CommandTimeout, InvalidRequest, SandboxError, SandboxGone,
                               SessionBusy)
from sandkasten.images.store import ImageStore
from sandkasten.runtime import cgroups as cgroups_mod
from sandkasten.runtime import client, disk
from sandkasten.runtime import network as network_mod
from sandkasten.runtime import spares
from sandkasten.runtime.layout import Layout, SessionPaths
from sandkasten.runtime.procfs import mounts_under, proc_start_time
from sandkasten.runtime.ready_disks import ReadyDisks
from sandkasten.runtime.spawner import Spawner
from sandkasten.runtime.spec import (SESSION_ID, ExecRequest, ExecResult, Observed, SandboxSpec,
                                     check_exec_id, check_session_id)

EXEC_GRACE_S = 10.0   # beyond the command's own timeout: SIGINT/SIGKILL escalation + slack


class Runtime:
    def __init__(self, data_dir: Path, images: ImageStore, cgroups: cgroups_mod.Cgroups,
                 cgroup_root: Path = Path("/sys/fs/cgroup"), network: network_mod.Settings | None = None):
        self.layout = Layout(Path(data_dir).absolute())
        self.network = network or network_mod.Settings()
        self.images = images
        self.cgroups = cgroups
        self.spares_dir = self.layout.run / ".spares"   # see runtime/spares.py (not a session id: no sweep takes it)
        self._reserved: set[str] = set()
        self.spawner = Spawner(cgroup_root, cgroups.parent, self.spares_dir)
        self.ready_disks = ReadyDisks(self.layout.ready_disks, self.layout.disk_templates)  # made after a create
        # [step, ms since the spawner took the request] of the last create (see zygote.spawn)
        self.last_steps: list[list] = []

    @classmethod
    def detect(cls, data_dir: Path, cgroup_parent: str = "sandkasten",
               cgroup_root: Path = Path("/sys/fs/cgroup"),
               network: network_mod.Settings | None = None) -> Runtime:
        data_dir = Path(data_dir).absolute()
        return cls(data_dir, ImageStore(data_dir / "images"),
                   cgroups_mod.detect(root=cgroup_root, parent=cgroup_parent), cgroup_root, network)

    def close(self) -> None:
        self.ready_disks.close()
        self.spawner.close()

    def warm(self) -> None:
        """Start the spawner now (it then makes its spares) rather than on the first create;
        remove the disks a crashed daemon had made ahead."""
        self.ready_disks.sweep()
        try:
            self.spawner.request({"op": "ping"})
        except SandboxError:
            pass   # the first create starts it again

    def paths(self, sid: str) -> SessionPaths:
        return self.layout.of(sid)

    # ------------------------------------------------------------------ create
    def reserve_id(self) -> str | None:
        """A session id the spawner has a spare ready for (cgroups joined, child forked: a
        create with it skips the slowest steps), not handed out before; None when there is none."""
        for sid in sorted(spares.live(self.spares_dir) - self._reserved):
            self._reserved.add(sid)
            if len(self._reserved) > 64:
                self._reserved = {s for s in self._reserved if (self.spares_dir / s).exists()} | {sid}
            return sid
        return None

    def spec(self, sid: str, image: str, workspace_dir: Path | None = None, **options) -> SandboxSpec:
        """A validated spec; the image must exist and be usable (has /bin/sh)."""
        check_session_id(sid)
        self.images.ensure_valid(image)
        lower = self.images.path(image)
        ws = Path(workspace_dir) if workspace_dir else self.paths(sid).disk / "workspace"  # see create
        return SandboxSpec(session_id=sid, image=image, lower_dir=str(lower), workspace_dir=str(ws),
                           **options).validate()

    def create(self, spec: SandboxSpec) -> Observed:
        """Create the sandbox and return once its runner answers. On failure nothing is
        left behind (cgroup, dirs) and SandboxError says which step failed."""
        spec.validate()
        with self.ready_disks.creating():   # the next disk is made ahead after this create, not during it
            return self._create(spec)

    def _create(self, spec: SandboxSpec) -> Observed:
        p = self.paths(spec.session_id)
        if p.root.exists() or p.run.exists():
            raise SandboxError(f"unable to create sandbox {spec.session_id}: it already exists")
        try:
            p.root.mkdir(parents=True)
            if spec.disk_limit_mb <= 0 or not self.ready_disks.take(spec.disk_limit_mb, p.disk_image, p.disk):
                disk.prepare(p.disk_image, p.disk, spec.disk_limit_mb, self.layout.disk_templates)
            for d in (p.upper, p.work, p.rootfs):
                d.mkdir(parents=True, exist_ok=False)
            p.run.mkdir(parents=True, mode=0o700)
            p.logs.mkdir(parents=True, mode=0o700, exist_ok=True)
            ws = Path(spec.workspace_dir)
            if not ws.exists():
                ws.mkdir(parents=True, mode=0o755)
                os.chown(ws, spec.uid, spec.gid)
            req = {"op": "spawn", "spec": spec.to_json(), "paths": {
                "rootfs": str(p.rootfs), "upper": str(p.upper), "work": str(p.work),
                "run": str(p.run), "logs": str(p.logs), "pidfile": str(p.pidfile)}}
            if spec.network_mode == "bridge":
                req["network"] = {"settings": self.network.to_json(), "allow": list(spec.egress_allow),
                                  "marker": str(p.network_marker), "data_dir": str(self.layout.data_dir)}
            reply = self.spawner.request(req)
        except OSError as e:
            self.destroy(spec.session_id)
            raise SandboxError(f"unable to prepare directories for sandbox {spec.session_id}: {e}") from None
        except SandboxError:
            self.destroy(spec.session_id)
            raise
        except BaseException:
            self.destroy(spec.session_id)
            raise
        if not reply.get("ok"):
            self.destroy(spec.session_id)
            msg = reply.get("error", "unknown error")
            if reply.get("code") == InvalidRequest.code:
                raise InvalidRequest(msg)
            raise SandboxError(msg if msg.startswith("unable") else f"unable to create sandbox: {msg}")
        self.last_steps = reply.get("steps") or []
        return self.observe(spec.session_id, ping=False)

    # ------------------------------------------------------------------ adjust (a claimed pool sandbox)
    def set_limits(self, sid: str, cpu_limit: float, mem_limit_mb: int, pids_limit: int) -> None:
        """Rewrite the cgroup limits of a running sandbox (creating a cgroup is idempotent)."""
        self.cgroups.create(check_session_id(sid), cgroups_mod.Limits(
            mem_bytes=mem_limit_mb * 1024 * 1024, pids=pids_limit, cpu=cpu_limit))

    def bind_workspace(self, sid: str, workspace_dir: Path) -> None:
        """Mount host dir `workspace_dir` over /workspace inside the running sandbox (done
        by the spawner: namespace work needs a single-threaded process). The shell keeps
        its cwd in the old mount until it runs `cd /workspace` again."""
        pid, st = read_pidfile(self.paths(check_session_id(sid)).pidfile)
        if pid is None or proc_start_time(pid) != st:
            raise SandboxGone(f"unable to bind workspace into sandbox {sid}: its runner is gone")
        reply = self.spawner.request({"op": "mount_workspace", "pid": pid, "start_time": st,
                                      "source": str(Path(workspace_dir).absolute())})
        if not reply.get("ok"):
            msg = reply.get("error", "unknown error")
            raise SandboxError(msg if msg.startswith("unable") else f"unable to bind workspace into {sid}: {msg}")

    # ------------------------------------------------------------------ observe
    def observe(self, sid: str, ping: bool = True) -> Observed:
        p = self.paths(sid)
        if spares.is_live(self.spares_dir, sid):   # the spawner's spare for this id: no sandbox yet
            return Observed(session_id=sid, pid=None, start_time=None, alive=False, answering=False,
                            cgroup=False, populated=False, session_dir=False)
        pid, st = read_pidfile(p.pidfile)
        alive = pid is not None and proc_start_time(pid) == st
        answering = False
        if alive and ping:
            try:
                answering = bool(client.call(p.socket, {"op": "ping"}, timeout=2).get("ok"))
            except (SandboxGone, OSError, ValueError):
                answering = False
        exists = self.cgroups.exists(sid)
        return Observed(session_id=sid, pid=pid, start_time=st, alive=alive, answering=answering or
                        (alive and not ping), cgroup=exists,
                        populated=exists and self.cgroups.populated(sid), session_dir=p.root.exists())

    async def aobserve_all(self, sids: list[str], concurrency: int = 64) -> dict[str, Observed]:
        """`observe` for many sandboxes at once (a restart adopting every live session): the
        files and /proc on a thread, the pings concurrently over the event loop (each answered
        connection is kept for the next call)."""
        seen = await asyncio.to_thread(lambda: {sid: self._observe_quick(sid) for sid in sids})
        gate = asyncio.Semaphore(concurrency)

        async def ping(sid: str) -> tuple[str, bool]:
            async with gate:
                try:
                    reply = await client.acall(self.paths(sid).socket, {"op": "ping"}, timeout=2)
                except (TimeoutError, SandboxGone, OSError, ValueError):
                    return sid, False
            return sid, bool(reply.get("ok"))

        answering = dict(await asyncio.gather(*(ping(sid) for sid, obs in seen.items() if obs.alive)))
        return {sid: replace(obs, answering=answering.get(sid, False)) for sid, obs in seen.items()}

    def _observe_quick(self, sid: str) -> Observed:
        """`observe` without the ping, and for a live runner without looking for leftovers
        (cgroup, dirs): those only matter for a sandbox whose runner is gone."""
        p = self.paths(sid)
        pid, st = read_pidfile(p.pidfile)
        if pid is None or proc_start_time(pid) != st:
            return self.observe(sid, ping=False)
        return Observed(session_id=sid, pid=pid, start_time=st, alive=True, answering=True, cgroup=True,
                        populated=True, session_dir=True)

    def remove_all(self, workers: int = 1) -> None:
        """Everything of this data_dir left on the host once its daemons are stopped or killed:
        the disks gone daemons had made ahead, then every sandbox (`workers` at a time). For
        test, bench and crash-test teardowns. Tries every sandbox; raises the first failure."""
        self.ready_disks.sweep()
        failures: list[SandboxError] = []

        def destroy(sid: str) -> None:
            try:
                self.destroy(sid)
            except SandboxError as e:
                failures.append(e)

        with ThreadPoolExecutor(max(1, workers)) as pool:
            list(pool.map(destroy, sorted(self.host_sessions())))
        if failures:
            raise failures[0]

    def host_sessions(self) -> set[str]:
        """Every session id of this data_dir that has any trace on the host: dirs, sockets,
        veths tagged with this data_dir, cgroups. A cgroup under the parent counts only if this
        data_dir knows its session (`create` makes the dirs before the cgroup, `destroy` removes
        the cgroup first, exec logs stay): a parent shared with another daemon's data_dir holds
        groups that are not ours to sweep."""
        found: set[str] = set(network_mod.leftover_sessions(self.layout.data_dir))
        for base in (self.layout.sessions, self.layout.run):
            if base.is_dir():
                found.update(e.name for e in base.iterdir() if e.is_dir())
        found.update(n for n in self.cgroups.names() if SESSION_ID.match(n) and (self.layout.logs / n).is_dir())
        return {sid for sid in found if SESSION_ID.match(sid)} - spares.live(self.spares_dir)

    # ------------------------------------------------------------------ exec
    def _exec_msg(self, req: ExecRequest, fresh: bool = False) -> dict:
        check_exec_id(req.exec_id)
        if "\0" in req.cmd:
            raise InvalidRequest("invalid cmd: contains a NUL byte")
        msg = {"op": "exec", "id": req.exec_id, "cmd": req.cmd, "timeout_ms": req.timeout_ms, "wait": True}
        if fresh:   # never sent to any runner before: it need not look the id up
            msg["fresh"] = True
        return msg

    def exec(self, sid: str, req: ExecRequest) -> ExecResult:
        reply = client.call(self.paths(sid).socket, self._exec_msg(req),
                            timeout=req.timeout_ms / 1000 + EXEC_GRACE_S)
        return _result(sid, req.exec_id, reply)

    async def aexec(self, sid: str, req: ExecRequest, on_started=None, ack_after_ms: int = 0,
                    fresh: bool = False) -> ExecResult:
        """Run (or re-attach to: exec ids run at most once) an exec; `on_started` is called
        when the runner confirms the command was handed to the shell — with `ack_after_ms`,
        only if it is still running that long after (the reply then says `"delayed": true`;
        a runner from before that option confirms at once). `fresh`: the exec id was just
        journaled and never sent before (the runner skips looking it up)."""
        msg = self._exec_msg(req, fresh)
        msg["ack"] = on_started is not None
        if on_started is not None and ack_after_ms:
            msg["ack_after_ms"] = ack_after_ms
        reply = await client.acall(self.paths(sid).socket, msg, timeout=req.timeout_ms / 1000 + EXEC_GRACE_S,
                                   on_running=on_started)
        return _result(sid, req.exec_id, reply)

    async def aset_env(self, sid: str, env: dict[str, str]) -> None:
        """Variables the runner gives every later shell of this sandbox (the running one is
        told with `export` by the caller)."""
        reply = await client.acall(self.paths(sid).socket, {"op": "env", "set": dict(env)})
        if not reply.get("ok"):
            raise SandboxError(f"unable to set the environment of sandbox {sid}: {reply.get('message')}")

    async def astatus(self, sid: str, exec_id: str, wait: bool = False, timeout: float = 10.0) -> dict:
        """The runner's record of an exec: state unknown | running | finished | lost."""
        check_exec_id(exec_id)
        return await client.acall(self.paths(sid).socket, {"op": "wait" if wait else "status", "id": exec_id},
                                  timeout=timeout)

    async def aprocess(self, sid: str, msg: dict, timeout: float | None = 10.0) -> dict:
        """One process op (`proc_start`, `proc_write`, `proc_wait`, …) on the sandbox's runner."""
        check_exec_id(msg.get("id", "x"))
        return await client.acall(self.paths(sid).socket, msg, timeout=timeout)

    def read_process_result(self, sid: str, process_id: str) -> dict | None:
        """An exited process's result from disk (works after the sandbox is gone)."""
        check_exec_id(process_id)
        return results.find(self.paths(sid).logs, process_id)

    def read_result(self, sid: str, exec_id: str) -> ExecResult | None:
        """A finished exec's result from disk (works after the sandbox is gone)."""
        check_exec_id(exec_id)
        meta = results.find(self.paths(sid).logs, exec_id)
        return ExecResult.from_meta(meta) if meta is not None and meta.get("state") == "finished" else None

    def read_output(self, sid: str, exec_id: str, limit: int | None = None) -> tuple[bytes, bytes, bytes, bool]:
        """stdout, stderr, both interleaved (each cut at `limit`) and whether anything was cut,
        from the exec's log on disk."""
        check_exec_id(exec_id)
        try:
            return protocol.read_output(self.paths(sid).logs / f"{exec_id}.log", limit)
        except FileNotFoundError:
            return b"", b"", b"", False

    def has_exec_logs(self, sid: str) -> bool:
        """Whether any exec ever ran in this sandbox (its runner's ledger has a start, or it
        wrote a log): proof that a journal which does not know the session lost it."""
        try:
            with os.scandir(self.paths(sid).logs) as entries:  # closed also when any() stops early
                return any(e.name.endswith(".log") or (e.name == results.LEDGER and e.stat().st_size > 0)
                           for e in entries)
        except OSError:
            return False

    def remove_logs(self, sids: list[str]) -> int:
        """Remove the exec logs of these (ended) sessions; how many log dirs went. Never one whose
        sandbox still has traces on the host."""
        removed = 0
        for sid in sids:
            p = self.paths(sid)
            if not p.logs.is_dir() or p.root.exists() or p.run.exists():
                continue
            self._remove_tree(p.logs)
            removed += 1
        return removed

    # ------------------------------------------------------------------ teardown
    def destroy(self, sid: str) -> None:
        """network (veth, nft entries) → cgroup kill → wait empty → unmount leftovers → rmdir
        cgroups → remove dirs. Safe to repeat after a crash at any line. Keeps the exec logs."""
        p = self.paths(sid)
        network_mod.detach(sid, p.network_marker, self.network)
        if self.cgroups.exists(sid):
            self.cgroups.kill(sid)
        pid, st = read_pidfile(p.pidfile)
        if pid is not None and proc_start_time(pid) == st:  # outside its cgroup?! kill by pid
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        for mnt in mounts_under(p.root):
            from sandkasten.runtime import syscalls
            syscalls.umount(mnt, syscalls.MNT_DETACH)
        if self.cgroups.exists(sid):
            self.cgroups.remove(sid)
        for d in (p.root, p.run):
            self._remove_tree(d)

    def _remove_tree(self, d: Path) -> None:
        base = self.layout.data_dir.resolve()
        real = d.resolve()
        if base not in real.parents or real == base:
            raise SandboxError(f"refusing to remove {d}: outside data_dir {base}")
        if mounts_under(real):
            raise SandboxError(f"refusing to remove {d}: something is still mounted below it")
        shutil.rmtree(real, ignore_errors=not real.exists())


def _result(sid: str, exec_id: str, reply: dict) -> ExecResult:
    if not reply.get("ok"):
        if reply.get("error") == "busy":
            raise SessionBusy(f"unable to exec in session {sid}: {reply.get('message')}")
        raise SandboxError(f"unable to exec {exec_id} in session {sid}: {reply.get('message')}")
    if reply.get("state") == "finished":
        return ExecResult.from_meta(reply)
    if reply.get("state") == "lost":
        raise SandboxGone(f"exec {exec_id} in session {sid} is lost: {reply.get('reason')}")
    raise CommandTimeout(f"exec {exec_id} in session {sid} did not finish in time (state {reply.get('state')})")


def read_pidfile(path: Path) -> tuple[int | None, int | None]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            pid, st = os.read(fd, 64).split()
        finally:
            os.close(fd)
        return int(pid), int(st)
    except (OSError, ValueError):
        return None, None
