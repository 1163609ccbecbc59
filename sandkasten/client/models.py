"""Typed results: frozen dataclasses decoded from the daemon's JSON.

Decoding keeps the fields this client knows and ignores the rest, so a newer daemon that
adds fields does not break an older client. Pure: no I/O here."""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sandkasten.schema.vocabulary import PROCESS_ENDED, ProcessStatus, SessionStatus

if TYPE_CHECKING:
    from _typeshed import DataclassInstance


def _decode[T: DataclassInstance](cls: type[T], data: Mapping[str, Any], **extra: Any) -> T:
    names = {f.name for f in dataclasses.fields(cls)}
    known = {k: v for k, v in data.items() if k in names}
    return cls(**known, **extra)


@dataclass(frozen=True)
class Session:
    id: str
    image: str
    status: str
    cwd: str = "/workspace"
    workspace_id: str | None = None
    created_at: str | None = None
    expires_at: str | None = None
    ended_at: str | None = None
    cpu_limit: float | None = None
    mem_limit_mb: int | None = None
    pids_limit: int | None = None
    network_mode: str | None = None
    exec_count: int = 0
    lost_reason: str | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Session:
        return _decode(cls, data)

    @property
    def running(self) -> bool:
        return self.status == SessionStatus.RUNNING


@dataclass(frozen=True)
class ExecResult:
    """One finished command. `output` is stdout and stderr interleaved as they arrived."""

    exec_id: str
    exit_code: int | None
    cwd: str
    output: str = ""
    stdout: str = ""
    stderr: str = ""
    truncated: bool = False
    duration_ms: int | None = None
    timed_out: bool = False
    oom_kills: int = 0
    status: str = "finished"
    cmd: str | None = None
    session_id: str | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ExecResult:
        data = dict(data)
        for name in ("output", "stdout", "stderr"):  # raw_output answers carry base64
            if f"{name}_base64" in data and name not in data:
                data[name] = base64.b64decode(data[f"{name}_base64"]).decode("utf-8", "replace")
        data.setdefault("cwd", "")
        return _decode(cls, data)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out


@dataclass(frozen=True)
class ExecRecord:
    """A line of a session's exec history (no output; fetch it with `get_exec`)."""

    exec_id: str
    cmd: str
    status: str
    exit_code: int | None = None
    cwd: str | None = None
    duration_ms: int | None = None
    timed_out: bool = False
    requested_at: str | None = None
    finished_at: str | None = None
    output_sha256: str | None = None
    lost_reason: str | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ExecRecord:
        return _decode(cls, data)


@dataclass(frozen=True)
class ExecChunk:
    """Output as it arrives from `exec_stream`; `stream` is "stdout" or "stderr"."""

    chunk: str
    stream: str = "stdout"
    timestamp: str | None = None
    event_id: str | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any], event_id: str | None = None) -> ExecChunk:
        return _decode(cls, data, event_id=event_id)


@dataclass(frozen=True)
class ExecDone:
    """The last event of `exec_stream`."""

    exit_code: int | None
    cwd: str = ""
    duration_ms: int | None = None
    timed_out: bool = False
    truncated: bool = False
    oom_kills: int = 0
    exec_id: str | None = None
    event_id: str | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any], event_id: str | None = None,
                  exec_id: str | None = None) -> ExecDone:
        data = dict(data)
        data.setdefault("exec_id", exec_id)
        return _decode(cls, data, event_id=event_id)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out


ExecEvent = ExecChunk | ExecDone


@dataclass(frozen=True)
class Process:
    """A process beside the shell (`start_process`): running, exited (with `exit_code`, or the
    `signal` that ended it) or lost."""

    process_id: str
    status: str
    cmd: str = ""
    session_id: str | None = None
    cwd: str | None = None
    pty: Mapping[str, int] | None = None
    pid: int | None = None
    exit_code: int | None = None
    signal: str | None = None
    timed_out: bool = False
    requested_at: str | None = None
    started_at: str | None = None
    exited_at: str | None = None
    duration_ms: float | None = None
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    output_bytes: int = 0
    output_sha256: str | None = None
    dropped_bytes: int = 0
    input_bytes: int = 0
    lost_reason: str | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Process:
        if "process" in data and isinstance(data["process"], Mapping):   # DELETE answers {ok, process}
            data = data["process"]
        return _decode(cls, data)

    @property
    def running(self) -> bool:
        return self.status not in PROCESS_ENDED


@dataclass(frozen=True)
class ProcessOutput:
    """A slice of a process's output (`process_output`): ask again from `next_offset`."""

    process_id: str
    offset: int
    next_offset: int
    output: bytes = b""
    status: str = ProcessStatus.RUNNING
    exit_code: int | None = None
    signal: str | None = None
    eof: bool = False
    dropped: bool = False

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ProcessOutput:
        data = dict(data)
        data["output"] = base64.b64decode(data.get("output_base64") or "")
        return _decode(cls, data)

    @property
    def text(self) -> str:
        return self.output.decode("utf-8", "replace")


@dataclass(frozen=True)
class ProcessDone:
    """The last event of `process_stream`: how the process ended."""

    exit_code: int | None
    signal: str | None = None
    timed_out: bool = False
    duration_ms: float | None = None
    dropped_bytes: int = 0
    process_id: str | None = None
    event_id: str | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any], event_id: str | None = None) -> ProcessDone:
        return _decode(cls, data, event_id=event_id)


ProcessEvent = ExecChunk | ProcessDone


@dataclass(frozen=True)
class FileEntry:
    path: str
    name: str
    type: str  # "file" | "dir" | "symlink" | "other"
    size: int = 0
    mode: str | None = None
    mtime: float | str | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FileEntry:
        return _decode(cls, data)

    @property
    def is_dir(self) -> bool:
        return self.type == "dir"


@dataclass(frozen=True)
class FileContent:
    path: str
    content: bytes
    size: int | None = None
    truncated: bool = False

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FileContent:
        content = base64.b64decode(data.get("content_base64") or "")
        return cls(path=data.get("path", ""), content=content, size=data.get("size", len(content)),
                   truncated=bool(data.get("truncated")))

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")


@dataclass(frozen=True)
class Stats:
    memory_bytes: int | None = None
    memory_limit: int | None = None
    cpu_usage_usec: int | None = None
    pids: int | None = None
    oom_kills: int | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Stats:
        return _decode(cls, data)


@dataclass(frozen=True)
class Workspace:
    """A persistent /workspace directory; `in_use_by` lists the live sessions mounting it."""

    id: str
    created_at: str | None = None
    last_session_id: str | None = None
    size_bytes: int | None = None
    disk_bytes: int | None = None
    in_use_by: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Workspace:
        data = dict(data)
        data["in_use_by"] = tuple(data.get("in_use_by") or ())
        return _decode(cls, data)
