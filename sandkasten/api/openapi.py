"""The OpenAPI 3.1 document: paths and answers written by hand so they say exactly what the
routes do; request bodies from the structs the daemon validates them with (sandkasten.schema)."""

from __future__ import annotations

from sandkasten import __version__
from sandkasten.schema import requests
from sandkasten.schema.vocabulary import WORKSPACE_ID_PATTERN, ProcessStatus, SessionStatus

ERROR = {"$ref": "#/components/schemas/Error"}


def _op(summary: str, ok: int = 200, body: str | None = None, params: list | None = None,
        result: dict | None = None, errors=(400, 401, 404)) -> dict:
    op: dict = {"summary": summary, "responses": {str(ok): {"description": "ok", "content": {
        "application/json": {"schema": result or {"type": "object"}}}}}}
    for code in errors:
        op["responses"][str(code)] = {"description": "error", "content": {"application/json": {"schema": ERROR}}}
    if body:
        op["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{body}"}}}}
    if params:
        op["parameters"] = params
    return op


def _tar(op: dict, answer: bool) -> dict:
    """An operation whose answer (or body) is a tar stream instead of JSON."""
    tar = {"application/x-tar": {"schema": {"type": "string", "format": "binary"}}}
    if answer:
        op["responses"]["200"]["content"] = tar
    else:
        op["requestBody"] = {"required": True, "content": tar}
    return op


def _q(name: str, typ: str = "string", required: bool = False) -> dict:
    return {"name": name, "in": "query", "required": required, "schema": {"type": typ}}


SID = {"name": "sid", "in": "path", "required": True, "schema": {"type": "string"}}
PID = {"name": "process_id", "in": "path", "required": True, "schema": {"type": "string"}}
IDEMPOTENCY_KEY = {"name": "Idempotency-Key", "in": "header", "schema": {"type": "string"}}
TERMINAL = {"type": "object", "additionalProperties": False, "properties": {
    "rows": {"type": "integer", "minimum": 1, "maximum": 1000},
    "cols": {"type": "integer", "minimum": 1, "maximum": 1000}}}
EID = {"name": "exec_id", "in": "path", "required": True, "schema": {"type": "string"}}
WID = {"name": "wid", "in": "path", "required": True,
       "schema": {"type": "string", "pattern": WORKSPACE_ID_PATTERN}}
LAST_EVENT_ID = {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string"},
                 "description": "resume after this event id (also ?last_event_id=)"}
SSE_DOC = ("text/event-stream. Events: `started` {exec_id, session_id}; `chunk` {chunk, stream: "
           "stdout|stderr, timestamp, chunk_base64 if raw_output}; then `done` {exit_code, cwd, duration_ms, "
           "timed_out, truncated} or `error` {error_code, message}. Every event has an `id:` (the exec log "
           "offset after the chunk); send the last one back as Last-Event-ID to resume with no byte lost or "
           "repeated, also after a daemon restart. `: keepalive` comments every 10 s.")


def _sse(summary: str, **kw) -> dict:
    op = _op(summary, **kw)
    op["description"] = SSE_DOC
    op["responses"]["200"] = {"description": "event stream", "content": {"text/event-stream": {
        "schema": {"type": "string"}}}}
    return op


def _upload(summary: str, params: list) -> dict:
    op = _op(summary, params=params, errors=(400, 401, 404, 409, 413))
    op["requestBody"] = {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "properties": {
            "dir": {"type": "string", "description": "target directory, default /workspace"},
            "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                      "description": "one or more file parts; each file name must be a plain name"}}}}}}
    return op


def document() -> dict:
    session = {"$ref": "#/components/schemas/Session"}
    process = {"$ref": "#/components/schemas/Process"}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Sandkasten", "version": __version__,
                 "description": "Event-sourced Linux sandboxes for AI agents."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error_code", "message"], "properties": {
                    "error_code": {"type": "string"}, "message": {"type": "string"},
                    "details": {"type": "object"}}},
                "Session": {"type": "object", "properties": {
                    "id": {"type": "string"}, "image": {"type": "string"},
                    "status": {"type": "string", "enum": [s.value for s in SessionStatus]},
                    "cwd": {"type": "string"}, "workspace_id": {"type": ["string", "null"]},
                    "created_at": {"type": "string"}, "expires_at": {"type": "string"}}},
                "ExecResult": {"type": "object", "properties": {
                    "exec_id": {"type": "string"}, "exit_code": {"type": "integer"}, "cwd": {"type": "string"},
                    "output": {"type": "string"}, "stdout": {"type": "string"}, "stderr": {"type": "string"},
                    "truncated": {"type": "boolean"}, "duration_ms": {"type": "number"},
                    "timed_out": {"type": "boolean"},
                    "oom_kills": {"type": "integer", "description": "processes the kernel's OOM killer ended in "
                                  "the sandbox while the command ran (the memory limit was reached)"}}},
                "Process": {"type": "object", "properties": {
                    "process_id": {"type": "string"}, "session_id": {"type": "string"}, "cmd": {"type": "string"},
                    "status": {"type": "string", "enum": [s.value for s in ProcessStatus]},
                    "pid": {"type": ["integer", "null"]}, "exit_code": {"type": ["integer", "null"]},
                    "signal": {"type": ["string", "null"], "description": "the signal that ended it"},
                    "pty": {"oneOf": [TERMINAL, {"type": "null"}]}, "started_at": {"type": ["string", "null"]},
                    "exited_at": {"type": ["string", "null"]}, "stdout_bytes": {"type": "integer"},
                    "stderr_bytes": {"type": "integer"}, "output_bytes": {"type": "integer"},
                    "output_sha256": {"type": ["string", "null"]}, "dropped_bytes": {"type": "integer"},
                    "input_bytes": {"type": "integer"}}},
                **requests.components(),   # the request bodies, from their structs
            },
        },
        "security": [{"bearer": []}],
        "paths": {
            "/healthz": {"get": {**_op("liveness", errors=()), "security": []}},
            "/readyz": {"get": _op("ready after the first full reconcile", errors=(401, 503))},
            "/metrics": {"get": _op("Prometheus metrics", errors=(401,))},
            "/v1/sessions": {
                "post": _op("create a session", 201, "CreateSession", result=session, errors=(400, 401, 404, 503)),
                "get": _op("list sessions", params=[_q("all", "boolean")], result={"type": "array", "items": session}),
            },
            "/v1/sessions/{sid}": {
                "get": _op("get a session", params=[SID], result=session),
                "delete": _op("destroy a session", params=[SID]),
            },
            "/v1/sessions/{sid}/stats": {"get": _op("cgroup statistics", params=[SID], errors=(401, 404, 409))},
            "/v1/sessions/{sid}/exec": {"post": {**_op(
                "run a command in the session's persistent shell", body="Exec",
                params=[SID, {"name": "Idempotency-Key", "in": "header", "schema": {"type": "string"}}],
                result={"$ref": "#/components/schemas/ExecResult"}, errors=(400, 401, 404, 409, 410, 413))}},
            "/v1/sessions/{sid}/exec/stream": {"post": _sse(
                "run a command and stream its output as Server-Sent Events", body="Exec",
                params=[SID, {"name": "Idempotency-Key", "in": "header", "schema": {"type": "string"}},
                        LAST_EVENT_ID], errors=(400, 401, 404, 409, 410, 413))},
            "/v1/sessions/{sid}/execs/{exec_id}/stream": {"get": _sse(
                "re-attach to a running or finished exec's output", params=[
                    SID, EID, LAST_EVENT_ID, _q("last_event_id"), _q("raw_output", "boolean")])},
            "/v1/sessions/{sid}/execs": {"get": _op("exec history", params=[SID])},
            "/v1/sessions/{sid}/execs/{exec_id}": {"get": _op("one exec with output", params=[SID, EID])},
            "/v1/sessions/{sid}/processes": {
                "post": _op("start a process beside the persistent shell (with a PTY if asked)", 201,
                            "StartProcess", params=[SID, IDEMPOTENCY_KEY], result=process,
                            errors=(400, 401, 404, 409, 410)),
                "get": _op("processes of the session (running ones, or all)", params=[SID, _q("all", "boolean")],
                           result={"type": "array", "items": process}),
            },
            "/v1/sessions/{sid}/processes/{process_id}": {
                "get": _op("one process: status, exit code or signal, byte counts, output hash",
                           params=[SID, PID], result=process),
                "delete": _op("kill a process (SIGKILL to its process group)", params=[SID, PID]),
            },
            "/v1/sessions/{sid}/processes/{process_id}/stdin": {"post": _op(
                "write to a process's stdin (journaled: size, sha256 and the bytes)", body="Stdin",
                params=[SID, PID], errors=(400, 401, 404, 409, 410, 413))},
            "/v1/sessions/{sid}/processes/{process_id}/resize": {"post": _op(
                "resize a process's terminal", body="Resize", params=[SID, PID], errors=(400, 401, 404, 409, 410))},
            "/v1/sessions/{sid}/processes/{process_id}/signal": {"post": _op(
                "send a signal to a process's group", body="Signal", params=[SID, PID],
                errors=(400, 401, 404, 409, 410))},
            "/v1/sessions/{sid}/processes/{process_id}/stream": {"get": _sse(
                "a process's output as Server-Sent Events (same frames as exec streams; `done` has exit_code "
                "and signal; `dropped` says the oldest output of a long log is gone)",
                params=[SID, PID, LAST_EVENT_ID, _q("last_event_id"), _q("raw_output", "boolean")])},
            "/v1/sessions/{sid}/processes/{process_id}/output": {"get": _op(
                "a process's output from an offset, for polling clients (next_offset, eof)",
                params=[SID, PID, _q("offset", "integer"), _q("max_bytes", "integer")])},
            "/v1/sessions/{sid}/fs/write": {"post": _op("write a file in /workspace", body="WriteFile",
                                                        params=[SID], errors=(400, 401, 404, 413))},
            "/v1/sessions/{sid}/fs/upload": {"post": _upload("upload files (multipart) into /workspace", [SID])},
            "/v1/sessions/{sid}/fs/read": {"get": _op("read a file in /workspace", params=[
                SID, _q("path", required=True), _q("max_bytes", "integer")])},
            "/v1/sessions/{sid}/fs/archive": {
                "get": _tar(_op("the whole /workspace as one tar, streamed (symlinks stay symlinks)",
                                params=[SID], errors=(401, 404, 409, 410)), answer=True),
                "post": _tar(_op("extract a tar into /workspace (absolute names, '..', links out, devices refused)",
                                 params=[SID, _q("external_symlinks", "boolean")],
                                 errors=(400, 401, 404, 409, 410, 413)), answer=False),
            },
            "/v1/sessions/{sid}/fs": {
                "get": _op("list files", params=[SID, _q("path"), _q("recursive", "boolean")]),
                "delete": _op("delete a file or directory", params=[SID, _q("path", required=True),
                                                                    _q("recursive", "boolean")]),
            },
            "/v1/workspaces": {"get": _op("list persistent workspaces (size on disk, sessions using them)",
                                          errors=(401,))},
            "/v1/workspaces/{wid}": {"delete": _op(
                "delete a workspace (409 WORKSPACE_IN_USE while a live session uses it, unless force)",
                params=[WID, _q("force", "boolean")], errors=(400, 401, 404, 409))},
            "/v1/workspaces/{wid}/fs/write": {"post": _op(
                "write a file in a workspace (creates the workspace)", body="WriteFile", params=[WID],
                errors=(400, 401, 413))},
            "/v1/workspaces/{wid}/fs/upload": {"post": _upload(
                "upload files (multipart) into a workspace (creates the workspace)", [WID])},
            "/v1/workspaces/{wid}/fs": {"get": _op("list files of a workspace", params=[
                WID, _q("path"), _q("recursive", "boolean")])},
            "/v1/workspaces/{wid}/fs/read": {"get": _op("read a file of a workspace", params=[
                WID, _q("path", required=True), _q("max_bytes", "integer")])},
        },
    }
