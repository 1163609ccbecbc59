"""Drift between the journal (what should exist) and the kernel (what does exist).

Who runs this: `sandkasten doctor`, with or without the daemon. Read-only: it reports, the
daemon's reconciler repairs.
"""

from __future__ import annotations

from dataclasses import dataclass

from sandkasten.runtime.sandboxes import Runtime
from sandkasten.schema.vocabulary import SESSION_ENDED, SessionStatus
from sandkasten.store.journal import Journal

LIVE = (SessionStatus.REQUESTED, SessionStatus.RUNNING, SessionStatus.DESTROYING)


@dataclass(frozen=True)
class Drift:
    session_id: str
    journal: str      # status in the journal, or "absent"
    kernel: str       # what was observed
    problem: str


def observed_summary(obs) -> str:
    if obs.healthy:
        return f"runner pid {obs.pid} alive and answering"
    parts = []
    if obs.alive:
        parts.append(f"runner pid {obs.pid} alive but not answering")
    elif obs.pid is not None:
        parts.append(f"runner pid {obs.pid} gone")
    if obs.cgroup:
        parts.append("cgroup" + (" (populated)" if obs.populated else " (empty)"))
    if obs.session_dir:
        parts.append("session dir")
    return ", ".join(parts) or "nothing"


async def find_drift(journal: Journal, runtime: Runtime, host_id: str | None = None) -> tuple[list[Drift], int]:
    """All drift, and how many journal sessions were checked. With `host_id` (one host of a
    cluster) only the sessions placed on that host: the others' sandboxes are on other machines."""
    rows = await journal.sessions(include_ended=True)
    if host_id is not None:
        rows = [r for r in rows if r.get("host_id") == host_id]
    known = {r["id"]: r for r in rows}
    drift: list[Drift] = []
    for row in rows:
        sid, status = row["id"], row["status"]
        obs = runtime.observe(sid)
        seen = observed_summary(obs)
        if status == SessionStatus.RUNNING:
            if not obs.healthy:
                drift.append(Drift(sid, status, seen, "the journal says running but the sandbox is not healthy"))
            elif (obs.pid, obs.start_time) != (row["runner_pid"], row["runner_start_time"]):
                drift.append(Drift(sid, status, seen, "a different runner than the journal recorded (pid reuse?)"))
        elif status in (*SESSION_ENDED, SessionStatus.LOST) and (obs.alive or obs.cgroup or obs.session_dir):
            drift.append(Drift(sid, status, seen, f"the session is {status} but leftovers remain on the host"))
        elif status in (SessionStatus.REQUESTED, SessionStatus.DESTROYING):
            drift.append(Drift(sid, status, seen, f"the session is {status}: work the daemon has not finished"))
    for sid in sorted(runtime.host_sessions() - set(known)):
        problem = ("the journal lost this session: its exec logs show it ran commands (the daemon keeps "
                   "its sandbox; the journal file was truncated or restored?)" if runtime.has_exec_logs(sid)
                   else "host traces of a session the journal does not know (orphan)")
        drift.append(Drift(sid, "absent", observed_summary(runtime.observe(sid)), problem))
    for e in await journal.pending_execs():
        s = known.get(e["session_id"])
        if s is not None and s["status"] != SessionStatus.RUNNING:
            drift.append(Drift(e["session_id"], s["status"], f"exec {e['id']} {e['status']}",
                               "an exec is pending on a session that is not running"))
    return drift, len(rows)
