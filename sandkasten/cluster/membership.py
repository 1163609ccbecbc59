"""This daemon as one host of a cluster: register, heartbeat, place sessions, recover the
sessions of hosts that died.

Who runs this: the daemon, on its event loop, when the journal is shared (PostgreSQL).

- `join()` at start, before the startup reconcile: journal `host.registered` (a new epoch),
  set the journal's fence to (host_id, epoch), and move this host's own live sessions from its
  older epochs to the new one (a restart keeps its sandboxes; a host that was declared lost
  only gets back what nobody re-placed meanwhile).
- `beat()` every `cluster.heartbeat_seconds`: `host.heartbeat`; a refused heartbeat means this
  host was declared lost (fenced): it joins again under a new epoch, and the reconciler's
  orphan sweep removes the sandboxes of sessions now placed elsewhere. The same pass looks at
  the peers (once this host has itself beaten for a whole timeout): a live host whose
  heartbeat is older than `cluster.host_timeout_seconds` is journaled `host.lost`
  (compare-and-set on its epoch: one node wins), and every node then recovers the sessions
  still placed on lost hosts, level-based: `sandbox.lost`, pending execs `exec.lost` (their
  fate cannot be known: nothing is run twice), then the policy — `recreate` places them on
  a live host (whose executor creates them), `fail` ends them.
- `create(sid)` (the executor's keyed create in a cluster): place the session if it is not
  yet (least loaded live host with room, `placement.choose`), create it here if it landed
  here, else wait until its host has started it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from datetime import UTC, datetime
from typing import Any

from sandkasten import install
from sandkasten.cluster import placement
from sandkasten.config import Config
from sandkasten.domain import commands as c
from sandkasten.domain import host as h
from sandkasten.errors import IllegalTransition, SandkastenError
from sandkasten.schema.vocabulary import SESSION_ENDED, SessionStatus

log = logging.getLogger("sandkasten.cluster")
REMOTE_CREATE_WAIT_S = 120.0


def _now() -> datetime:
    return datetime.now(UTC)


def _mem_mb() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 1024


class Membership:
    def __init__(self, cfg: Config, executor: Any):
        self.cfg = cfg
        self.executor = executor
        self.journal = executor.journal
        self.runtime = executor.runtime
        self.host_id = cfg.host_id
        self.epoch: int | None = None
        self.tick = Tick()            # bumped by the follower on every append it is told of
        self.reconciler: Any = None   # set by the daemon: a fenced host reconciles again after rejoining
        self.beating_since: datetime | None = None  # first of this host's unbroken run of heartbeats
        self.last_beat: datetime | None = None
        self.actor = f"host:{self.host_id}"

    # ------------------------------------------------------------------ joining
    async def join(self) -> int:
        cl = self.cfg.cluster
        cmd = h.RegisterHost(
            host_id=self.host_id, address=self.cfg.advertise_address, at=_now().isoformat(),
            cgroup_parent=install.cgroup_parent(self.cfg), max_sessions=cl.max_sessions,
            cpu=float(os.cpu_count() or 1),
            mem_mb=_mem_mb(), images=tuple(self.runtime.images.names()))
        [event] = await self.journal.execute(h.host_stream(self.host_id), cmd, actor=self.actor)
        self.epoch = event.payload["epoch"]
        self.journal.fence = (self.host_id, self.epoch)
        moved = 0
        for row in await self.journal.sessions():
            if row["host_id"] == self.host_id and row["host_epoch"] != self.epoch:
                moved += await self._place(row["id"], self.host_id, self.epoch,
                                           (row["host_id"], row["host_epoch"]), "restart")
        log.info("host %s joined the cluster, epoch %d (%d sessions carried over)", self.host_id, self.epoch, moved)
        return self.epoch

    def owns(self, row: dict) -> bool:
        return row.get("host_id") == self.host_id

    # ------------------------------------------------------------------ heartbeat and peers
    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.cluster.heartbeat_seconds)
            try:
                await self.beat()
            except SandkastenError as e:
                self.beating_since = None
                log.warning("heartbeat: %s", e.message)

    async def beat(self) -> None:
        rows = await self.journal.sessions()
        mine = sum(1 for r in rows if self.owns(r))
        try:
            await self.journal.execute(h.host_stream(self.host_id), h.RecordHeartbeat(
                epoch=self.epoch or 0, at=_now().isoformat(), sessions=mine), actor=self.actor)
        except h.HostFenced as e:
            if e.details.get("status") == h.LIVE:  # not declared lost: a newer registration of our id
                log.error("host %s: another daemon registered with the same host_id (epoch %s); give each "
                          "daemon its own cluster.host_id", self.host_id, e.details.get("epoch"))
            log.warning("host %s was fenced (%s): joining again", self.host_id, e.message)
            self.beating_since = None
            await self.join()
            if self.reconciler is not None:  # adopt what is still ours, remove copies placed elsewhere
                await self.reconciler.startup()
        now = _now()
        if self.beating_since is None or self.last_beat is None \
                or (now - self.last_beat).total_seconds() > self.cfg.cluster.host_timeout_seconds / 2:
            self.beating_since = now  # a first beat, or one after a gap: the journal (or we) stalled
        self.last_beat = now
        await self.check_peers()

    async def check_peers(self) -> None:
        now = _now()
        timeout = self.cfg.cluster.host_timeout_seconds
        # Only a host that has itself been beating, without a gap, for a whole timeout judges the
        # others: after a stall of the journal (or of this host) every heartbeat is stale at
        # once, and the others need a timeout's time to beat again before anyone is declared lost.
        if self.beating_since is None or (now - self.beating_since).total_seconds() < timeout:
            await self.recover()
            return
        for host in await self.hosts():
            if host["id"] == self.host_id or host["status"] != h.LIVE:
                continue
            age = (now - datetime.fromisoformat(host["heartbeat_at"])).total_seconds()
            if age > timeout:
                try:
                    await self.journal.execute(h.host_stream(host["id"]), h.DeclareHostLost(
                        epoch=host["epoch"], reason=f"no heartbeat for {age:.0f}s", at=now.isoformat()),
                        actor=self.actor)
                    log.warning("host %s declared lost: no heartbeat for %.0fs", host["id"], age)
                except IllegalTransition:
                    pass  # another node did, or it came back
        await self.recover()

    async def recover(self) -> None:
        """Level-based: every session still placed on a lost host gets the policy."""
        lost = {r["id"]: r for r in await self.hosts() if r["status"] == h.LOST}
        if not lost:
            return
        for row in await self.journal.sessions():
            host = lost.get(row["host_id"])
            if host is None or row["status"] in SESSION_ENDED:
                continue
            await self._recover_session(row, host)

    async def _recover_session(self, row: dict, host: dict) -> None:
        sid = row["id"]
        reason = f"host {host['id']} was lost ({host['lost_reason']})"
        if row["status"] == SessionStatus.RUNNING:
            await self.executor.record(sid, c.RecordSandboxLost(reason=reason), actor=self.actor)
        if row["status"] in (SessionStatus.RUNNING, SessionStatus.LOST, SessionStatus.REQUESTED):
            state = await self.journal.session_state(sid)
            for exec_id in (state.pending_exec_ids if state else []):
                await self.executor.record(sid, c.RecordExecLost(
                    exec_id=exec_id, reason=f"{reason}: the command's fate is unknown"), actor=self.actor)
            for process_id in (list(state.processes) if state else []):
                await self.executor.record(sid, c.RecordProcessLost(
                    process_id=process_id, reason=f"{reason}: the process's fate is unknown"), actor=self.actor)
        if row["status"] == SessionStatus.DESTROYING:
            return  # its sandbox is on the lost host: that host finishes the teardown when it is back
        expected = (row["host_id"], row["host_epoch"])
        if self.cfg.reconcile.lost_sandbox_policy == "recreate" or row["status"] == SessionStatus.REQUESTED:
            try:
                target = await self.choose(row, exclude=(host["id"],))
            except placement.NoHostAvailable as e:
                log.warning("unable to recreate %s: %s", sid, e.message)
                return
            placed = await self._place(sid, target["id"], target["epoch"], expected, "recreate")
            if placed and target["id"] == self.host_id:  # our follower skips our own appends
                self.executor.ensure_session(sid)
        else:
            await self.executor.record(sid, c.RecordSandboxFailed(reason=f"{reason}; policy is fail"),
                                       actor=self.actor)

    # ------------------------------------------------------------------ placement and create
    async def hosts(self) -> list[dict]:
        return await self.journal.hosts()

    async def choose(self, row: dict, exclude: tuple[str, ...] = ()) -> dict:
        loads: dict[str, placement.Load] = {}
        for s in await self.journal.sessions():
            if s["host_id"] and s["id"] != row["id"]:
                load = loads.get(s["host_id"], placement.Load())
                loads[s["host_id"]] = placement.Load(load.sessions + 1, load.mem_mb + s["mem_limit_mb"])
        need = placement.Need(image=row["image"], cpu_limit=row["cpu_limit"], mem_limit_mb=row["mem_limit_mb"])
        return dict(placement.choose(await self.hosts(), loads, need, now=_now(),
                                     timeout_s=self.cfg.cluster.host_timeout_seconds, exclude=exclude))

    async def _place(self, sid: str, host_id: str, epoch: int, expected: tuple, reason: str) -> bool:
        try:
            await self.journal.execute(sid, h.PlaceSession(host_id=host_id, epoch=epoch, expected=expected,
                                                           reason=reason), actor=self.actor)
            return True
        except IllegalTransition as e:  # someone else placed it first: theirs stands
            log.info("not placed: %s", e.message)
            return False

    async def place(self, sid: str) -> dict | None:
        """Place a requested session nobody has placed yet (one node wins the compare-and-set);
        the session's row after. With no host able to take it the session fails, saying why
        (it would wait for ever otherwise), and NoHostAvailable is raised."""
        row = await self.journal.session(sid)
        if row is None or row["status"] != SessionStatus.REQUESTED or row["host_id"] is not None:
            return row
        try:
            target = await self.choose(row)
        except placement.NoHostAvailable as e:
            await self.executor.record(sid, c.RecordSandboxFailed(reason=e.message), actor=self.actor)
            raise
        await self._place(sid, target["id"], target["epoch"], (None, None), "create")
        return await self.journal.session(sid)

    async def create(self, sid: str) -> None:
        row = await self.place(sid)
        if row is None:
            return
        if row["status"] == SessionStatus.FAILED:
            from sandkasten.errors import SandboxError

            raise SandboxError(f"the session failed: {row['end_reason']}", session_id=sid)
        if row["status"] in SESSION_ENDED:
            return
        if self.owns(row):
            await self.executor._create(sid)
            return
        await self.wait_for(sid, lambda r: r is None or r["status"] != SessionStatus.REQUESTED or r["host_id"] is None,
                            REMOTE_CREATE_WAIT_S)
        row = await self.journal.session(sid)
        if row is not None and row["status"] == SessionStatus.FAILED:
            from sandkasten.errors import SandboxError

            raise SandboxError(f"host {row['host_id']} could not start it: {row['end_reason']}", session_id=sid)

    async def wait_for(self, sid: str, done, timeout: float) -> dict | None:
        """Wait (woken by the follower on each append, never polling) until `done(row)`."""
        async def until() -> dict | None:
            while True:
                tick = self.tick.current()  # taken before the read: an append after it wakes us
                row = await self.journal.session(sid)
                if done(row):
                    return row
                await tick.wait()

        try:
            return await asyncio.wait_for(until(), timeout)
        except TimeoutError:
            return await self.journal.session(sid)


class Tick:
    """A wake-up for waiters: `current()` gives an event that is set at the next `bump()`."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def current(self) -> asyncio.Event:
        return self._event

    def bump(self) -> None:
        self._event.set()
        self._event = asyncio.Event()
