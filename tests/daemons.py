"""A real daemon on a loopback port for black-box tests: started with the console script,
driven over HTTP, stopped (and every sandbox it made torn down) even when a test fails."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import yaml

from sandkasten import install
from sandkasten.runtime import cgroups as cgroups_mod
from sandkasten.runtime.procfs import mounts_under
from sandkasten.runtime.sandboxes import Runtime
from tests.inprocess import run_cli

REPO = Path(__file__).resolve().parent.parent
BIN = REPO / ".venv" / "bin"
API_KEY = "test-key-123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DaemonProc:
    def __init__(self, data_dir: Path, cgroup_parent: str | None, **overrides):
        """`cgroup_parent=None`: the config leaves it out (the default: this install's own)."""
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = data_dir.parent / "sandkasten.yaml"
        cfg = {"listen": f"127.0.0.1:{self.port}", "api_key": API_KEY, "data_dir": str(data_dir),
               "default_image": "base", **overrides}
        if cgroup_parent is not None:
            cfg["cgroup_parent"] = cgroup_parent
        self.config_path.write_text(yaml.safe_dump(cfg))
        self.own_parent = cgroup_parent is None
        self._cgroup_parent = cgroup_parent
        self.proc: subprocess.Popen | None = None
        self.client = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {API_KEY}"},
                                   timeout=60)

    @property
    def cgroup_parent(self) -> str:
        return self._cgroup_parent or install.ensure(self.data_dir).cgroup_parent

    def cli(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
        """`sandkasten --config <this daemon's> ARGS`, called in this process (tests/inprocess.py)."""
        return run_cli(["--config", str(self.config_path), *args], input=input)

    def start(self, wait_ready: bool = True) -> "DaemonProc":
        self.log = open(self.data_dir.parent / "daemon.log", "ab")
        self.proc = subprocess.Popen([str(BIN / "sandkasten"), "--config", str(self.config_path)],
                                     stdout=self.log, stderr=self.log, start_new_session=True)
        deadline = time.monotonic() + 60
        path = "/readyz" if wait_ready else "/healthz"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}: {self.read_log()[-3000:]}")
            try:
                if self.client.get(path).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"daemon not ready: {self.read_log()[-3000:]}")

    def read_log(self) -> str:
        return (self.data_dir.parent / "daemon.log").read_text(errors="replace")

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)
        if self.proc:
            self.log.close()
        self.proc = None

    def close(self) -> None:
        """Stop the daemon and remove every sandbox it left (sandboxes outlive daemons)."""
        self.kill(signal.SIGTERM)
        self.client.close()
        rt = Runtime.detect(self.data_dir, cgroup_parent=self.cgroup_parent)
        try:
            rt.remove_all()
        finally:
            rt.close()
        left = mounts_under(self.data_dir)
        assert not left, f"mounts left under {self.data_dir} after its daemon and sandboxes are gone: {left}"
        if self.own_parent:  # this install's own parent: nobody else's groups are in it
            cgroups_mod.detect(parent=self.cgroup_parent).destroy_parent()


def make_data_dir(tmp_path: Path, image_cache: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir(exist_ok=True)
    link = d / "images"
    if not link.exists():
        link.symlink_to(image_cache)
    os.chmod(tmp_path, 0o755)
    return d
