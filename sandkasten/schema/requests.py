"""One `msgspec.Struct` per JSON request body: the shape every endpoint accepts, defined once.

The daemon's intake (shared by the HTTP API and the CLI) converts a body into its struct —
unknown fields, missing fields, types and the fixed bounds are refused there, with our own
messages (`refused` says what to tell for a field) — then checks what depends on the config
(maxima, allowed images). `/openapi.json` takes its request bodies from these structs
(`components`), and the client SDK builds its bodies with them (`body`).

`None` is "absent" everywhere: a field sent as null takes the daemon's default. Imports
nothing of sandkasten but the vocabulary; msgspec is its one dependency.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

import msgspec
from msgspec import Meta

from sandkasten.schema.vocabulary import MIN_CPU, NETWORK_MODES, WORKSPACE_ID_PATTERN, NetworkMode

MAX_TERMINAL = 1000            # rows and cols of a PTY
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"

Positive = Annotated[int, Meta(ge=1)]
Command = Annotated[str, Meta(min_length=1, pattern=r"\S")]   # not only white space
Side = Annotated[int, Meta(ge=1, le=MAX_TERMINAL)]
Env = Annotated[dict[Annotated[str, Meta(pattern=ENV_NAME_PATTERN)], str],
                Meta(description="variables for every shell of the session: NAME: value")]


class Body(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """A request body: `what` names it in messages ("invalid exec request: ..."), `needs` says
    what a body must hold, `refused` is the message for a field that does not convert
    (`{value!r}` is what was sent; others get "expected an integer", "the minimum is 1", ...)."""

    what: ClassVar[str] = "request"
    needs: ClassVar[str] = ""
    refused: ClassVar[dict[str, str]] = {}

    def body(self) -> dict[str, Any]:
        """The JSON object to send: fields left at their default are left out."""
        return msgspec.to_builtins(self)


class CreateSession(Body):
    what: ClassVar[str] = "session"
    refused: ClassVar[dict[str, str]] = {
        "image": "invalid image {value!r}: expected a name",
        "network_mode": "invalid network_mode {value!r}: expected one of " + ", ".join(NETWORK_MODES),
        "env": 'invalid env: expected an object of NAME: "value" strings',
        "workspace_id": "invalid workspace_id {value!r}: expected 1-64 of [A-Za-z0-9_.-], starting with a "
                        "letter or digit",
        "egress_allow": "invalid egress_allow: expected a list of CIDRs or host names",
    }

    image: Annotated[str, Meta(min_length=1)] | None = None
    ttl_seconds: Positive | None = None
    workspace_id: Annotated[str, Meta(pattern=WORKSPACE_ID_PATTERN)] | None = None
    cpu_limit: Annotated[float, Meta(ge=MIN_CPU, description="cores")] | None = None
    mem_limit_mb: Annotated[int, Meta(ge=8)] | None = None
    pids_limit: Annotated[int, Meta(ge=4)] | None = None
    network_mode: NetworkMode | None = None
    egress_allow: Annotated[list[str], Meta(
        description="bridge mode: CIDRs or host names the sandbox may reach")] | None = None
    env: Env | None = None
    readonly_rootfs: bool | None = None


class Exec(Body):
    """A command for the session's persistent shell (`/exec` and `/exec/stream`)."""

    what: ClassVar[str] = "exec"
    needs: ClassVar[str] = " with a 'cmd'"
    refused: ClassVar[dict[str, str]] = {"cmd": "invalid exec request: 'cmd' must be a non-empty string"}

    cmd: Command
    timeout_ms: Positive | None = None
    raw_output: bool | None = None
    max_output_bytes: Positive | None = None


class Terminal(Body):
    """A process's terminal size; what is left out is 24 rows by 80 columns."""

    what: ClassVar[str] = "pty"

    rows: Side | None = None
    cols: Side | None = None


class StartProcess(Body):
    what: ClassVar[str] = "process"
    needs: ClassVar[str] = " with a 'cmd'"
    refused: ClassVar[dict[str, str]] = {
        "cmd": "invalid process request: 'cmd' must be a non-empty string",
        "cwd": "invalid cwd {value!r}: expected an absolute path in the sandbox",
        "env": 'invalid env: expected an object of NAME: "value" strings',
        "pty": 'invalid pty: expected {{"rows": N, "cols": N}} or true',
    }

    cmd: Annotated[Command, Meta(description="run by sh -c beside the shell")]
    cwd: Annotated[str, Meta(pattern="^/", max_length=4096,
                             description="absolute path in the sandbox (default /workspace)")] | None = None
    env: Env | None = None
    pty: Annotated[bool | Terminal, Meta(
        description="a terminal of this size (true: 24x80); output is then one stream")] | None = None
    timeout_ms: Annotated[int, Meta(
        ge=1, description="SIGTERM to its process group after this long, SIGKILL 2 s later")] | None = None


class Stdin(Body):
    what: ClassVar[str] = "stdin"
    needs: ClassVar[str] = " with 'data', 'data_base64' or 'eof'"
    refused: ClassVar[dict[str, str]] = {
        "data": "invalid data: expected a string (or use data_base64 for bytes)",
        "data_base64": "invalid data_base64: expected base64 text",
    }

    data: Annotated[str, Meta(description="text, sent as UTF-8")] | None = None
    data_base64: Annotated[str, Meta(description="bytes, base64")] | None = None
    eof: bool | None = None


class Resize(Body):
    what: ClassVar[str] = "resize"
    needs: ClassVar[str] = " with 'rows' and 'cols'"

    rows: Side
    cols: Side


class Signal(Body):
    what: ClassVar[str] = "signal"
    needs: ClassVar[str] = " with a 'signal'"
    refused: ClassVar[dict[str, str]] = {
        "signal": "invalid signal {value!r}: expected a name like SIGTERM, TERM or INT, or its number"}

    signal: Annotated[str | int, Meta(description="SIGTERM, TERM, term or 15")]


class WriteFile(Body):
    what: ClassVar[str] = "write"
    refused: ClassVar[dict[str, str]] = {
        "path": "invalid write: 'path' (string) is required",
        "text": "invalid write: 'text' (string) or 'content_base64' is required",
        "content_base64": "invalid write: 'text' (string) or 'content_base64' is required",
    }

    path: str
    text: str | None = None
    content_base64: str | None = None


REQUEST_BODIES: tuple[type[Body], ...] = (CreateSession, Exec, StartProcess, Stdin, Resize, Signal, WriteFile)


def components(ref_template: str = "#/components/schemas/{name}") -> dict[str, Any]:
    """The JSON Schemas of every request body (and what they refer to), by struct name."""
    _, schemas = msgspec.json.schema_components(REQUEST_BODIES, ref_template=ref_template)
    return schemas
