"""The daemon's errors (`sandkasten.client.errors`) as the Agents SDK's sandbox errors: one
place for the translation, keeping the daemon's error code and message in the SDK error's
context (so the model and the logs see why)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from agents.sandbox.errors import ExecTransportError

from sandkasten.client import errors as client_errors


def reason_of(error: client_errors.SandkastenError) -> dict[str, object]:
    return {"error_code": error.code, "message": error.message, "backend": "sandkasten"}


def transport_error(command: Sequence[str | Path], error: client_errors.SandkastenError,
                    doing: str) -> ExecTransportError:
    """`unable to <doing>: <the daemon's message>`, as the SDK's ExecTransportError."""
    return ExecTransportError(command=command, context=reason_of(error), cause=error,
                              message=f"unable to {doing}: {error.message}")
