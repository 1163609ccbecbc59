"""A session's history as the console shows it, folded from its journal events (never from the
read tables): one entry per command (requested → started → finished or lost) and one per other
fact about the session (requested, sandbox started, adopted after a restart, lost, destroyed …).

Pure: no I/O. Events of kinds this module does not know (a newer daemon's) still appear, by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from sandkasten.domain import events as ev

# What a session-level event says, from its payload; never env values or other secrets.
_SAY = {
    ev.SESSION_REQUESTED: lambda p: (f"session requested: image {p.get('image')}"
                                     + (f", workspace {p['workspace_id']}" if p.get("workspace_id") else "")
                                     + (" (pool member)" if p.get("pool") else "")),
    ev.SESSION_CLAIMED: lambda p: "claimed from the warm pool"
                                  + (f", workspace {p['workspace_id']}" if p.get("workspace_id") else ""),
    ev.SANDBOX_CONFIGURED: lambda p: "pooled sandbox configured for its client",
    ev.SANDBOX_STARTED: lambda p: f"sandbox started (runner pid {p.get('pid')})",
    ev.SANDBOX_FAILED: lambda p: f"sandbox failed: {p.get('reason')}",
    ev.SANDBOX_ADOPTED: lambda p: f"sandbox adopted by a restarted daemon (runner pid {p.get('pid')})",
    ev.SANDBOX_LOST: lambda p: f"sandbox lost: {p.get('reason')}",
    ev.SESSION_DESTROY_REQUESTED: lambda p: f"destroy requested ({p.get('reason')})",
    ev.SESSION_EXPIRED: lambda p: f"session expired ({p.get('reason')})",
    ev.SANDBOX_STOPPED: lambda p: "sandbox stopped",
    ev.SESSION_DESTROYED: lambda p: "session destroyed",
}
_SEVERE = {ev.SANDBOX_FAILED, ev.SANDBOX_LOST}
_QUIET_KEYS = {"env", "data", "data_base64", "start_time", "cgroup"}


@dataclass
class ExecEntry:
    exec_id: str
    cmd: str
    seq: int
    requested_at: str
    actor: str
    timeout_ms: int | None = None
    status: str = "requested"
    started_at: str | None = None
    finished_at: str | None = None
    exit_code: int | None = None
    cwd: str | None = None
    duration_ms: float | None = None
    timed_out: bool = False
    truncated: bool = False
    stdout_bytes: int | None = None
    stderr_bytes: int | None = None
    output_sha256: str | None = None
    lost_reason: str | None = None
    last_seq: int = 0
    kind: str = field(default="exec", init=False)

    @property
    def settled(self) -> bool:
        return self.status in ("finished", "lost")


@dataclass(frozen=True)
class FactEntry:
    seq: int
    type: str
    at: str
    actor: str
    text: str
    severe: bool
    kind: str = field(default="fact", init=False)


def fold(events: Iterable[ev.RecordedEvent]) -> list[ExecEntry | FactEntry]:
    """Entries in the order they began; an exec entry carries everything its later events said."""
    entries: list[ExecEntry | FactEntry] = []
    execs: dict[str, ExecEntry] = {}
    for event in events:
        entry = apply(execs, event)
        if entry is not None:
            entries.append(entry)
    return entries


def apply(execs: dict[str, ExecEntry], event: ev.RecordedEvent) -> ExecEntry | FactEntry | None:
    """Fold one event into `execs`; the new entry it starts (None when it updated an exec)."""
    p = event.payload
    if event.type == ev.EXEC_REQUESTED:
        entry = ExecEntry(exec_id=p["exec_id"], cmd=p["cmd"], seq=event.seq, requested_at=event.created_at,
                          actor=event.actor, timeout_ms=p.get("timeout_ms"), last_seq=event.seq)
        execs[entry.exec_id] = entry
        return entry
    if event.type in ev.EXEC_EVENT_TYPES:
        entry = execs.get(p.get("exec_id", ""))
        if entry is None:
            return None
        entry.last_seq = event.seq
        if event.type == ev.EXEC_STARTED:
            entry.status, entry.started_at = "running", event.created_at
        elif event.type == ev.EXEC_FINISHED:
            entry.status, entry.finished_at = "finished", event.created_at
            entry.exit_code, entry.cwd, entry.duration_ms = p.get("exit_code"), p.get("cwd"), p.get("duration_ms")
            entry.timed_out, entry.truncated = bool(p.get("timed_out")), bool(p.get("truncated"))
            entry.stdout_bytes, entry.stderr_bytes = p.get("stdout_bytes"), p.get("stderr_bytes")
            entry.output_sha256 = p.get("output_sha256")
        else:
            entry.status, entry.finished_at, entry.lost_reason = "lost", event.created_at, p.get("reason")
        return None
    say = _SAY.get(event.type)
    text = say(p) if say else describe(event.type, p)
    return FactEntry(seq=event.seq, type=event.type, at=event.created_at, actor=event.actor, text=text,
                     severe=event.type in _SEVERE)


def describe(kind: str, payload: dict[str, Any]) -> str:
    """An event this module has no words for: its name and its plain fields."""
    shown = [f"{k}={v}" for k, v in payload.items()
             if k not in _QUIET_KEYS and isinstance(v, (str, int, float, bool)) and len(str(v)) <= 200]
    return kind + (": " + ", ".join(shown) if shown else "")
