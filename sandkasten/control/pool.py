"""The pre-warmed pool: sandboxes made ahead of time, handed out by `POST /v1/sessions`.

Who runs this: the daemon, on its event loop. The journal stays the only truth: a pool
member is an ordinary session stream, requested by actor "pool" with `pool: true`, created,
adopted after a restart, reaped and swept like any other. Only its `pool` marker differs:

    idle ──session.claimed──> claiming ──sandbox.configured──> claimed

- **claim** (`claim`): pick a running idle member of the image and append `session.claimed`
  with the client's limits, env, workspace and TTL. `decide` refuses a second claim of the
  same member, so two concurrent creates never share one; the loser tries the next member.
  The claim is durable before the executor touches the sandbox (`Executor._configure`) and
  before the client hears the id; a crash in between is finished by the next start.
- **refill** (`run`): keep `idle members (requested, running or lost) == target` per image.
  A member counts from the moment it is requested, so a creation in flight is counted and
  the pool never overshoots; one coroutine does all refilling, and claims only lower the count.
- **trim** (at start): idle members beyond the configured target (a smaller `pool.images`,
  a dropped image, `pool.enabled: false`) are destroyed, and so are members made under another
  config: other `defaults.network_mode` or `defaults.readonly_rootfs` (their journaled fields
  say so), or another `security` or `network` section (`run/pool-shape.json` keeps the one
  in force when they were made). A claim would hand them out as what the client asked for.

A request the pool cannot serve exactly gets a cold sandbox: every `RequestSession` field
that a claim cannot change (image, network mode, read-only root, and any field added later)
must equal what the pool made. Idle members are hidden from `GET /v1/sessions` and
`sandkasten ps` (shown with `?all=true` / `--all`), refuse execs and file access until
claimed, have the longest TTL (`limits.max_ttl_seconds`, then they are replaced by fresh
ones) and are never expired as idle. Stopping the daemon leaves them running for the next start.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import functools
import os
import time
from collections import Counter, defaultdict
from datetime import datetime, timedelta, UTC

import msgspec

from sandkasten import intake

from sandkasten.control import admission
from sandkasten.config import Config
from sandkasten.domain import commands as c
from sandkasten.domain.session import RUNNING
from sandkasten.errors import CapacityExceeded, IllegalTransition, SandkastenError
from sandkasten.control.executor import Executor

log = logging.getLogger("sandkasten.control.pool")
ACTOR = "pool"
REFILL_INTERVAL = 1.0   # seconds between checks when nothing wakes the refill earlier
REFILL_DELAY = 0.2      # after a claim: let the client's first commands run before the refill competes
MAX_BACKOFF = 60.0      # after repeated creation failures of one image
# RequestSession fields a claim sets on an existing sandbox; every other field must match
ADJUSTABLE = frozenset({"cpu_limit", "mem_limit_mb", "pids_limit", "env", "ttl_seconds", "expires_at",
                        "workspace_id", "session_id", "pool"})


class Pool:
    def __init__(self, cfg: Config, executor: Executor):
        self.cfg = cfg
        self.executor = executor
        self.journal = executor.journal
        self.targets: dict[str, int] = dict(cfg.pool.images) if cfg.pool.enabled else {}
        self.ready = False  # claims wait until the start-up trim is done
        self._wake = asyncio.Event()
        self._failures: Counter[str] = Counter()
        self._retry_at: dict[str, float] = {}

    # ------------------------------------------------------------------ what a member is
    def template(self, image: str, now: datetime | None = None) -> c.RequestSession:
        """The request a pool member of `image` is made from: the configured defaults."""
        d, ttl = self.cfg.defaults, self.cfg.limits.max_ttl_seconds
        now = now or datetime.now(UTC)
        return c.RequestSession(
            image=image, cpu_limit=d.cpu_limit, mem_limit_mb=d.mem_limit_mb, pids_limit=d.pids_limit,
            network_mode=d.network_mode, env={}, ttl_seconds=ttl, workspace_id=None,
            readonly_rootfs=d.readonly_rootfs, expires_at=now + timedelta(seconds=ttl), pool=True)

    def servable(self, cmd: c.RequestSession) -> bool:
        if not self.ready or self.targets.get(cmd.image, 0) <= 0:
            return False
        made = self.template(cmd.image)
        return all(getattr(cmd, f.name) == getattr(made, f.name)
                   for f in dataclasses.fields(c.RequestSession) if f.name not in ADJUSTABLE)

    def fits(self, row: dict) -> bool:
        """An idle member (a `sessions` row) is what the current config would make: a member
        made before a restart under other defaults is not (e.g. a writable root where
        `defaults.readonly_rootfs` is now true)."""
        made = self.template(row["image"])
        return (row["network_mode"], bool(row["readonly_rootfs"])) == (made.network_mode, made.readonly_rootfs)

    def shape(self) -> str:
        """What makes a member besides its journaled fields: the sandbox's seccomp profile and
        user, its disk size, the bridge and its egress allow-list (changing any needs a restart)."""
        sec = self.cfg.security
        network = msgspec.structs.asdict(self.cfg.network)
        del network["session_egress_within"]  # bounds what clients ask for, not what a member is
        return json.dumps({"seccomp": sec.seccomp, "uid": sec.run_as_uid, "gid": sec.run_as_gid,
                           "disk_limit_mb": self.cfg.defaults.disk_limit_mb, "network": network}, sort_keys=True)

    @property
    def shape_path(self):
        return self.cfg.run_dir / "pool-shape.json"

    def _made_under_this_shape(self) -> bool:
        try:
            return self.shape_path.read_text() == self.shape()
        except OSError:  # unknown (first start, or lost): idle members are remade to be sure
            return False

    def _save_shape(self) -> None:
        self.cfg.run_dir.mkdir(parents=True, mode=0o700, exist_ok=True)
        tmp = self.shape_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.shape())
        os.replace(tmp, self.shape_path)

    # ------------------------------------------------------------------ claim
    async def claim(self, cmd: c.RequestSession, actor: str, request_id: str | None = None) -> str | None:
        """The id of a pool member now configured as `cmd` asks, or None (create a cold one)."""
        if not self.servable(cmd) or cmd.expires_at is None:  # (the cold path says it is required)
            return None
        claim = c.ClaimSession(
            ttl_seconds=cmd.ttl_seconds, expires_at=cmd.expires_at, cpu_limit=cmd.cpu_limit,
            mem_limit_mb=cmd.mem_limit_mb, pids_limit=cmd.pids_limit, env=dict(cmd.env),
            workspace_id=cmd.workspace_id)
        try:
            for row in await self.journal.idle_pool():
                if row["image"] != cmd.image or row["status"] != RUNNING or not self.fits(row):
                    continue
                try:
                    [claimed] = await self.journal.execute(row["id"], claim, actor=actor, request_id=request_id)
                except IllegalTransition:
                    continue  # claimed, expired or lost meanwhile: try the next one
                if claimed.payload.get("configured"):  # nothing in the sandbox to change
                    return row["id"]
                try:  # shielded: a client hanging up must not cut the configuration in half
                    configured = await asyncio.shield(self.executor.ensure_claimed(row["id"]))
                except SandkastenError as e:  # the executor destroys it; the caller goes cold
                    log.warning("unable to hand out pool session %s: %s", row["id"], e.message)
                    return None
                if not configured:  # e.g. its runner died meanwhile
                    await self.executor.record(row["id"], c.RequestDestroy(reason="claim_failed"), actor=ACTOR)
                    self.executor.ensure_destroyed(row["id"])
                    return None
                return row["id"]
        finally:  # one fewer idle member (or none was ready): refill soon
            asyncio.get_running_loop().call_later(REFILL_DELAY, self.wake)
        return None

    # ------------------------------------------------------------------ refill
    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Trim, then refill forever (the daemon cancels this task on stop)."""
        try:
            await self.trim()
        except SandkastenError as e:
            log.warning("pool trim: %s", e.message)
        self.ready = True
        while True:
            self._wake.clear()
            try:
                await self.refill()
            except SandkastenError as e:
                log.warning("pool refill: %s", e.message)
            try:
                await asyncio.wait_for(self._wake.wait(), REFILL_INTERVAL)
            except TimeoutError:
                pass

    async def refill(self) -> int:
        """Request the members missing from each image's target; return how many."""
        if not self.targets:
            return 0
        have = Counter(r["image"] for r in await self.journal.idle_pool())
        now, requested = time.monotonic(), 0
        for image, target in self.targets.items():
            missing = target - have[image]
            if missing <= 0 or self._retry_at.get(image, 0.0) > now:
                continue
            try:
                self.executor.runtime.images.ensure_valid(image)
            except SandkastenError as e:
                self._failed(image, e)
                continue
            for _ in range(missing):
                spare = self.executor.cluster is None and self.template(image).network_mode != "bridge"
                sid = (self.executor.runtime.reserve_id() if spare else None) \
                    or intake.new_session_id()
                try:
                    await admission.admitted(self.cfg, self.journal, sid, self.template(image), actor=ACTOR)
                except CapacityExceeded as e:  # clients come first: the pool waits for room
                    log.info("pool of %s not refilled: %s", image, e.message)
                    return requested
                task = self.executor.ensure_session(sid)
                task.add_done_callback(functools.partial(self._created, image))
                requested += 1
        return requested

    def _created(self, image: str, task: asyncio.Task) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            self._failures.pop(image, None)
        elif isinstance(exc, SandkastenError):
            self._failed(image, exc)
        self.wake()  # a failed member left the count: look again (after the backoff)

    def _failed(self, image: str, e: SandkastenError) -> None:
        self._failures[image] += 1
        delay = min(MAX_BACKOFF, 2.0 ** (self._failures[image] - 1))
        self._retry_at[image] = time.monotonic() + delay
        log.warning("unable to fill the pool of %s (retry in %.0fs): %s", image, delay, e.message)

    # ------------------------------------------------------------------ trim
    async def trim(self) -> int:
        """Destroy idle members that no longer fit the config and those beyond the configured
        targets; running ones are kept first."""
        by_image: dict[str, list[dict]] = defaultdict(list)
        extra: list[dict] = []
        same_shape = self._made_under_this_shape()
        for row in await self.journal.idle_pool():
            (by_image[row["image"]] if same_shape and self.fits(row) else extra).append(row)
        for image, rows in by_image.items():
            rows.sort(key=lambda r: r["status"] != RUNNING)  # stable: oldest running first
            extra += rows[self.targets.get(image, 0):]
        creating = [t for r in extra if (t := self.executor.tasks.get(f"create:{r['id']}"))]
        await asyncio.gather(*creating, return_exceptions=True)  # never tear down mid-create
        removed = 0
        for row in extra:
            if await self.executor.record(row["id"], c.RequestDestroy(reason="pool_trim"), actor=ACTOR):
                self.executor.ensure_destroyed(row["id"])
                removed += 1
        try:  # after the destroys are journaled: a crash before this line trims again, harmlessly
            self._save_shape()
        except OSError as e:
            log.warning("unable to write %s: %s (idle pool members will be remade at the next start)",
                        self.shape_path, e)
        if removed:
            log.info("pool: removed %d idle sandbox(es) beyond the configured targets or made under "
                     "another config", removed)
        return removed
