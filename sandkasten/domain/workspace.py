"""A persistent workspace's life: created, deleted (and created again). Pure: no I/O.

Stream id "ws:<workspace_id>". Which sessions use a workspace is not decided here: a
session names its workspace in `session.requested` and the read tables join them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from sandkasten.domain import events as ev
from sandkasten.domain.commands import CreateWorkspace, DeleteWorkspace, RecordFileChange
from sandkasten.errors import IllegalTransition, InvalidRequest, WorkspaceNotFound

ACTIVE = "active"
DELETED = "deleted"


@dataclass(frozen=True)
class WorkspaceState:
    workspace_id: str
    version: int
    status: str  # "active" | "deleted"


def decide_workspace(state: WorkspaceState | None, command: Any) -> list[ev.NewEvent]:
    if isinstance(command, CreateWorkspace):
        if state is not None and state.status == ACTIVE:
            raise IllegalTransition(
                f"unable to create workspace {command.workspace_id}: workspace already exists",
                workspace_id=command.workspace_id,
            )
        return [ev.NewEvent(ev.WORKSPACE_CREATED, {"workspace_id": command.workspace_id})]
    if isinstance(command, DeleteWorkspace):
        if state is None or state.status == DELETED:
            raise WorkspaceNotFound(
                f"unable to delete workspace {command.workspace_id}: no such workspace",
                workspace_id=command.workspace_id,
            )
        return [ev.NewEvent(ev.WORKSPACE_DELETED, {"workspace_id": command.workspace_id})]
    if isinstance(command, RecordFileChange):
        if state is None or state.status == DELETED:
            raise WorkspaceNotFound("unable to record a file change in workspace: no such workspace")
        return [file_event(command)]
    raise TypeError(f"not a workspace command: {type(command).__name__}")


def file_event(cmd: RecordFileChange) -> ev.NewEvent:
    """`file.written` {path, size, sha256} or `file.deleted` {path, recursive}: one shape on
    session and workspace streams."""
    if cmd.op == "write":
        return ev.NewEvent(ev.FILE_WRITTEN, {"path": cmd.path, "size": cmd.size, "sha256": cmd.sha256})
    if cmd.op == "delete":
        return ev.NewEvent(ev.FILE_DELETED, {"path": cmd.path, "recursive": cmd.recursive})
    raise InvalidRequest(f"unable to record a file change: op {cmd.op!r} is not write or delete")


def evolve_workspace(state: WorkspaceState | None, event: Any) -> WorkspaceState:
    version = getattr(event, "stream_version", None) or ((state.version if state else 0) + 1)
    if event.type == ev.WORKSPACE_CREATED:
        return WorkspaceState(workspace_id=event.payload["workspace_id"], version=version, status=ACTIVE)
    if event.type == ev.WORKSPACE_DELETED and state is not None:
        return replace(state, version=version, status=DELETED)
    if event.type in ev.FILE_EVENT_TYPES and state is not None:
        return replace(state, version=version)
    raise ValueError(f"unable to apply event {event.type} to workspace state")
