"""A host's life in a cluster, placement of sessions on hosts, and fencing. Pure: no I/O.

Several daemons (hosts) share one journal (PostgreSQL). Each host has a stream
"host:<host_id>": `host.registered` (at every start; it opens a new *epoch*),
`host.heartbeat` (every few seconds, with its load) and `host.lost` (journaled by any other
host that saw its heartbeat stop). A session's stream gets `session.placed` {host_id,
host_epoch}: the host whose executor creates and runs its sandbox.

Fencing: a host's epoch is the number of its registration. A heartbeat from an older epoch,
or after `host.lost`, is refused, so a host that was declared dead learns it (and registers
again, with a new epoch). Observations of a sandbox (started, adopted, exec started/finished)
carry no host (process started/exited too), so the journal checks them against the
appender's (host_id, epoch) with
`fenced`: a host that comes back after its sessions were placed elsewhere (or under a newer
epoch) cannot record a second copy of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from sandkasten.domain import commands as c
from sandkasten.domain import events as ev
from sandkasten.errors import IllegalTransition
from sandkasten.schema.vocabulary import HostStatus

HOST_STREAM_PREFIX = "host:"
HOST_REGISTERED = "host.registered"
HOST_HEARTBEAT = "host.heartbeat"
HOST_LOST = "host.lost"
SESSION_PLACED = "session.placed"
HOST_EVENT_TYPES = frozenset({HOST_REGISTERED, HOST_HEARTBEAT, HOST_LOST})
LIVE = HostStatus.LIVE
LOST = HostStatus.LOST


def host_stream(host_id: str) -> str:
    return HOST_STREAM_PREFIX + host_id


class HostFenced(IllegalTransition):
    """The appending host no longer owns what it tries to record (its epoch is over)."""

    code = "HOST_FENCED"


# --- commands ------------------------------------------------------------------------------

@dataclass(frozen=True)
class RegisterHost:
    """A daemon starts (or comes back): a new epoch of the host."""

    host_id: str
    address: str                 # base URL other nodes forward requests to
    at: str                      # ISO UTC
    cgroup_parent: str = "sandkasten"
    max_sessions: int = 100
    cpu: float = 1.0
    mem_mb: int = 1024
    images: tuple[str, ...] = ()


@dataclass(frozen=True)
class RecordHeartbeat:
    epoch: int
    at: str
    sessions: int = 0


@dataclass(frozen=True)
class DeclareHostLost:
    """Another host saw this one's heartbeat stop (epoch: the one it saw, compare-and-set)."""

    epoch: int
    reason: str
    at: str


@dataclass(frozen=True)
class PlaceSession:
    """Put a session on a host. Compare-and-set on the placement it replaces (`expected`), so
    two nodes placing (or re-placing) the same session at once cannot both win."""

    host_id: str
    epoch: int
    expected: tuple[str | None, int | None] = (None, None)
    reason: str = "create"       # "create" | "recreate" (its host was lost) | "restart" (new epoch)


HOST_COMMANDS = (RegisterHost, RecordHeartbeat, DeclareHostLost)
FENCED_COMMANDS = (c.RecordSandboxStarted, c.RecordSandboxAdopted, c.RecordExecStarted, c.RecordExecFinished,
                   c.RecordSandboxConfigured, c.RecordProcessStarted, c.RecordProcessExited)


# --- the host stream -------------------------------------------------------------------------

@dataclass(frozen=True)
class HostState:
    host_id: str
    version: int
    status: str                  # "live" | "lost"
    epoch: int
    address: str
    heartbeat_at: str
    info: dict[str, Any] = field(default_factory=dict)


def decide_host(state: HostState | None, command: Any, stream_id: str) -> list[ev.NewEvent]:
    host_id = stream_id[len(HOST_STREAM_PREFIX):]
    if isinstance(command, RegisterHost):
        if command.host_id != host_id:
            raise IllegalTransition(f"unable to register host {command.host_id}: stream is {stream_id}")
        return [ev.NewEvent(HOST_REGISTERED, {
            "host_id": host_id, "epoch": (state.epoch if state else 0) + 1, "address": command.address,
            "cgroup_parent": command.cgroup_parent, "max_sessions": command.max_sessions, "cpu": command.cpu,
            "mem_mb": command.mem_mb, "images": list(command.images), "at": command.at})]
    if state is None:
        raise IllegalTransition(f"unable to change host {host_id}: it never registered", host_id=host_id)
    if isinstance(command, RecordHeartbeat):
        if state.status != LIVE or command.epoch != state.epoch:
            raise HostFenced(f"unable to record heartbeat of host {host_id} epoch {command.epoch}: "
                             f"the journal has epoch {state.epoch}, {state.status}", host_id=host_id,
                             epoch=state.epoch, status=state.status)
        return [ev.NewEvent(HOST_HEARTBEAT, {"epoch": command.epoch, "at": command.at, "sessions": command.sessions})]
    if isinstance(command, DeclareHostLost):
        if state.status != LIVE or command.epoch != state.epoch:
            raise IllegalTransition(f"unable to declare host {host_id} lost: epoch {state.epoch} is "
                                    f"{state.status} (saw {command.epoch})", host_id=host_id)
        return [ev.NewEvent(HOST_LOST, {"epoch": command.epoch, "reason": command.reason, "at": command.at})]
    raise TypeError(f"not a host command: {type(command).__name__}")


def evolve_host(state: HostState | None, event: Any) -> HostState:
    version = getattr(event, "stream_version", None) or ((state.version if state else 0) + 1)
    p = event.payload
    if event.type == HOST_REGISTERED:
        info = {k: p[k] for k in ("cgroup_parent", "max_sessions", "cpu", "mem_mb", "images")}
        return HostState(host_id=p["host_id"], version=version, status=LIVE, epoch=p["epoch"],
                         address=p["address"], heartbeat_at=p["at"], info=info)
    if state is None:
        raise ValueError(f"unable to apply event {event.type}: host stream has no host.registered")
    if event.type == HOST_HEARTBEAT:
        return replace(state, version=version, heartbeat_at=p["at"])
    if event.type == HOST_LOST:
        return replace(state, version=version, status=LOST)
    raise ValueError(f"unable to apply event {event.type} to host state")


# --- placement of a session, and fencing of what a host records ------------------------------

def decide_place(state: Any, command: PlaceSession, ended: frozenset[str]) -> list[ev.NewEvent]:
    sid = state.session_id
    if state.status in ended:
        raise IllegalTransition(f"unable to place session {sid}: session is {state.status}", session_id=sid)
    current = (state.host_id, state.host_epoch)
    if current != tuple(command.expected):
        raise IllegalTransition(f"unable to place session {sid} on host {command.host_id}: it is placed on "
                                f"{current[0]} (epoch {current[1]}) already", session_id=sid)
    return [ev.NewEvent(SESSION_PLACED, {"host_id": command.host_id, "host_epoch": command.epoch,
                                         "reason": command.reason})]


def fenced(state: Any, command: Any, fence: tuple[str, int] | None) -> str | None:
    """Why `command`, appended by host `fence` = (host_id, epoch), must be refused; None if not."""
    if fence is None or not isinstance(command, FENCED_COMMANDS) or getattr(state, "host_id", None) is None:
        return None
    if (state.host_id, state.host_epoch) == tuple(fence):
        return None
    return (f"session {state.session_id} is placed on host {state.host_id} (epoch {state.host_epoch}), "
            f"not on host {fence[0]} (epoch {fence[1]})")
