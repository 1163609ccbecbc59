"""The executor follows the journal and acts on the kernel, then journals what it observed.

Who runs this: the daemon, on its event loop. Every unit of work is keyed (a session to
start, an exec to run, a session to tear down) and idempotent: `ensure_*` returns the one
task in flight for that key or starts it. The service (`sandkasten.service`, for the HTTP
handlers) calls `ensure_*` right after appending an intent (so a request waits for its own
work); `follow` finds intents other writers appended (the CLI) and the reconciler hands over
what a crash left pending.
"""

from __future__ import annotations

import functools
import asyncio
import logging
import os
import secrets
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Awaitable, Callable, Mapping

from sandkasten.config import Config
from sandkasten.domain import commands as c
from sandkasten.domain.events import workspace_stream
from sandkasten.domain.workspace import DELETED
from sandkasten.domain.session import DuplicateIdempotencyKey  # noqa: F401 - re-exported for the API
from sandkasten.domain.session import INITIAL_CWD, POOL_CLAIMED, POOL_CLAIMING, RUNNING
from sandkasten.errors import (IllegalTransition, SandboxError, SandkastenError)
from sandkasten.files.workspace_dir import remove_dir
from sandkasten.runtime.sandboxes import Runtime
from sandkasten.runtime.spec import ExecRequest
from sandkasten.store.journal import Journal
from sandkasten.store.journal import now as journal_now

log = logging.getLogger("sandkasten.control.executor")
ACTOR = "executor"
FOLLOW_INTERVAL = 0.2
STARTED_DELAY = 0.02


class Executor:
    def __init__(self, cfg: Config, journal: Journal, runtime: Runtime):
        self.cfg = cfg
        self.journal = journal
        self.runtime = runtime
        self.tasks: dict[str, asyncio.Task] = {}
        self.stopped = False
        self.session_locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self.workspace_locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._seen_seq = -1
        self.cluster: Any = None  # sandkasten.cluster.membership.Membership on a cluster host

    def owns(self, session: dict) -> bool:
        """Whether this daemon acts on the session's sandbox: always on a single host; in a
        cluster only when the session is placed on this host (docs/cluster.md)."""
        return self.cluster is None or self.cluster.owns(session)

    # ------------------------------------------------------------------ keyed work
    def _once(self, key: str, make: Callable[[], Awaitable[Any]]) -> asyncio.Future:
        if self.stopped:  # no new work once a stop began: a cancelled future, as if it had been running
            refused = asyncio.get_running_loop().create_future()
            refused.cancel()
            return refused
        task = self.tasks.get(key)
        if task is None or task.done():
            task = asyncio.ensure_future(make())
            self.tasks[key] = task
            task.add_done_callback(functools.partial(self._done, key))
        return task

    async def stop(self) -> None:
        """Cancel the work in flight and take no more (the daemon is stopping). The kernel side
        carries on: a command keeps running in its sandbox, and the next daemon converges
        from the journal as after a crash."""
        self.stopped = True
        pending = list(self.tasks.values())
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def _done(self, key: str, task: asyncio.Task) -> None:
        if self.tasks.get(key) is task:
            del self.tasks[key]
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if not isinstance(exc, SandkastenError):
                log.error("work %s failed", key, exc_info=exc)

    def ensure_session(self, sid: str, fresh: bool = False) -> asyncio.Future:
        """Have session `sid`'s sandbox created (`fresh`: its request was journaled by this
        process just now under an id nobody used before, so no sandbox of it can exist yet)."""
        if self.cluster is not None:  # placed first; created here or by the host it lands on
            return self._once(f"create:{sid}", lambda: self.cluster.create(sid))
        return self._once(f"create:{sid}", lambda: self._create(sid, fresh))

    def ensure_claimed(self, sid: str) -> asyncio.Future:
        return self._once(f"claim:{sid}", lambda: self._configure(sid))

    def ensure_exec(self, sid: str, exec_id: str, req: ExecRequest | None = None,
                    answering: bool = False) -> asyncio.Future:
        """`answering`: a caller answers its client with the result and then flushes the journal
        (`Journal.flush`), so the exec's end may be journaled right after that answer."""
        return self._once(f"exec:{exec_id}", lambda: self._exec(sid, exec_id, req, answering))

    def ensure_destroyed(self, sid: str) -> asyncio.Future:
        return self._once(f"destroy:{sid}", lambda: self._destroy(sid))

    def busy(self, sid: str) -> bool:
        lock = self.session_locks.get(sid)
        return lock is not None and lock.locked()

    async def record(self, sid: str, command, actor: str = ACTOR) -> bool:
        """Append an observation; False when the session moved on meanwhile (e.g. an exec
        finishing after its session was destroyed) — the journal already says what happened."""
        try:
            await self.journal.execute(sid, command, actor=actor)
            return True
        except IllegalTransition as e:
            log.info("not recorded for %s: %s", sid, e.message)
            return False

    # ------------------------------------------------------------------ create
    def workspace_dir(self, workspace_id: str | None) -> Path | None:
        return self.workspace_path(workspace_id) if workspace_id else None

    def workspace_path(self, workspace_id: str) -> Path:
        return self.cfg.workspaces_dir / workspace_id

    async def _create(self, sid: str, fresh: bool = False) -> None:
        state = await self.journal.session_state(sid)
        if state is None or state.status not in ("requested", "lost"):
            return
        pooled = state.pool is not None
        if not (fresh and state.status == "requested"):   # else nothing to look for (a thread hop less)
            obs = await asyncio.to_thread(self.runtime.observe, sid)
            if obs.healthy:  # created before a crash, never journaled: adopt, don't duplicate
                pid, start_time = obs.identity
                await self.record(sid, c.RecordSandboxStarted(pid=pid, start_time=start_time,
                                                              cgroup=self.runtime.cgroups.parent + "/" + sid,
                                                              pooled=pooled))
                return
            if obs.alive or obs.cgroup or obs.session_dir:
                await asyncio.to_thread(self.runtime.destroy, sid)
        sec = self.cfg.security
        try:
            if state.workspace_id:
                await self.ensure_workspace(state.workspace_id)
            obs = await asyncio.to_thread(lambda: self.runtime.create(self.runtime.spec(   # (the image check too)
                sid, state.image, workspace_dir=self.workspace_dir(state.workspace_id),
                cpu_limit=state.cpu_limit, mem_limit_mb=state.mem_limit_mb, pids_limit=state.pids_limit,
                network_mode=state.network_mode, readonly_rootfs=state.readonly_rootfs,
                disk_limit_mb=self.cfg.defaults.disk_limit_mb,
                egress_allow=tuple(state.egress_allow),
                env=dict(state.env), seccomp=sec.seccomp, uid=sec.run_as_uid, gid=sec.run_as_gid,
                hostname=sid)))
            if state.cwd and state.cwd != INITIAL_CWD:  # recreated after a loss: where the shell was
                await self._restore_cwd(sid, state.cwd)
            pid, start_time = obs.identity
        except SandkastenError as e:
            await self.record(sid, c.RecordSandboxFailed(reason=e.message))
            raise
        await self.record(sid, c.RecordSandboxStarted(pid=pid, start_time=start_time,
                                                      cgroup=self.runtime.cgroups.parent + "/" + sid,
                                                      pooled=pooled))
        if pooled:
            await self._warm(sid)

    async def _warm(self, sid: str) -> None:
        """A pool member runs one `:` before anybody claims it (an internal exec, like the claim's
        shell set-up: not journaled, no trace in the shell): the runner's first request costs
        page faults and the shell's first command, 1-3 ms its client would otherwise wait for."""
        try:
            await self.runtime.aexec(sid, ExecRequest(exec_id="warm-" + secrets.token_hex(6), cmd=":",
                                                      timeout_ms=5_000), fresh=True)
        except SandkastenError as e:
            log.info("warm-up of pool session %s: %s", sid, e.message)

    # ------------------------------------------------------------------ claim (pool)
    async def _configure(self, sid: str) -> bool:
        """Apply a journaled claim to the pool member's running sandbox: cgroup limits, the
        workspace over /workspace, the env exported in its shell. Every step is safe to
        repeat (a crash before `sandbox.configured` makes the next start do it again). If
        it fails the session is destroyed: its client never got it. True once configured."""
        async with self.session_locks[sid]:
            state = await self.journal.session_state(sid)
            if state is None or state.status != RUNNING or state.pool != POOL_CLAIMING:
                return state is not None and state.status == RUNNING and state.pool == POOL_CLAIMED
            try:
                await asyncio.to_thread(self.runtime.set_limits, sid, state.cpu_limit, state.mem_limit_mb,
                                        state.pids_limit)
                if state.workspace_id:
                    await self.ensure_workspace(state.workspace_id)
                    await asyncio.to_thread(self.runtime.bind_workspace, sid, self.workspace_path(state.workspace_id))
                if state.env or state.workspace_id:
                    await self._setup_shell(sid, state.env)
            except SandkastenError as e:
                log.warning("claim of %s failed, destroying it: %s", sid, e.message)
                await self.record(sid, c.RequestDestroy(reason="claim_failed"))
                self.ensure_destroyed(sid)
                raise
            return await self.record(sid, c.RecordSandboxConfigured())

    async def _setup_shell(self, sid: str, env) -> None:
        """`export` the claim's env and `cd` into the (new) /workspace, in the persistent shell.
        An internal command: not a journaled exec (it is part of `sandbox.configured`)."""
        await self.runtime.aset_env(sid, dict(env))  # a restarted shell keeps them too
        # IFS: a shell started with it in its environment resets it, so a fresh sandbox ignores it too
        lines = [f"export {name}={_sh_quote(value)}" for name, value in env.items() if name != "IFS"]
        script = "\n".join([*lines, "cd /workspace"])
        req = ExecRequest(exec_id="claim-" + secrets.token_hex(6), cmd=script, timeout_ms=10_000)
        result = await self.runtime.aexec(sid, req, fresh=True)
        if result.exit_code != 0:
            raise SandboxError(f"unable to set up the shell of claimed session {sid}: exit code {result.exit_code}")

    async def _restore_cwd(self, sid: str, cwd: str) -> None:
        """`cd` the fresh shell of a recreated sandbox to the cwd the journal recorded last (the
        session's env comes back with the spec). An internal command, not a journaled exec; a
        directory that is gone leaves the shell in /workspace."""
        req = ExecRequest(exec_id="restore-" + secrets.token_hex(6), cmd=f"cd {_sh_quote(cwd)} 2>/dev/null; true",
                          timeout_ms=10_000)
        await self.runtime.aexec(sid, req)

    async def ensure_workspace(self, workspace_id: str) -> None:
        """The workspace's directory (owned by the sandbox user) and its `workspace.created`: the
        one place that creates workspaces (a session's create or claim, a file API write)."""
        async with self.workspace_locks[workspace_id]:
            d = self.workspace_path(workspace_id)
            if not d.exists():
                d.mkdir(parents=True, mode=0o755)
                os.chown(d, self.cfg.security.run_as_uid, self.cfg.security.run_as_gid)
            try:
                await self.journal.execute(workspace_stream(workspace_id), c.CreateWorkspace(workspace_id=workspace_id),
                                           actor=ACTOR)
            except IllegalTransition:
                pass  # it exists already

    def ensure_workspace_removed(self, workspace_id: str) -> asyncio.Future:
        """Remove the directory of a workspace the journal says is deleted (nothing if it was
        created again since)."""
        return self._once(f"rmws:{workspace_id}", lambda: self._remove_workspace(workspace_id))

    async def _remove_workspace(self, workspace_id: str) -> None:
        async with self.workspace_locks[workspace_id]:
            state = await self.journal.workspace_state(workspace_stream(workspace_id))
            if state is None or state.status != DELETED:
                return
            try:
                await asyncio.to_thread(remove_dir, self.cfg.workspaces_dir, workspace_id)
            except SandkastenError as e:
                log.warning("%s", e.message)
                raise

    # ------------------------------------------------------------------ exec
    async def _exec(self, sid: str, exec_id: str, req: ExecRequest | None = None,
                    answering: bool = False) -> Observed | None:
        """Run one journaled exec (or re-attach to it: the runner runs an exec id at most once)
        and journal its end; returns what `exec.finished` says (payload, time). With `req` the
        caller has just journaled the request, so there is nothing to read first."""
        async with self.session_locks[sid]:  # one command at a time per shell, in request order
            already_started, fresh = False, req is not None
            if req is None:
                row = await self.journal.exec(exec_id)
                if row is None or row["status"] not in ("requested", "running"):
                    return None
                req = ExecRequest(exec_id=exec_id, cmd=row["cmd"], timeout_ms=row["timeout_ms"])
                already_started = row["status"] == "running"
            mark = _StartedMark(self, sid, exec_id, already_started)
            try:
                result = await self.runtime.aexec(sid, req, on_started=mark.observed,
                                                  ack_after_ms=int(STARTED_DELAY * 1000), fresh=fresh)
            except SandkastenError as e:
                mark.drop()
                await self.record(sid, c.RecordExecLost(exec_id=exec_id, reason=e.message))
                raise
            if result.log_error:  # the output is cut short on disk; the operator must hear of it
                log.warning("exec %s in session %s: unable to write its output log under %s: %s%s; output "
                            "truncated", exec_id, sid, self.runtime.paths(sid).logs, result.log_error,
                            " (disk full)" if result.log_error in ("ENOSPC", "EDQUOT") else "")
            finished = c.RecordExecFinished(
                exec_id=exec_id, exit_code=result.exit_code, cwd=result.cwd,
                duration_ms=round(result.duration_ms, 3), stdout_bytes=result.stdout_bytes,
                stderr_bytes=result.stderr_bytes, output_sha256=result.output_sha256,
                truncated=result.truncated, timed_out=result.timed_out, oom_kills=result.oom_kills)
            commands = [*await mark.take(), finished]
            at = journal_now()
            deferred = self.journal.defer_all(sid, commands, actor=ACTOR, at=at) if answering else None
            if deferred is not None:  # journaled right after the caller answers (see Journal.defer_all)
                commit, planned = deferred
                commit.add_done_callback(lambda done: _log_unrecorded(sid, exec_id, done))
                return Observed(payload=planned[-1].payload, created_at=at)
            try:
                recorded = await self.journal.execute_all(sid, commands, actor=ACTOR)
            except IllegalTransition as e:  # the session ended meanwhile; the journal says how
                log.info("not recorded for %s: %s", sid, e.message)
                return None
            return Observed(payload=recorded[-1].payload, created_at=recorded[-1].created_at)

    # ------------------------------------------------------------------ destroy
    async def _destroy(self, sid: str) -> None:
        state = await self.journal.session_state(sid)
        if state is None or state.status == "destroyed":
            return
        if state.status != "destroying":
            return
        await asyncio.to_thread(self.runtime.destroy, sid)
        if not state.sandbox_stopped:
            await self.record(sid, c.RecordSandboxStopped())
        await self.record(sid, c.RecordSessionDestroyed())
        self.session_locks.pop(sid, None)

    # ------------------------------------------------------------------ follow
    async def catch_up(self) -> None:
        """Start every piece of work the journal asks for that is not in flight."""
        mine = set()
        for s in await self.journal.sessions():
            if not self.owns(s):
                continue
            mine.add(s["id"])
            if s["status"] == "requested":
                self.ensure_session(s["id"])
            elif s["status"] == "running" and s["pool"] == POOL_CLAIMING:
                self.ensure_claimed(s["id"])
            elif s["status"] == "destroying":
                self.ensure_destroyed(s["id"])
        for e in await self.journal.pending_execs():
            if self.cluster is None or e["session_id"] in mine:
                self.ensure_exec(e["session_id"], e["id"])

    async def follow(self) -> None:
        while True:
            try:
                seq = await self.journal.last_seq()
                if seq != self._seen_seq:
                    self._seen_seq = seq
                    await self.catch_up()
            except SandkastenError as e:
                log.warning("follow: %s", e.message)
            await asyncio.sleep(FOLLOW_INTERVAL)


@dataclass(frozen=True)
class Observed:
    """The end of an exec as journaled (or about to be, right after the caller answers)."""

    payload: Mapping[str, Any]
    created_at: str


def _log_unrecorded(sid: str, exec_id: str, done: asyncio.Future) -> None:
    if done.cancelled():
        return
    exc = done.exception()
    if isinstance(exc, SandkastenError):
        log.info("end of exec %s not recorded for %s: %s", exec_id, sid, exc.message)
    elif exc is not None:
        log.error("end of exec %s not recorded for %s", exec_id, sid, exc_info=exc)


def _sh_quote(value: str) -> str:
    """A POSIX shell single-quoted word: `it's` -> 'it'\''s'."""
    return "'" + value.replace("'", "'\\''") + "'"


class _StartedMark:
    """`exec.started` is journaled once the runner confirms the command runs — unless the
    command finishes within STARTED_DELAY: then `exec.started` and `exec.finished` (both
    observed) go into one commit, which keeps a commit off the path of every short exec.
    The runner waits out the delay itself (`ack_after_ms`), so a short exec is one answer;
    a runner from before that option confirms at once and a timer waits instead."""

    def __init__(self, executor: Executor, sid: str, exec_id: str, already: bool):
        self.executor, self.sid, self.exec_id = executor, sid, exec_id
        self.state = "recorded" if already else "unseen"
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task | None = None

    def observed(self, reply: dict) -> None:
        if self.state != "unseen":
            return
        self.state = "pending"
        if reply.get("delayed"):   # the runner waited out STARTED_DELAY already
            self._due()
        else:
            self.timer = asyncio.get_running_loop().call_later(STARTED_DELAY, self._due)

    def _due(self) -> None:
        self.timer = None
        self.state = "recording"
        self.task = asyncio.ensure_future(self._record())

    async def _record(self) -> None:
        await self.executor.record(self.sid, c.RecordExecStarted(exec_id=self.exec_id))
        self.state = "recorded"

    async def take(self) -> list:
        """What still has to be journaled before the exec's end."""
        if self.state == "pending":
            self.drop()
            return [c.RecordExecStarted(exec_id=self.exec_id)]
        if self.state == "recording" and self.task is not None:
            await asyncio.shield(self.task)
        return []

    def drop(self) -> None:
        if self.state == "pending" and self.timer is not None:
            self.timer.cancel()
            self.state = "dropped"
