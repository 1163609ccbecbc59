"""Pure domain logic: commands, events, `decide` and `evolve`. Imports nothing with I/O."""

from sandkasten.domain.commands import (
    ClaimSession,
    Command,
    CreateWorkspace,
    DeleteWorkspace,
    ExpireSession,
    RecordExecFinished,
    RecordExecLost,
    RecordExecStarted,
    RecordFileChange,
    RecordSandboxAdopted,
    RecordSandboxConfigured,
    RecordSandboxFailed,
    RecordSandboxLost,
    RecordSandboxStarted,
    RecordSandboxStopped,
    RecordSessionDestroyed,
    RequestDestroy,
    RequestExec,
    RequestSession,
)
from sandkasten.domain.events import NewEvent, RecordedEvent, workspace_stream
from sandkasten.domain.session import (
    DuplicateIdempotencyKey,
    ExecState,
    PriorExecs,
    SessionState,
    State,
    decide,
    evolve,
)
from sandkasten.domain.workspace import WorkspaceState

__all__ = [
    "ClaimSession", "RecordSandboxConfigured",
    "Command", "CreateWorkspace", "DeleteWorkspace", "ExpireSession", "RecordExecFinished", "RecordExecLost",
    "RecordExecStarted", "RecordFileChange", "RecordSandboxAdopted", "RecordSandboxFailed", "RecordSandboxLost",
    "RecordSandboxStarted", "RecordSandboxStopped", "RecordSessionDestroyed", "RequestDestroy", "RequestExec",
    "RequestSession", "NewEvent", "RecordedEvent", "workspace_stream", "DuplicateIdempotencyKey", "ExecState",
    "PriorExecs", "SessionState", "State", "decide", "evolve", "WorkspaceState",
]
