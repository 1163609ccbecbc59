"""inotify on the output logs: a follower wakes the moment a runner appends to a log.

Who runs this: the daemon's event loop (one inotify descriptor, read through
`loop.add_reader`). Runners append output frames to `logs/<sid>/<id>.log`; a stream that has
read to the end of such a file arms a `Ticket` for it *before* its last read, then waits on the
ticket: a write after that read wakes it at once, so a keystroke's echo reaches the client
without a polling delay. One watch per log directory, dropped UNWATCH_AFTER_S after nobody
waits on it any more. When inotify is unavailable (no ctypes libc, the watch limit reached)
`arm` returns None and the caller falls back to polling.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import os
import struct
from pathlib import Path

log = logging.getLogger("sandkasten.files.log_watch")
IN_MODIFY, IN_CLOSE_WRITE, IN_MOVED_TO, IN_CREATE = 0x2, 0x8, 0x80, 0x100
IN_Q_OVERFLOW, IN_IGNORED = 0x4000, 0x8000
IN_NONBLOCK, IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
_EVENT = struct.Struct("iIII")
_MASK = IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE
UNWATCH_AFTER_S = 2.0   # a directory nobody waits on stays watched this long (followers re-arm at once)


def _key(name: str) -> str:
    """`x-1.log` and `x-1.json` wake the same followers: output, or the end of it."""
    return name.split(".", 1)[0]


class Ticket:
    """One follower's interest in one file, armed before its last read."""

    def __init__(self, watch: LogWatch, directory: str, key: str, event: asyncio.Event | None = None) -> None:
        self.watch, self.directory, self.key = watch, directory, key
        self.event = event or asyncio.Event()

    async def wait(self, timeout: float) -> bool:
        """True when the file changed, False on timeout. Releases the ticket either way."""
        try:
            await asyncio.wait_for(self.event.wait(), timeout)
            return True
        except TimeoutError:
            return False
        finally:
            self.close()

    def close(self) -> None:
        self.watch._release(self)


class LogWatch:
    def __init__(self) -> None:
        self.fd = -1
        self.dirs: dict[str, int] = {}                   # directory -> watch descriptor
        self.names: dict[int, str] = {}                  # watch descriptor -> directory
        self.tickets: dict[tuple[str, str], set[Ticket]] = {}
        self._unwatching: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        try:
            self._libc = ctypes.CDLL(None, use_errno=True)
            fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        except (OSError, AttributeError):
            fd = -1
        if fd < 0:
            log.warning("inotify unavailable: streams poll their logs")
            return
        self.fd = fd

    def arm(self, path: Path, event: asyncio.Event | None = None) -> Ticket | None:
        """A ticket whose event (`event`, or its own) is set when `path` changes."""
        if self.fd < 0:
            return None
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self.fd, self._on_readable)
        directory, name = os.path.split(os.fspath(path))
        if directory not in self.dirs:
            wd = self._libc.inotify_add_watch(self.fd, directory.encode(), _MASK)
            if wd < 0:
                err = ctypes.get_errno()
                if err not in (errno.ENOENT,):
                    log.warning("unable to watch %s: %s", directory, os.strerror(err))
                return None
            self.dirs[directory] = wd
            self.names[wd] = directory
        ticket = Ticket(self, directory, _key(name), event)
        self.tickets.setdefault((directory, ticket.key), set()).add(ticket)
        return ticket

    def _release(self, ticket: Ticket) -> None:
        waiting = self.tickets.get((ticket.directory, ticket.key))
        if waiting is None:
            return
        waiting.discard(ticket)
        if waiting:
            return
        del self.tickets[(ticket.directory, ticket.key)]
        if self._loop is not None and ticket.directory not in self._unwatching:
            # a follower re-arms right after each wake: keep the watch a while instead of
            # removing and adding it again around every chunk
            self._unwatching.add(ticket.directory)
            self._loop.call_later(UNWATCH_AFTER_S, self._unwatch, ticket.directory)

    def _unwatch(self, directory: str) -> None:
        self._unwatching.discard(directory)
        if self.fd < 0 or any(d == directory for d, _ in self.tickets):
            return
        wd = self.dirs.pop(directory, None)
        if wd is not None:
            self.names.pop(wd, None)
            self._libc.inotify_rm_watch(self.fd, wd)

    def _on_readable(self) -> None:
        try:
            buf = os.read(self.fd, 64 * 1024)
        except BlockingIOError:
            return
        except OSError as e:
            log.warning("inotify read failed: %s", e)
            return
        pos = 0
        while pos + _EVENT.size <= len(buf):
            wd, mask, _cookie, length = _EVENT.unpack_from(buf, pos)
            name = buf[pos + _EVENT.size:pos + _EVENT.size + length].split(b"\0", 1)[0].decode(errors="replace")
            pos += _EVENT.size + length
            if mask & IN_Q_OVERFLOW:   # events were lost: wake everybody, they re-read
                for waiting in self.tickets.values():
                    for t in waiting:
                        t.event.set()
                continue
            if mask & IN_IGNORED:      # the directory went away (session removed)
                directory = self.names.pop(wd, None)
                if directory is not None:
                    self.dirs.pop(directory, None)
                continue
            directory = self.names.get(wd)
            for t in self.tickets.get((directory, _key(name)), ()) if directory else ():
                t.event.set()

    def close(self) -> None:
        if self.fd >= 0:
            if self._loop is not None:
                self._loop.remove_reader(self.fd)
            os.close(self.fd)
            self.fd = -1
