"""Results of what ended (execs, processes), kept where a restarted daemon finds them.

Who runs this: the runner. Each result is written to `<id>.json` in the log directory
atomically (tmp + rename, through the directory fd opened before pivot_root) and kept in memory
for the latest few hundred, so a daemon that was down — or a second client — reads the same
answer. Stdlib only, like the rest of the runner.
"""

from __future__ import annotations

import json
import os

KEEP = 512


class Results:
    def __init__(self, logs_fd: int, keep: int = KEEP) -> None:
        self.logs_fd, self.keep = logs_fd, keep
        self.recent: dict[str, dict] = {}

    def store(self, result: dict) -> None:
        tmp = result["id"] + ".json.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600, dir_fd=self.logs_fd)
            try:
                os.write(fd, json.dumps(result).encode())
            finally:
                os.close(fd)
            os.rename(tmp, result["id"] + ".json", src_dir_fd=self.logs_fd, dst_dir_fd=self.logs_fd)
        except OSError:
            pass  # disk full: the result still lives in memory
        self.recent[result["id"]] = result
        if len(self.recent) > self.keep:
            self.recent.pop(next(iter(self.recent)))

    def lookup(self, result_id: str) -> dict | None:
        if result_id in self.recent:
            return self.recent[result_id]
        try:
            fd = os.open(result_id + ".json", os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.logs_fd)
        except OSError:
            return None
        try:
            return json.loads(os.read(fd, 1 << 20))
        except ValueError:
            return None
        finally:
            os.close(fd)
