"""Reconcile the journal (desired state) with the kernel (observed state), level-based.

Who runs this: the daemon — once fully at start (before /readyz turns green) and then a
light pass every second (dead runners, expired sessions). Observed facts come from the
kernel (pid + start time, cgroup, socket ping), never from read tables. Every step is safe
to repeat after a crash at any line: work is handed to the executor's keyed, idempotent
`ensure_*` calls.

| desired    | observed            | action                                                    |
|------------|---------------------|-----------------------------------------------------------|
| requested  | any                 | executor creates it (adopts it if it exists already)      |
| running    | alive               | after a restart: `sandbox.adopted` once                   |
| running    | dead                | `sandbox.lost`, then recreate or fail, per policy         |
| destroying | alive or partial    | executor tears it down                                    |
| workspace deleted | its directory | executor removes it                                  |
| (none)     | traces on the host  | tear down (orphan: cgroup, dirs, socket) — unless exec    |
|            |                     | logs prove the journal lost it: keep it and say so        |
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from datetime import datetime, UTC
from typing import Any

from sandkasten.config import Config
from sandkasten.domain import commands as c
from sandkasten.domain.session import UNCLAIMED
from sandkasten.errors import IllegalTransition, SandkastenError
from sandkasten.control.executor import Executor
from sandkasten.runtime.procfs import proc_start_time
from sandkasten.runtime.spec import Observed
from sandkasten.schema.vocabulary import SESSION_ENDED, SessionStatus

log = logging.getLogger("sandkasten.control.reconciler")
ACTOR = "reconciler"
RECREATE_WAIT_S = 120.0
PRUNE_EVERY_S = 60.0


class Reconciler:
    def __init__(self, cfg: Config, executor: Executor, processes=None):
        self.cfg = cfg
        self.executor = executor
        self.processes = processes
        self.journal = executor.journal
        self.runtime = executor.runtime
        self.stats: dict[str, Any] = {}
        self._pruned = float("-inf")

    # ------------------------------------------------------------------ startup
    async def startup(self) -> dict:
        t0 = time.monotonic()
        rows = await self.journal.sessions(include_ended=True)
        live = [r for r in rows if r["status"] not in SESSION_ENDED and self.executor.owns(r)]  # a cluster: ours only
        observed = await self.runtime.aobserve_all([r["id"] for r in live])
        t_observed = time.monotonic()
        adopted: list[tuple[str, c.Command]] = [
            (r["id"], _adopted(observed[r["id"]]))
            for r in live if r["status"] == SessionStatus.RUNNING and _same_runner(r, observed[r["id"]])]
        try:  # one commit for all of them: a restart with many live sessions stays fast
            await self.journal.execute_many(adopted, actor=ACTOR)
        except IllegalTransition:  # one moved on meanwhile (e.g. `sandkasten rm`): one by one
            for sid, command in adopted:
                await self.executor.record(sid, command, actor=ACTOR)
        t_adopted = time.monotonic()
        lost = 0
        creating: list[asyncio.Future | None] = []
        for row in live:
            sid, obs, status = row["id"], observed[row["id"]], row["status"]
            if status == SessionStatus.RUNNING:
                if not _same_runner(row, obs):
                    creating.append(await self.sandbox_died(sid, _reason(obs)))
                    lost += 1
            elif status == SessionStatus.LOST:
                creating.append(await self.apply_policy(sid))
            elif status == SessionStatus.REQUESTED:
                creating.append(self.executor.ensure_session(sid))
            elif status == SessionStatus.DESTROYING:
                self.executor.ensure_destroyed(sid)
        for e in await self.journal.pending_execs():
            if e["session_id"] in observed:
                self.executor.ensure_exec(e["session_id"], e["id"])
        deleted = [w["id"] for w in await self.journal.workspaces() if w["deleted_at"] is not None]
        for wid in await asyncio.to_thread(self.leftover_workspaces, deleted):   # a crash before their removal
            self.executor.ensure_workspace_removed(wid)
        if self.processes is not None:   # still running in their sandboxes: follow them again
            await self.processes.resume_all(None if self.executor.cluster is None else set(observed))
        # /readyz is green once lost sandboxes run again (their failures are journaled by the executor)
        pending = [f for f in creating if f is not None]
        if pending:
            await asyncio.wait(pending, timeout=RECREATE_WAIT_S)
        await self.pass_once()  # sessions whose TTL ran out while no daemon was up end before /readyz
        orphans, unknown = await asyncio.to_thread(self.leftovers, {r["id"] for r in rows}, {r["id"] for r in live})
        for sid in unknown:
            log.error("session %s ran commands (its exec logs say so) but the journal does not know it: the "
                      "journal lost it (a truncated WAL? an old backup?); its sandbox is kept, see sandkasten doctor",
                      sid)
        for sid in orphans:
            try:
                await asyncio.to_thread(self.runtime.destroy, sid)
            except (SandkastenError, OSError, ValueError) as e:
                log.warning("unable to remove leftovers of %s: %s", sid, e)
        self.stats = {"sessions": len(live), "adopted": len(adopted), "lost": lost, "orphans_removed": len(orphans),
                      "unknown_to_journal_kept": unknown, "seconds": round(time.monotonic() - t0, 3),
                      "observe_s": round(t_observed - t0, 3), "adopt_s": round(t_adopted - t_observed, 3)}
        log.info("reconciled: %s", self.stats)
        return self.stats

    def leftover_workspaces(self, deleted: list[str]) -> list[str]:
        """Deleted workspaces whose directory is still there."""
        return [wid for wid in deleted if os.path.lexists(self.cfg.workspaces_dir / wid)]

    def leftovers(self, known: set[str], live: set[str]) -> tuple[list[str], list[str]]:
        """Host traces of sessions that should not exist: (to tear down, to keep). A session the
        journal never heard of whose exec logs show it ran commands is proof the journal lost
        it, not an orphan: its sandbox and workspace are kept for an operator to look at."""
        orphans: list[str] = []
        unknown: list[str] = []
        for sid in sorted(self.runtime.host_sessions() - live):
            (unknown if sid not in known and self.runtime.has_exec_logs(sid) else orphans).append(sid)
        return orphans, unknown

    async def sandbox_died(self, sid: str, reason: str) -> asyncio.Future | None:
        """Journal the loss, settle its pending execs from what the runner left on disk, then
        apply the policy (the recreation under way, if any)."""
        await self.executor.record(sid, c.RecordSandboxLost(reason=reason), actor=ACTOR)
        await self.settle_execs(sid)
        if self.processes is not None:
            await self.processes.settle(sid)
        return await self.apply_policy(sid)

    async def settle_execs(self, sid: str) -> None:
        state = await self.journal.session_state(sid)
        for exec_id in (state.pending_exec_ids if state else []):
            result = await asyncio.to_thread(self.runtime.read_result, sid, exec_id)
            if result is not None:  # it finished before the runner died: its result is on disk
                await self.executor.record(sid, c.RecordExecFinished(
                    exec_id=exec_id, exit_code=result.exit_code, cwd=result.cwd,
                    duration_ms=round(result.duration_ms, 3), stdout_bytes=result.stdout_bytes,
                    stderr_bytes=result.stderr_bytes, output_sha256=result.output_sha256,
                    truncated=result.truncated, timed_out=result.timed_out, oom_kills=result.oom_kills),
                    actor=ACTOR)
            else:
                await self.executor.record(sid, c.RecordExecLost(
                    exec_id=exec_id, reason="the sandbox died while the command was pending"), actor=ACTOR)

    async def apply_policy(self, sid: str) -> asyncio.Future | None:
        """Recreate or fail a lost sandbox; the recreation under way, if any."""
        if self.cfg.reconcile.lost_sandbox_policy == "recreate":
            return self.executor.ensure_session(sid)
        else:
            await asyncio.to_thread(self.runtime.destroy, sid)
            await self.executor.record(sid, c.RecordSandboxFailed(reason="sandbox lost; policy is fail"),
                                       actor=ACTOR)
            return None

    # ------------------------------------------------------------------ while running
    async def watch(self, interval: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.pass_once()
            except SandkastenError as e:
                log.warning("watch: %s", e.message)

    async def prune_logs(self) -> int:
        """Remove the exec logs (logs/<sid>) of sessions that ended more than
        limits.log_retention_seconds ago; the journal keeps their events and output hashes.
        Runs at most every PRUNE_EVERY_S (or twice per retention period, if shorter)."""
        keep = self.cfg.limits.log_retention_seconds
        if time.monotonic() - self._pruned < min(PRUNE_EVERY_S, keep / 2):
            return 0
        self._pruned = time.monotonic()
        cutoff = datetime.now(UTC).timestamp() - keep
        old = [r["id"] for r in await self.journal.sessions(include_ended=True)
               if r["status"] in SESSION_ENDED and r["ended_at"] and _parse(r["ended_at"]).timestamp() < cutoff]
        return await asyncio.to_thread(self.runtime.remove_logs, old)

    async def pass_once(self) -> None:
        await self.prune_logs()
        now = datetime.now(UTC)
        for row in await self.journal.sessions():
            sid = row["id"]
            if not self.executor.owns(row):
                continue  # another host's session (a cluster): that host expires and watches it
            if row["status"] not in (*SESSION_ENDED, SessionStatus.DESTROYING) and row["expires_at"] \
                    and _parse(row["expires_at"]) <= now:
                await self.executor.record(sid, c.ExpireSession(reason="ttl", at=now), actor=ACTOR)
                self.executor.ensure_destroyed(sid)
                continue
            idle = self.cfg.idle_timeout_seconds
            if idle and row["status"] == SessionStatus.RUNNING and row["last_activity_at"] \
                    and row["pool"] not in UNCLAIMED \
                    and (now - _parse(row["last_activity_at"])).total_seconds() > idle \
                    and not self.executor.busy(sid):
                await self.executor.record(sid, c.ExpireSession(reason="idle", at=now), actor=ACTOR)
                self.executor.ensure_destroyed(sid)
                continue
            if row["status"] == SessionStatus.RUNNING and row["runner_pid"] \
                    and proc_start_time(row["runner_pid"]) != row["runner_start_time"] \
                    and f"create:{sid}" not in self.executor.tasks:
                await self.sandbox_died(sid, "the runner exited")


def _adopted(obs: Observed) -> c.RecordSandboxAdopted:
    pid, start_time = obs.identity
    return c.RecordSandboxAdopted(pid=pid, start_time=start_time)


def _same_runner(row: dict, obs: Observed) -> bool:
    """The sandbox the journal recorded is alive and answering (pid and start time match)."""
    return obs.healthy and obs.pid == row["runner_pid"] and obs.start_time == row["runner_start_time"]


def _parse(iso: str) -> datetime:
    dt = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def _reason(obs) -> str:
    if obs.pid is None:
        return "no runner pid file: the sandbox is gone"
    if not obs.alive:
        return f"runner pid {obs.pid} is gone (or was reused)"
    return "the runner does not answer on its socket"
