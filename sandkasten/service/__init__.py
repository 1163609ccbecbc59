"""The service layer: what a client can ask for — create, exec, destroy a session, write and
delete files, delete a workspace — done once, for the HTTP API and the CLI alike: validate
(`sandkasten.intake`), admit, journal the intent, have it done, wait.

Who runs this: the API's handlers (parse, call, present) and the CLI's `create`/`exec`/`rm`.
The one difference between them is how they wait (`waiting.Waiter`): in the daemon on the
executor's keyed tasks (`Settling`), in the CLI by polling the journal while a daemon runs,
or not at all when none does (the intent stays queued; `Polling`).
"""

from __future__ import annotations

from dataclasses import dataclass

from sandkasten.service.files import Files
from sandkasten.service.sessions import Caller, Claims, Sessions, Submitted
from sandkasten.service.waiting import Polling, Settling, Waiter
from sandkasten.service.workspaces import Workspaces

__all__ = ["Caller", "Claims", "Files", "Polling", "Service", "Sessions", "Settling", "Submitted", "Waiter",
           "Workspaces"]


@dataclass(frozen=True)
class Service:
    """The daemon's: sessions and execs, files, workspaces."""

    sessions: Sessions
    files: Files
    workspaces: Workspaces
