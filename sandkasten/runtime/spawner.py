"""The daemon's handle on the zygote process (see `zygote.py`): start it, send it spawn
requests one at a time, restart it if it died. Blocking; the daemon calls it from a worker
thread. Starting a subprocess (fork+exec) is safe in a threaded process; forking the
sandbox itself is not, which is why the zygote exists."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

from sandkasten.errors import SandboxError


class Spawner:
    def __init__(self, cgroup_root: Path, cgroup_parent: str, spares_dir: Path | None = None):
        self.args = [sys.executable, "-m", "sandkasten.runtime.zygote", str(cgroup_root), cgroup_parent,
                     str(spares_dir or "")]
        self.proc: subprocess.Popen[bytes] | None = None
        self.lock = threading.Lock()

    def _ensure(self) -> subprocess.Popen[bytes]:
        if self.proc is not None and self.proc.poll() is None:
            return self.proc
        self.proc = subprocess.Popen(self.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=None, close_fds=True)
        hello = _pipes(self.proc)[1].readline()
        if not hello:
            code = self.proc.wait()
            raise SandboxError(f"unable to start the spawner: it exited with code {code}")
        return self.proc

    def request(self, msg: dict) -> dict:
        with self.lock:
            stdin, stdout = _pipes(self._ensure())
            try:
                stdin.write((json.dumps(msg) + "\n").encode())
                stdin.flush()
                line = stdout.readline()
            except BrokenPipeError:
                line = b""
            if not line:
                self.proc = None
                raise SandboxError("unable to spawn sandbox: the spawner died; it restarts on the next request")
            return json.loads(line)

    def close(self) -> None:
        with self.lock:
            if self.proc is not None:
                stdin, stdout = _pipes(self.proc)
                stdin.close()
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
                stdout.close()
                self.proc = None


def _pipes(proc: subprocess.Popen[bytes]) -> tuple[IO[bytes], IO[bytes]]:
    """The zygote's stdin and stdout: always pipes (`_ensure` starts it so)."""
    assert proc.stdin is not None and proc.stdout is not None
    return proc.stdin, proc.stdout
