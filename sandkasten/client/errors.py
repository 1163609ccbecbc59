"""Typed errors of the client, built from the daemon's error body
`{"error_code": "...", "message": "...", "details": {...}}`.

The client raises exactly one family: `SandkastenError` and its subclasses, one per
`error_code` (the table below). A code this client does not know yet still arrives as a
`SandkastenError` (or the subclass for its HTTP status), never as a bare httpx exception.
"""

from __future__ import annotations

from typing import Any


class SandkastenError(Exception):
    """An error answered by the daemon (or the daemon being unreachable).

    `status` is the HTTP status (0 when no answer came), `code` the API's `error_code`,
    `details` its structured details, `request_id` the daemon's `x-request-id` when known."""

    code = "INTERNAL"

    def __init__(self, message: str, *, status: int = 0, code: str | None = None,
                 details: dict[str, Any] | None = None, request_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code or type(self).code
        self.details = details or {}
        self.request_id = request_id

    def __str__(self) -> str:
        return f"{self.code}: {self.message}" if self.code else self.message


# -- 400 ------------------------------------------------------------------
class InvalidRequest(SandkastenError):
    code = "INVALID_REQUEST"


class PathRefused(InvalidRequest):
    code = "PATH_REFUSED"


class ImageNotFound(InvalidRequest):
    code = "IMAGE_NOT_FOUND"


class ImageInvalid(InvalidRequest):
    code = "IMAGE_INVALID"


class ImageNotAllowed(InvalidRequest):
    code = "IMAGE_NOT_ALLOWED"


# -- 401 / 403 --------------------------------------------------------------
class Unauthorized(SandkastenError):
    code = "UNAUTHORIZED"


class Forbidden(SandkastenError):
    code = "FORBIDDEN"


# -- 404 ------------------------------------------------------------------
class NotFound(SandkastenError):
    code = "NOT_FOUND"


class SessionNotFound(NotFound):
    code = "SESSION_NOT_FOUND"


class ExecNotFound(NotFound):
    code = "EXEC_NOT_FOUND"


class FileNotFound(NotFound):
    code = "FILE_NOT_FOUND"


class ProcessNotFound(NotFound):
    code = "PROCESS_NOT_FOUND"


class WorkspaceNotFound(NotFound):
    code = "WORKSPACE_NOT_FOUND"


# -- 409 ------------------------------------------------------------------
class Conflict(SandkastenError):
    code = "CONFLICT"


class SessionNotRunning(Conflict):
    code = "SESSION_NOT_RUNNING"


class FileBusy(Conflict):
    code = "FILE_BUSY"


class SessionBusy(Conflict):
    code = "SESSION_BUSY"


class ProcessExited(Conflict):
    """stdin, a resize or a signal for a process that has ended."""

    code = "PROCESS_EXITED"


class TooManyProcesses(Conflict):
    code = "TOO_MANY_PROCESSES"


class WorkspaceInUse(Conflict):
    code = "WORKSPACE_IN_USE"


# -- 410: the session is over (destroyed, expired, or its sandbox was lost) --
class SessionEnded(SandkastenError):
    code = "SESSION_ENDED"


class SandboxLost(SessionEnded):
    code = "SANDBOX_LOST"


# -- 408 / 413 / 504 / 503 ----------------------------------------------------
class RequestTimeout(SandkastenError):
    """408: the request body did not arrive in time (limits.body_timeout_seconds)."""

    code = "REQUEST_TIMEOUT"


class PayloadTooLarge(SandkastenError):
    code = "PAYLOAD_TOO_LARGE"


class CapacityExceeded(SandkastenError):
    """429: the daemon grants no more sessions (limits.max_sessions) or memory (limits.max_total_mem_mb)."""

    code = "CAPACITY_EXCEEDED"


class CommandTimeout(SandkastenError):
    code = "COMMAND_TIMEOUT"


class Unavailable(SandkastenError):
    """503: the daemon is up but cannot serve this now (starting, kernel refused, journal)."""

    code = "UNAVAILABLE"


class NotReady(Unavailable):
    code = "NOT_READY"


class SandboxError(Unavailable):
    code = "SANDBOX_ERROR"


class JournalError(Unavailable):
    code = "JOURNAL_ERROR"


class InvalidURL(SandkastenError, ValueError):
    """The daemon's URL (argument or SANDKASTEN_URL) is not an http(s) URL; raised when the
    client is made, before any request."""

    code = "INVALID_URL"


class DaemonUnreachable(SandkastenError):
    """No answer from the daemon (connection refused or dropped) after every retry."""

    code = "DAEMON_UNREACHABLE"


class StreamBroken(SandkastenError):
    """An exec stream could not be resumed (the daemon lost it or answered garbage)."""

    code = "STREAM_BROKEN"


_BY_CODE: dict[str, type[SandkastenError]] = {
    cls.code: cls for cls in (
        InvalidRequest, PathRefused, ImageNotFound, ImageInvalid, ImageNotAllowed, Unauthorized, Forbidden,
        NotFound, SessionNotFound, ExecNotFound, FileNotFound, WorkspaceNotFound, Conflict,
        SessionNotRunning, SessionBusy, FileBusy, WorkspaceInUse, ProcessNotFound, ProcessExited,
        TooManyProcesses, SessionEnded, SandboxLost, RequestTimeout, PayloadTooLarge, CapacityExceeded,
        CommandTimeout, NotReady, SandboxError, JournalError)
}
_BY_CODE.update({"ILLEGAL_TRANSITION": Conflict, "DUPLICATE_IDEMPOTENCY_KEY": Conflict,
                 "INVALID_JSON": InvalidRequest, "JOURNAL_TAMPERED": JournalError,
                 "IMAGE_BUILD_FAILED": SandboxError})
_BY_STATUS: dict[int, type[SandkastenError]] = {
    400: InvalidRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound, 405: InvalidRequest, 408: RequestTimeout,
    409: Conflict, 429: CapacityExceeded,
    410: SessionEnded, 413: PayloadTooLarge, 415: InvalidRequest, 422: InvalidRequest, 503: Unavailable,
    504: CommandTimeout,
}


def from_response(status: int, body: Any, request_id: str | None = None) -> SandkastenError:
    """The typed error for a non-2xx answer; `body` is the decoded JSON (or text)."""
    if isinstance(body, dict) and isinstance(body.get("error_code"), str):
        code = body["error_code"]
        message = str(body.get("message") or code.lower().replace("_", " "))
        details = body.get("details") if isinstance(body.get("details"), dict) else {}
    else:
        code, details = "", {}
        text = body if isinstance(body, str) else ""
        message = f"unexpected HTTP {status} from the daemon" + (f": {text[:200]}" if text else "")
    cls = _BY_CODE.get(code) or _BY_STATUS.get(status) or SandkastenError
    return cls(message, status=status, code=code or cls.code, details=details, request_id=request_id)
