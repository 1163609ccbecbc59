"""Read tables of the cluster's events: `hosts` (registry, heartbeat, lost) and the placement
columns of `sessions`. Same rules as store/projections.py (which dispatches here): runs inside
the append's transaction and in replay, uses only the event and rows earlier events wrote."""

from __future__ import annotations

from typing import Any
from collections.abc import Callable

import sqlalchemy as sa

from sandkasten.domain import host as h
from sandkasten.domain.events import RecordedEvent
from sandkasten.store import statements
from sandkasten.store.schema import hosts, sessions

_HOST_ROW = sa.select(hosts.c.id).where(hosts.c.id == sa.bindparam("id"))
_PLACE = sa.update(sessions).where(sessions.c.id == sa.bindparam("row_id")).values(
    host_id=sa.bindparam("v_host_id"), host_epoch=sa.bindparam("v_host_epoch"),
    updated_at=sa.bindparam("v_updated_at"), version=sa.bindparam("v_version"))
_HEARTBEAT = sa.update(hosts).where(hosts.c.id == sa.bindparam("row_id")).values(
    heartbeat_at=sa.bindparam("v_at"), version=sa.bindparam("v_version"))


_INSERT_HOST = sa.insert(hosts)
_REGISTER = sa.update(hosts).where(hosts.c.id == sa.bindparam("row_id")).values(
    {c.name: sa.bindparam(f"v_{c.name}") for c in hosts.columns if c.name != "id"})
_LOST = sa.update(hosts).where(hosts.c.id == sa.bindparam("row_id")).values(
    status=h.LOST, lost_at=sa.bindparam("v_lost_at"), lost_reason=sa.bindparam("v_lost_reason"),
    version=sa.bindparam("v_version"))


def _host_registered(conn: Any, e: RecordedEvent) -> None:
    p = e.payload
    values: dict[str, Any] = dict(
        status=h.LIVE, epoch=p["epoch"], address=p["address"], cgroup_parent=p["cgroup_parent"],
        max_sessions=p["max_sessions"], cpu=p["cpu"], mem_mb=p["mem_mb"], images=list(p["images"]),
        registered_at=p["at"], heartbeat_at=p["at"], lost_at=None, lost_reason=None, version=e.stream_version)
    if statements.execute(conn, _HOST_ROW, {"id": p["host_id"]}):
        statements.execute(conn, _REGISTER, {"row_id": p["host_id"], **{f"v_{k}": v for k, v in values.items()}})
    else:
        statements.execute(conn, _INSERT_HOST, {"id": p["host_id"], **values})


def _host_heartbeat(conn: Any, e: RecordedEvent) -> None:
    statements.execute(conn, _HEARTBEAT, {"row_id": _host_id(e), "v_at": e.payload["at"],
                                           "v_version": e.stream_version})


def _host_lost(conn: Any, e: RecordedEvent) -> None:
    statements.execute(conn, _LOST, {"row_id": _host_id(e), "v_lost_at": e.payload["at"],
                                     "v_lost_reason": e.payload["reason"], "v_version": e.stream_version})


def _session_placed(conn: Any, e: RecordedEvent) -> None:
    statements.execute(conn, _PLACE, {"row_id": e.stream_id, "v_host_id": e.payload["host_id"],
                                      "v_host_epoch": e.payload["host_epoch"], "v_updated_at": e.created_at,
                                      "v_version": e.stream_version})


def _host_id(e: RecordedEvent) -> str:
    return e.stream_id[len(h.HOST_STREAM_PREFIX):]


PROJECTORS: dict[str, Callable[[Any, RecordedEvent], None]] = {
    h.HOST_REGISTERED: _host_registered,
    h.HOST_HEARTBEAT: _host_heartbeat,
    h.HOST_LOST: _host_lost,
    h.SESSION_PLACED: _session_placed,
}
