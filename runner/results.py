"""Results of what ended (execs, processes) and the record of what started, kept where a
restarted daemon — or the next runner of the same session — finds them.

Who runs this: the runner; the daemon reads with `find`. Both go to one append-only file per
session, `runner.ledger` in the log directory (through the directory fd opened before
pivot_root): a line `S <id>` when an exec starts, a line `R <json>` when an exec or a process
ends. One small O_APPEND write per record, no file created per command (creating a file costs
an inode allocation, 30-300 µs on a busy ext4: more than the rest of an exec). The latest few
hundred results stay in memory too. A torn last line (the runner killed mid-write) is skipped.
Results of runners from before the ledger are still read from `<id>.json`. Stdlib only, like
the rest of the runner.
"""

from __future__ import annotations

import json
import os

KEEP = 512
LEDGER = "runner.ledger"


class Results:
    def __init__(self, logs_fd: int, keep: int = KEEP) -> None:
        self.logs_fd, self.keep = logs_fd, keep
        self.recent: dict[str, dict] = {}
        try:
            self.fd = os.open(LEDGER, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600, dir_fd=logs_fd)
        except OSError:
            self.fd = -1   # disk full or read-only: results live in memory only

    def started(self, exec_id: str) -> None:
        """Record that an exec id was handed to the shell (the next runner must not run it again)."""
        self._append(b"S " + exec_id.encode() + b"\n")

    def store(self, result: dict) -> None:
        self._append(b"R " + json.dumps(result).encode() + b"\n")
        self.recent[result["id"]] = result
        if len(self.recent) > self.keep:
            self.recent.pop(next(iter(self.recent)))

    def _append(self, line: bytes) -> None:
        if self.fd >= 0:
            try:
                os.write(self.fd, line)
            except OSError:
                pass  # disk full: the result still lives in memory

    def lookup(self, result_id: str) -> dict | None:
        if result_id in self.recent:
            return self.recent[result_id]
        return _find(self.logs_fd, result_id)[0]

    def started_before(self, exec_id: str) -> bool:
        """Did an earlier runner (or this one, long ago) start this id? From the ledger, or the
        log file runners created for every exec before the ledger existed."""
        if _find(self.logs_fd, exec_id)[1]:
            return True
        try:
            os.stat(exec_id + ".log", dir_fd=self.logs_fd)
            return True
        except OSError:
            return False


def find(logs_dir, result_id: str) -> dict | None:
    """The daemon's side: the result of `result_id` in a session's log directory, or None."""
    try:
        fd = os.open(logs_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return _find(fd, result_id)[0]
    finally:
        os.close(fd)


def _find(dir_fd: int, result_id: str) -> tuple[dict | None, bool]:
    """(its result, whether it started) from the ledger; the result also from `<id>.json`."""
    started = False
    try:
        with open(os.open(LEDGER, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd), "rb") as f:
            data = f.read()
    except OSError:
        data = b""
    if data:
        started = (b"S " + result_id.encode() + b"\n") in data
        key = b'"id": ' + json.dumps(result_id).encode()
        at = data.rfind(key)
        while at >= 0:
            start = data.rfind(b"\n", 0, at) + 1
            end = data.find(b"\n", at)
            line = data[start:end if end >= 0 else len(data)]
            if line.startswith(b"R ") and end >= 0:
                try:
                    found = json.loads(line[2:])
                except ValueError:
                    found = None
                if isinstance(found, dict) and found.get("id") == result_id:
                    return found, True
            at = data.rfind(key, 0, start)
    try:
        fd = os.open(result_id + ".json", os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None, started
    try:
        return json.loads(os.read(fd, 1 << 20)), True
    except ValueError:
        return None, started
    finally:
        os.close(fd)
