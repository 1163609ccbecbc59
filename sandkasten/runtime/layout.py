"""Deterministic names: everything a sandbox owns on the host is found from its session id
alone, so a restarted daemon (or `sandkasten doctor`) can find it again."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from sandkasten.runtime.spec import check_session_id


@dataclass(frozen=True)
class Layout:
    data_dir: Path

    @property
    def sessions(self) -> Path:
        return self.data_dir / "sessions"

    @property
    def run(self) -> Path:
        return self.data_dir / "run"

    @property
    def logs(self) -> Path:
        return self.data_dir / "logs"

    @property
    def workspaces(self) -> Path:
        return self.data_dir / "workspaces"

    @property
    def disk_templates(self) -> Path:   # runtime.disk: one empty ext4 per disk size, copied per sandbox
        return self.data_dir / "disk-templates"

    @property
    def ready_disks(self) -> Path:   # runtime.ready_disks: disks mounted ahead, one dir per daemon
        return self.data_dir / "ready-disks"

    def of(self, sid: str) -> SessionPaths:
        found = _known.get((self.data_dir, sid))
        if found is None:   # building the paths costs more than an exec's journal append: keep them
            check_session_id(sid)
            found = SessionPaths(root=self.sessions / sid, run=self.run / sid, logs=self.logs / sid)
            if len(_known) >= _KNOWN_MAX:
                _known.clear()
            _known[(self.data_dir, sid)] = found
        return found


_KNOWN_MAX = 4096
_known: dict[tuple[Path, str], SessionPaths] = {}


@dataclass(frozen=True)
class SessionPaths:
    root: Path      # sessions/<sid>: overlay upper, work, mount point, per-session workspace
    run: Path       # run/<sid>: runner socket and pid file (ephemeral)
    logs: Path      # logs/<sid>: one framed output log + one meta file per exec (kept after teardown)

    @property
    def disk(self) -> Path:   # the sandbox's own disk (runtime.disk): upper, work, workspace
        return self.root / "disk"

    @property
    def disk_image(self) -> Path:
        return self.root / "disk.img"

    @property
    def _files(self) -> Path:  # sandboxes made before disks existed keep theirs in root itself
        return self.disk if self.disk.is_dir() else self.root

    @property
    def upper(self) -> Path:
        return self._files / "upper"

    @property
    def work(self) -> Path:
        return self._files / "work"

    @property
    def rootfs(self) -> Path:
        return self.root / "rootfs"

    @property
    def workspace(self) -> Path:
        return self._files / "workspace"

    @cached_property
    def socket(self) -> Path:   # (cached: every call to the runner names it)
        return self.run / "runner.sock"

    @property
    def pidfile(self) -> Path:
        return self.run / "runner.pid"

    @property
    def network_marker(self) -> Path:  # bridge mode: written by the spawner before any veth
        return self.run / "network.json"
