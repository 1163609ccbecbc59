"""Errors every layer raises. Each carries a stable `code` (the API's `error_code`);
the HTTP status for each code lives in one place, `sandkasten.api.errors`."""

from __future__ import annotations

from typing import Any


class SandkastenError(Exception):
    code = "INTERNAL"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class ConfigError(SandkastenError):
    code = "INVALID_CONFIG"


class InvalidRequest(SandkastenError):
    code = "INVALID_REQUEST"


class ImageNotFound(SandkastenError):
    code = "IMAGE_NOT_FOUND"


class ImageInvalid(SandkastenError):
    code = "IMAGE_INVALID"


class ImageNotAllowed(SandkastenError):
    code = "IMAGE_NOT_ALLOWED"


class SandboxError(SandkastenError):
    """The kernel refused or a sandbox step failed."""

    code = "SANDBOX_ERROR"


class SandboxGone(SandkastenError):
    """The sandbox's runner is not alive (died or was never started)."""

    code = "SANDBOX_LOST"


class SessionNotFound(SandkastenError):
    code = "SESSION_NOT_FOUND"


class SessionNotRunning(SandkastenError):
    code = "SESSION_NOT_RUNNING"


class SessionBusy(SandkastenError):
    code = "SESSION_BUSY"


class ExecNotFound(SandkastenError):
    code = "EXEC_NOT_FOUND"


class IllegalTransition(SandkastenError):
    code = "ILLEGAL_TRANSITION"


class ProcessNotFound(SandkastenError):
    code = "PROCESS_NOT_FOUND"


class ProcessExited(IllegalTransition):
    """stdin, resize or a signal for a process that is no longer running."""

    code = "PROCESS_EXITED"


class TooManyProcesses(IllegalTransition):
    code = "TOO_MANY_PROCESSES"


class CommandTimeout(SandkastenError):
    code = "COMMAND_TIMEOUT"


class ConcurrencyConflict(SandkastenError):
    code = "CONFLICT"


class PathRefused(SandkastenError):
    code = "PATH_REFUSED"


class FileNotFound(SandkastenError):
    code = "FILE_NOT_FOUND"


class FileBusy(SandkastenError):
    code = "FILE_BUSY"


class TooLarge(SandkastenError):
    code = "PAYLOAD_TOO_LARGE"


class WorkspaceNotFound(SandkastenError):
    code = "WORKSPACE_NOT_FOUND"


class WorkspaceInUse(SandkastenError):
    code = "WORKSPACE_IN_USE"


class JournalError(SandkastenError):
    code = "JOURNAL_ERROR"


class JournalTampered(JournalError):
    code = "JOURNAL_TAMPERED"


class NotReady(SandkastenError):
    code = "NOT_READY"


class Unauthorized(SandkastenError):
    code = "UNAUTHORIZED"


class RequestTimeout(SandkastenError):
    code = "REQUEST_TIMEOUT"


class CapacityExceeded(SandkastenError):
    code = "CAPACITY_EXCEEDED"


class SessionEnded(SandkastenError):
    code = "SESSION_ENDED"
