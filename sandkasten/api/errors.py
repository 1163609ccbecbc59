"""The one place that maps error codes to HTTP statuses and renders error bodies:
`{"error_code": "...", "message": "...", "details": {...}}`."""

from __future__ import annotations

from sanic import json
from sanic.exceptions import SanicException

from sandkasten.errors import SandkastenError

STATUS = {
    "INVALID_REQUEST": 400, "PATH_REFUSED": 400, "IMAGE_NOT_FOUND": 400, "INVALID_JSON": 400, "IMAGE_INVALID": 400,
    "IMAGE_NOT_ALLOWED": 400, "UNAUTHORIZED": 401, "FORBIDDEN": 403,
    "SESSION_NOT_FOUND": 404, "EXEC_NOT_FOUND": 404, "FILE_NOT_FOUND": 404, "WORKSPACE_NOT_FOUND": 404,
    "PROCESS_NOT_FOUND": 404,
    "NOT_FOUND": 404, "METHOD_NOT_ALLOWED": 405,
    "SESSION_NOT_RUNNING": 409, "SESSION_BUSY": 409, "ILLEGAL_TRANSITION": 409, "CONFLICT": 409,
    "WORKSPACE_IN_USE": 409, "FILE_BUSY": 409, "DUPLICATE_IDEMPOTENCY_KEY": 409,
    "PROCESS_EXITED": 409, "TOO_MANY_PROCESSES": 409,
    "SESSION_ENDED": 410, "SANDBOX_LOST": 410,
    "REQUEST_TIMEOUT": 408, "PAYLOAD_TOO_LARGE": 413, "CAPACITY_EXCEEDED": 429, "UNSUPPORTED_MEDIA_TYPE": 415,
    "COMMAND_TIMEOUT": 504, "NOT_READY": 503, "SANDBOX_ERROR": 503, "JOURNAL_ERROR": 503,
    "JOURNAL_TAMPERED": 503, "IMAGE_BUILD_FAILED": 503,
    "HOST_FENCED": 409, "NO_HOST_AVAILABLE": 503, "HOST_UNREACHABLE": 503,  # cluster (sandkasten.cluster)
}
SANIC_CODES = {400: "INVALID_REQUEST", 401: "UNAUTHORIZED", 404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED",
               413: "PAYLOAD_TOO_LARGE", 415: "UNSUPPORTED_MEDIA_TYPE", 408: "REQUEST_TIMEOUT",
               503: "NOT_READY"}


class Answer(Exception):
    """Raised where a response cannot be returned (the auth hook is a signal) to answer with
    this one; every error handler returns it as it is."""

    def __init__(self, response) -> None:
        super().__init__("answered early")
        self.response = response


def body(code: str, message: str, details: dict | None = None, status: int | None = None):
    return json({"error_code": code, "message": message, "details": details or {}},
                status=status or STATUS.get(code, 500))


def render(exc: Exception):
    if isinstance(exc, SandkastenError):
        return body(exc.code, exc.message, _jsonable(exc.details))
    if isinstance(exc, SanicException):
        status = getattr(exc, "status_code", 500)
        code = SANIC_CODES.get(status, "INTERNAL")
        return body(code, str(exc) or code.lower().replace("_", " "), status=status)
    return body("INTERNAL", f"internal error: {type(exc).__name__}; see the daemon log", status=500)


def _jsonable(details: dict) -> dict:
    return {k: v if isinstance(v, (str, int, float, bool, type(None), list, dict)) else str(v)
            for k, v in details.items()}
