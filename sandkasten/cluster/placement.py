"""Placement: which live host gets a new (or recreated) session. Pure: no I/O.

A host qualifies when it is live, its heartbeat is fresh, it has the image, its session count
is below its `max_sessions`, the session's memory fits in what the host has left (sum of the
`mem_limit_mb` of its sessions) and its `cpu_limit` is not above the host's CPUs. Of those,
the least loaded wins: fewest sessions relative to `max_sessions`, then the most memory
left, then the host id (so the choice is deterministic for tests and logs).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

from sandkasten.errors import SandkastenError


class NoHostAvailable(SandkastenError):
    code = "NO_HOST_AVAILABLE"


@dataclass(frozen=True)
class Load:
    sessions: int = 0
    mem_mb: int = 0


@dataclass(frozen=True)
class Need:
    image: str
    cpu_limit: float
    mem_limit_mb: int


def choose(hosts: Iterable[Mapping], loads: Mapping[str, Load], need: Need, *, now: datetime,
           timeout_s: float, exclude: Iterable[str] = ()) -> Mapping:
    """The host to place `need` on, or NoHostAvailable naming why each host was refused."""
    refused: dict[str, str] = {}
    fits = []
    skip = set(exclude)
    for host in hosts:
        hid = host["id"]
        why = _refusal(host, loads.get(hid, Load()), need, now, timeout_s) if hid not in skip else "excluded"
        if why:
            refused[hid] = why
        else:
            fits.append(host)
    if not fits:
        detail = "; ".join(f"{hid}: {why}" for hid, why in sorted(refused.items())) or "no host has registered"
        raise NoHostAvailable(f"unable to place a session with image {need.image!r}: no live host has room "
                              f"({detail})", hosts=refused)

    def key(host: Mapping) -> tuple:
        load = loads.get(host["id"], Load())
        return (load.sessions / max(host["max_sessions"], 1), -(host["mem_mb"] - load.mem_mb), host["id"])

    return min(fits, key=key)


def _refusal(host: Mapping, load: Load, need: Need, now: datetime, timeout_s: float) -> str | None:
    if host["status"] != "live":
        return f"host is {host['status']}"
    age = (now - datetime.fromisoformat(host["heartbeat_at"])).total_seconds()
    if age > timeout_s:
        return f"no heartbeat for {age:.0f}s"
    if need.image not in (host["images"] or ()):
        return f"no image {need.image!r}"
    if load.sessions >= host["max_sessions"]:
        return f"full ({load.sessions}/{host['max_sessions']} sessions)"
    if load.mem_mb + need.mem_limit_mb > host["mem_mb"]:
        return f"not enough memory ({host['mem_mb'] - load.mem_mb} MB left, {need.mem_limit_mb} MB asked)"
    if need.cpu_limit > host["cpu"]:
        return f"too few CPUs ({host['cpu']:g} < {need.cpu_limit:g})"
    return None
