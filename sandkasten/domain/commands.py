"""Commands: what a caller (HTTP handler, CLI, executor, reconciler) wants recorded.

Field names follow the event payloads they become. Timestamps come in the command
(`expires_at`, `at`); `decide` never reads a clock. Pure: no I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from collections.abc import Mapping


@dataclass(frozen=True)
class RequestSession:
    image: str
    cpu_limit: float = 1.0
    mem_limit_mb: int = 512
    pids_limit: int = 256
    network_mode: str = "none"
    egress_allow: tuple[str, ...] = ()  # bridge mode: IPv4 CIDRs (names resolved at intake)
    env: Mapping[str, str] = field(default_factory=dict)
    ttl_seconds: int = 3600
    workspace_id: str | None = None
    readonly_rootfs: bool = False
    expires_at: datetime | str | None = None  # required; aware datetime or ISO UTC string
    session_id: str | None = None  # filled in by the journal from the stream id
    pool: bool = False  # an idle pool member, waiting for a ClaimSession (see sandkasten.control.pool)


@dataclass(frozen=True)
class RecordSandboxStarted:
    pid: int
    start_time: int  # /proc/<pid>/stat field 22, defeats pid reuse
    cgroup: str = ""
    pooled: bool = False


@dataclass(frozen=True)
class ClaimSession:
    """Hand an idle pool member to a client, with the client's own settings. The image,
    network mode and read-only root were fixed when the member was made; these are not."""

    ttl_seconds: int
    expires_at: datetime | str
    cpu_limit: float = 1.0
    mem_limit_mb: int = 512
    pids_limit: int = 256
    env: Mapping[str, str] = field(default_factory=dict)
    workspace_id: str | None = None


@dataclass(frozen=True)
class RecordSandboxConfigured:
    """The executor applied a claim to the running sandbox (limits, workspace, env)."""


@dataclass(frozen=True)
class RecordSandboxFailed:
    reason: str


@dataclass(frozen=True)
class RecordSandboxAdopted:
    pid: int
    start_time: int


@dataclass(frozen=True)
class RecordSandboxLost:
    reason: str


@dataclass(frozen=True)
class RequestDestroy:
    reason: str = "api"


@dataclass(frozen=True)
class ExpireSession:
    reason: str = "ttl"  # "ttl" | "idle"
    at: datetime | None = None  # when given with reason "ttl", must not be before expires_at


@dataclass(frozen=True)
class RecordSandboxStopped:
    pass


@dataclass(frozen=True)
class RecordSessionDestroyed:
    pass


@dataclass(frozen=True)
class RequestExec:
    exec_id: str
    cmd: str
    timeout_ms: int
    idempotency_key: str | None = None


@dataclass(frozen=True)
class RecordExecStarted:
    exec_id: str


@dataclass(frozen=True)
class RecordExecFinished:
    exec_id: str
    exit_code: int
    cwd: str | None = None
    duration_ms: float = 0.0
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    output_sha256: str = ""
    truncated: bool = False
    timed_out: bool = False
    oom_kills: int = 0


@dataclass(frozen=True)
class RecordExecLost:
    exec_id: str
    reason: str


@dataclass(frozen=True)
class RequestProcess:
    """Start a process beside the shell. `max_live` is the config's bound on running processes."""

    process_id: str
    cmd: str
    cwd: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    pty: tuple[int, int] | None = None  # (rows, cols)
    timeout_ms: int | None = None
    idempotency_key: str | None = None
    max_live: int = 16


@dataclass(frozen=True)
class RecordProcessStarted:
    process_id: str
    pid: int


@dataclass(frozen=True)
class RecordProcessInput:
    """What a client sent to a running process: kind "stdin" (with size, sha256 and, unless
    the config says not to record input, the bytes), "eof", "resize" or "signal"."""

    process_id: str
    kind: str
    size: int = 0
    sha256: str | None = None
    data_base64: str | None = None
    rows: int | None = None
    cols: int | None = None
    signal: str | None = None
    idempotency_key: str | None = None


@dataclass(frozen=True)
class RecordProcessExited:
    process_id: str
    exit_code: int | None
    signal: str | None = None
    timed_out: bool = False
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    output_sha256: str = ""
    dropped_bytes: int = 0
    duration_ms: float = 0.0


@dataclass(frozen=True)
class RecordProcessLost:
    process_id: str
    reason: str


@dataclass(frozen=True)
class RecordFileChange:
    """A client wrote (`op` "write": size and sha256 of the new content) or deleted a file
    through the file API, in a session's /workspace or in a workspace. `path` as shown to
    clients (/workspace/...)."""

    path: str
    op: str = "write"
    size: int = 0
    sha256: str = ""
    recursive: bool = False


@dataclass(frozen=True)
class CreateWorkspace:
    workspace_id: str


@dataclass(frozen=True)
class DeleteWorkspace:
    workspace_id: str


SessionCommand = (
    RequestSession | ClaimSession | RecordSandboxConfigured
    | RecordSandboxStarted | RecordSandboxFailed | RecordSandboxAdopted
    | RecordSandboxLost | RequestDestroy | ExpireSession | RecordSandboxStopped
    | RecordSessionDestroyed | RequestExec | RecordExecStarted | RecordExecFinished | RecordExecLost
    | RequestProcess | RecordProcessStarted | RecordProcessInput | RecordProcessExited | RecordProcessLost
    | RecordFileChange
)
WorkspaceCommand = CreateWorkspace | DeleteWorkspace | RecordFileChange
Command = SessionCommand | WorkspaceCommand
