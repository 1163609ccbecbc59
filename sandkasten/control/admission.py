"""Admission: how many sessions, and how much memory in all, this daemon grants.

Who runs this: the API (create), the pool (refill) and the CLI (create), right before they
journal a `session.requested`. Every session not ended counts — running, starting, lost,
being destroyed, idle pool members — since each holds or may soon hold its memory limit,
cgroup, overlay and log files. Refusals are `CapacityExceeded` (HTTP 429), naming the limit.
A lock taken around check-and-append keeps concurrent creates in one daemon from overshooting.
"""

from __future__ import annotations

import asyncio
import functools
import weakref

from sandkasten.config import Config
from sandkasten.domain import commands as c
from sandkasten.errors import CapacityExceeded

_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()


@functools.cache
def host_memory_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 0


def total_mem_limit_mb(cfg: Config) -> int:
    """limits.max_total_mem_mb, or twice the host's memory when 0 (limits are maxima, rarely all used)."""
    return cfg.limits.max_total_mem_mb or 2 * host_memory_mb()


def check(cfg: Config, held: int, granted: int, cmd: c.RequestSession) -> None:
    """Refuse `cmd` if granting it would pass max_sessions or the total memory limit (`held`
    sessions not ended, `granted` MB of memory to them)."""
    limit = cfg.limits.max_sessions
    if held + 1 > limit:
        raise CapacityExceeded(f"unable to create session: this daemon already holds {held} sessions "
                               f"(limits.max_sessions is {limit}); end some first", limit=limit, in_use=held)
    mem_limit = total_mem_limit_mb(cfg)
    if mem_limit and granted + cmd.mem_limit_mb > mem_limit:
        raise CapacityExceeded(f"unable to create session: {cmd.mem_limit_mb} MB more memory would grant "
                               f"{granted + cmd.mem_limit_mb} MB in all, above limits.max_total_mem_mb "
                               f"({mem_limit} MB); ask for less or end some sessions",
                               limit_mb=mem_limit, granted_mb=granted, requested_mb=cmd.mem_limit_mb)


async def admitted(cfg: Config, journal, sid: str, cmd: c.RequestSession, *, actor: str,
                   request_id: str | None = None):
    """Check and journal `cmd` as one step within this process (the events appended)."""
    lock = _locks.setdefault(asyncio.get_running_loop(), asyncio.Lock())
    async with lock:
        held, granted = await journal.holdings()
        check(cfg, held, granted, cmd)
        return await journal.execute(sid, cmd, actor=actor, request_id=request_id)
