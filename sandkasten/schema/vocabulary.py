"""Statuses and ids, defined once.

Statuses are `StrEnum`s: a member is a `str` equal to its value (`SessionStatus.RUNNING ==
"running"`, same hash, same JSON, same SQL text), so rows read back from the journal as plain
strings compare with them, and payloads and their hash chain are byte-identical to the bare
strings used before. Each kind has one set of the statuses it never leaves (`*_ENDED`).

Ids are `NewType`s over `str`: no runtime cost, a name in signatures. Their patterns are here
too, one per kind of id. Standard library only: the domain, the runtime and the client use it.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import NewType


class SessionStatus(StrEnum):
    """requested -> running -> destroying -> destroyed; running -> lost -> running | destroying;
    requested | lost -> failed."""

    REQUESTED = "requested"
    RUNNING = "running"
    LOST = "lost"
    FAILED = "failed"
    DESTROYING = "destroying"
    DESTROYED = "destroyed"


SESSION_ENDED: frozenset[str] = frozenset({SessionStatus.FAILED, SessionStatus.DESTROYED})


class ExecStatus(StrEnum):
    """requested -> running -> finished | lost (requested -> finished | lost too)."""

    REQUESTED = "requested"
    RUNNING = "running"
    FINISHED = "finished"
    LOST = "lost"


EXEC_ENDED: frozenset[str] = frozenset({ExecStatus.FINISHED, ExecStatus.LOST})


class ProcessStatus(StrEnum):
    """requested -> running -> exited | lost (requested -> lost too)."""

    REQUESTED = "requested"
    RUNNING = "running"
    EXITED = "exited"
    LOST = "lost"


PROCESS_ENDED: frozenset[str] = frozenset({ProcessStatus.EXITED, ProcessStatus.LOST})


class PoolState(StrEnum):
    """A pool member's marker: idle (nobody's yet) -> claiming -> claimed."""

    IDLE = "idle"
    CLAIMING = "claiming"
    CLAIMED = "claimed"


POOL_UNCLAIMED: frozenset[str] = frozenset({PoolState.IDLE, PoolState.CLAIMING})   # not (yet) a client's


class NetworkMode(StrEnum):
    NONE = "none"        # loopback only
    BRIDGE = "bridge"    # a veth on the daemon's bridge, egress by allow-list


NETWORK_MODES: tuple[str, ...] = tuple(NetworkMode)


class HostStatus(StrEnum):
    LIVE = "live"
    LOST = "lost"


# the least CPU a session may have: the kernel refuses a cfs quota below 1000 us (1 ms per 100 ms period)
MIN_CPU = 0.01


# ------------------------------------------------------------------------------------ ids
SessionId = NewType("SessionId", str)
ExecId = NewType("ExecId", str)
ProcessId = NewType("ProcessId", str)
WorkspaceId = NewType("WorkspaceId", str)

SESSION_ID_PATTERN = r"^[a-z0-9][a-z0-9-]{2,62}$"          # also a cgroup's and a log directory's name
EXEC_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
WORKSPACE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"   # and never "." or ".."
TOKEN_PATTERN = r"^[\x21-\x7e]{1,200}$"        # Idempotency-Key, X-Request-ID: journaled and echoed
AGENT_RUN_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"   # X-Agent-Run: part of the journaled actor

SESSION_ID = re.compile(SESSION_ID_PATTERN)
EXEC_ID = re.compile(EXEC_ID_PATTERN)
WORKSPACE_ID = re.compile(WORKSPACE_ID_PATTERN)
TOKEN = re.compile(TOKEN_PATTERN)
AGENT_RUN = re.compile(AGENT_RUN_PATTERN)

