"""Event names, the two event shapes (not yet stored / stored) and payload upcasting.

Events are small past-tense facts with stable string names (DESIGN.md §2). The store
never writes Python import paths; it writes these names plus a schema version, and
old payloads are upcast on read through `upcast`. Pure: no I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from collections.abc import Callable, Mapping

SCHEMA_VERSION = 1

# session stream ("s-…")
SESSION_REQUESTED = "session.requested"
SESSION_CLAIMED = "session.claimed"  # a pool member handed to a client
SANDBOX_CONFIGURED = "sandbox.configured"  # ... and its sandbox adjusted to the claim
SANDBOX_STARTED = "sandbox.started"
SANDBOX_FAILED = "sandbox.failed"
SANDBOX_ADOPTED = "sandbox.adopted"
SANDBOX_LOST = "sandbox.lost"
SESSION_DESTROY_REQUESTED = "session.destroy_requested"
SESSION_EXPIRED = "session.expired"
SANDBOX_STOPPED = "sandbox.stopped"
SESSION_DESTROYED = "session.destroyed"
EXEC_REQUESTED = "exec.requested"
EXEC_STARTED = "exec.started"
EXEC_FINISHED = "exec.finished"
EXEC_LOST = "exec.lost"
PROCESS_REQUESTED = "process.requested"
PROCESS_STARTED = "process.started"
PROCESS_INPUT = "process.input"      # stdin bytes, EOF, a resize or a signal sent to a process
PROCESS_EXITED = "process.exited"
PROCESS_LOST = "process.lost"
# workspace stream ("ws:<workspace_id>")
WORKSPACE_CREATED = "workspace.created"
WORKSPACE_DELETED = "workspace.deleted"
# either stream: a client changed files through the file API (commands change them unrecorded)
FILE_WRITTEN = "file.written"
FILE_DELETED = "file.deleted"

SESSION_EVENT_TYPES = frozenset(
    {
        SESSION_REQUESTED, SESSION_CLAIMED, SANDBOX_CONFIGURED,
        SANDBOX_STARTED, SANDBOX_FAILED, SANDBOX_ADOPTED, SANDBOX_LOST,
        SESSION_DESTROY_REQUESTED, SESSION_EXPIRED, SANDBOX_STOPPED, SESSION_DESTROYED,
        EXEC_REQUESTED, EXEC_STARTED, EXEC_FINISHED, EXEC_LOST,
        PROCESS_REQUESTED, PROCESS_STARTED, PROCESS_INPUT, PROCESS_EXITED, PROCESS_LOST,
    }
)
WORKSPACE_EVENT_TYPES = frozenset({WORKSPACE_CREATED, WORKSPACE_DELETED})
EXEC_EVENT_TYPES = frozenset({EXEC_REQUESTED, EXEC_STARTED, EXEC_FINISHED, EXEC_LOST})
PROCESS_EVENT_TYPES = frozenset({PROCESS_REQUESTED, PROCESS_STARTED, PROCESS_INPUT, PROCESS_EXITED, PROCESS_LOST})
FILE_EVENT_TYPES = frozenset({FILE_WRITTEN, FILE_DELETED})

WORKSPACE_STREAM_PREFIX = "ws:"


def workspace_stream(workspace_id: str) -> str:
    """The stream id of a workspace's events."""
    return WORKSPACE_STREAM_PREFIX + workspace_id


@dataclass(frozen=True)
class NewEvent:
    """An event `decide` wants appended; the store gives it seq, version, time and hash."""

    type: str
    payload: Mapping[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION


@dataclass(frozen=True)
class RecordedEvent:
    """An event as stored in the journal (payload already upcast to the current version)."""

    seq: int
    stream_id: str
    stream_version: int
    type: str
    schema_version: int
    payload: Mapping[str, Any]
    actor: str
    request_id: str | None
    created_at: str
    hash: str


# (type, schema_version) -> function turning that payload into the next version's payload.
Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
UPCASTERS: dict[tuple[str, int], Upcaster] = {}


def register_upcaster(event_type: str, from_version: int, fn: Upcaster) -> None:
    """Register how to lift `event_type` payloads from `from_version` to `from_version + 1`."""
    UPCASTERS[(event_type, from_version)] = fn


def upcast(event_type: str, schema_version: int, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """Lift an old payload step by step to the newest version this code knows."""
    while (event_type, schema_version) in UPCASTERS:
        payload = UPCASTERS[(event_type, schema_version)](payload)
        schema_version += 1
    return schema_version, payload
