"""A session's history as the console shows it, folded from its journal events (never from the
read tables): one entry per command (requested → started → finished or lost) and one per other
fact about the session (requested, sandbox started, adopted after a restart, lost, destroyed …),
and one per process started beside the shell, with every input sent to it.

Pure: no I/O. Events of kinds this module does not know (a newer daemon's) still appear, by name.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sandkasten.domain import events as ev
from sandkasten.schema.vocabulary import EXEC_ENDED, PROCESS_ENDED

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
    def key(self) -> str:
        return self.exec_id

    @property
    def settled(self) -> bool:
        return self.status in EXEC_ENDED


@dataclass(frozen=True)
class FactEntry:
    seq: int
    type: str
    at: str
    actor: str
    text: str
    severe: bool
    kind: str = field(default="fact", init=False)

    @property
    def key(self) -> str:
        return f"f{self.seq}"


@dataclass
class ProcessEntry:
    process_id: str
    cmd: str
    seq: int
    requested_at: str
    actor: str
    pty: dict | None = None
    status: str = "requested"
    pid: int | None = None
    exit_code: int | None = None
    signal: int | str | None = None
    duration_ms: float | None = None
    timed_out: bool = False
    lost_reason: str | None = None
    finished_at: str | None = None
    inputs: list[tuple[str, str, str]] = field(default_factory=list)   # (at, actor, what)
    input_bytes: int = 0
    kind: str = field(default="process", init=False)

    @property
    def key(self) -> str:
        return self.process_id

    @property
    def settled(self) -> bool:
        return self.status in PROCESS_ENDED


Entry = ExecEntry | ProcessEntry | FactEntry


class Replay:
    """Folds a session's events one at a time; `apply` names the entry each event touched."""

    def __init__(self) -> None:
        self.execs: dict[str, ExecEntry] = {}
        self.processes: dict[str, ProcessEntry] = {}

    def apply(self, event: ev.RecordedEvent) -> tuple[Entry | None, bool]:
        """(the entry `event` started or changed, whether it is new)."""
        p = event.payload
        if event.type in ev.EXEC_EVENT_TYPES:
            return self._exec(event, p)
        if event.type in ev.PROCESS_EVENT_TYPES:
            return self._process(event, p)
        say = _SAY.get(event.type)
        text = say(p) if say else describe(event.type, p)
        return FactEntry(seq=event.seq, type=event.type, at=event.created_at, actor=event.actor, text=text,
                         severe=event.type in _SEVERE), True

    def _exec(self, event: ev.RecordedEvent, p) -> tuple[ExecEntry | None, bool]:
        if event.type == ev.EXEC_REQUESTED:
            made = ExecEntry(exec_id=p["exec_id"], cmd=p["cmd"], seq=event.seq, requested_at=event.created_at,
                             actor=event.actor, timeout_ms=p.get("timeout_ms"), last_seq=event.seq)
            self.execs[made.exec_id] = made
            return made, True
        entry = self.execs.get(p.get("exec_id", ""))
        if entry is None:
            return None, False
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
        return entry, False

    def _process(self, event: ev.RecordedEvent, p) -> tuple[ProcessEntry | None, bool]:
        if event.type == ev.PROCESS_REQUESTED:
            made = ProcessEntry(process_id=p["process_id"], cmd=p["cmd"], seq=event.seq,
                                requested_at=event.created_at, actor=event.actor, pty=p.get("pty"))
            self.processes[made.process_id] = made
            return made, True
        entry = self.processes.get(p.get("process_id", ""))
        if entry is None:
            return None, False
        if event.type == ev.PROCESS_STARTED:
            entry.status, entry.pid = "running", p.get("pid")
        elif event.type == ev.PROCESS_EXITED:
            entry.status, entry.finished_at = "exited", event.created_at
            entry.exit_code, entry.signal = p.get("exit_code"), p.get("signal")
            entry.duration_ms, entry.timed_out = p.get("duration_ms"), bool(p.get("timed_out"))
        elif event.type == ev.PROCESS_LOST:
            entry.status, entry.finished_at, entry.lost_reason = "lost", event.created_at, p.get("reason")
        elif event.type == ev.PROCESS_INPUT:
            entry.inputs.append((event.created_at, event.actor, input_words(p)))
            entry.input_bytes += p.get("size") or 0
        return entry, False


def fold(events: Iterable[ev.RecordedEvent]) -> list[Entry]:
    """Entries in the order they began; each carries everything its later events said."""
    replay = Replay()
    entries: list[Entry] = []
    for event in events:
        entry, new = replay.apply(event)
        if new and entry is not None:
            entries.append(entry)
    return entries


def input_words(p: Mapping[str, Any]) -> str:
    """What one process.input event sent: the typed text (control characters spelled out, as
    the journal recorded it), or the resize, signal or end of input."""
    kind = p.get("kind")
    if kind == "stdin":
        data = p.get("data_base64")
        if data is None:
            return f"{p.get('size', 0)} bytes (not recorded: audit.record_input is off)"
        try:
            text = base64.b64decode(data).decode("utf-8", "replace")
        except (ValueError, TypeError):
            return f"{p.get('size', 0)} bytes"
        return repr(text)[1:-1] if not text.isprintable() else text
    if kind == "resize":
        return f"resize to {p.get('cols')}×{p.get('rows')}"
    if kind == "signal":
        return f"signal {p.get('signal')}"
    return "end of input (EOF)"


def describe(kind: str, payload: Mapping[str, Any]) -> str:
    """An event this module has no words for: its name and its plain fields."""
    shown = [f"{k}={v}" for k, v in payload.items()
             if k not in _QUIET_KEYS and isinstance(v, (str, int, float, bool)) and len(str(v)) <= 200]
    return kind + (": " + ", ".join(shown) if shown else "")
