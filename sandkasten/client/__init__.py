"""Python client for the Sandkasten daemon.

    from sandkasten.client import Client
    with Client() as client, client.session(image="python") as sb:   # destroyed on exit
        print(sb.exec("python3 -c 'print(6*7)'").output)

`Client`/`Sandbox` block; `AsyncClient`/`AsyncSandbox` are the asyncio twins
(`async with AsyncClient() as c, c.session() as sb: await sb.exec("ls")`). Both read
`SANDKASTEN_URL` (default http://127.0.0.1:8080) and `SANDKASTEN_API_KEY`, retry while the
daemon restarts (exec carries one Idempotency-Key per call, so it runs once), and raise the
typed errors of `sandkasten.client.errors`."""

from sandkasten.client._async import AsyncClient, AsyncSandbox
from sandkasten.client._sync import Client, Sandbox
from sandkasten.client.errors import (CapacityExceeded, CommandTimeout, Conflict, DaemonUnreachable,
                                      ExecNotFound, FileBusy, FileNotFound, Forbidden, ImageNotAllowed,
                                      ImageNotFound, InvalidRequest, InvalidURL, NotFound, NotReady,
                                      PathRefused, PayloadTooLarge, ProcessExited, ProcessNotFound,
                                      RequestTimeout, SandboxError, SandboxLost, SandkastenError, SessionBusy,
                                      SessionEnded, SessionNotFound, SessionNotRunning, StreamBroken,
                                      TooManyProcesses, Unauthorized, Unavailable, WorkspaceInUse,
                                      WorkspaceNotFound)
from sandkasten.client.models import (ExecChunk, ExecDone, ExecEvent, ExecRecord, ExecResult, FileContent,
                                      FileEntry, Process, ProcessDone, ProcessEvent, ProcessOutput, Session, Stats,
                                      Workspace)

__all__ = [
    "AsyncClient", "AsyncSandbox", "Client", "Sandbox",
    "ExecChunk", "ExecDone", "ExecEvent", "ExecRecord", "ExecResult", "FileContent", "FileEntry", "Session",
    "Stats", "Workspace", "Process", "ProcessDone", "ProcessEvent", "ProcessOutput",
    "ProcessExited", "ProcessNotFound", "TooManyProcesses",
    "CapacityExceeded", "CommandTimeout", "Conflict", "DaemonUnreachable", "ExecNotFound", "FileBusy",
    "FileNotFound", "Forbidden", "ImageNotAllowed", "ImageNotFound", "InvalidRequest", "InvalidURL",
    "NotFound", "NotReady", "PathRefused", "PayloadTooLarge", "RequestTimeout", "SandboxError", "SandboxLost",
    "SandkastenError", "SessionBusy", "SessionEnded", "SessionNotFound", "SessionNotRunning", "StreamBroken",
    "Unauthorized", "Unavailable", "WorkspaceInUse", "WorkspaceNotFound",
]
