"""This install's identity on the host: one data_dir, one id, one cgroup parent.

Who uses this: the daemon at start (`serve`), the CLI (`doctor`), tools. Several daemons may
run on one host, each with its own data_dir; what they share is the cgroup hierarchy and
/run. Each daemon nests its sandboxes under one cgroup parent and sweeps leftovers at start,
so three rules keep daemons out of each other's way:

- The default parent is per install: `sandkasten-<id>`, the id random, made once and kept in
  `data_dir/install.json`. A data_dir that already held sandboxes before install ids existed
  keeps the old shared default `sandkasten`, so its live sandboxes are adopted, not lost.
- A running daemon holds a claim on its parent (an flock on `/run/sandkasten/cgroup-<parent>.lock`,
  released by the kernel when the daemon dies). A second daemon configured with the same parent
  refuses to start and names the first.
- The orphan sweep only considers sessions with traces in this data_dir
  (`Runtime.host_sessions`): a parent shared with a daemon that is down is still safe.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from sandkasten.errors import ConfigError, SandkastenError

RECORD = "install.json"
LEGACY_PARENT = "sandkasten"
CLAIMS_DIR = Path("/run/sandkasten")


@dataclass(frozen=True)
class Install:
    id: str
    cgroup_parent: str


def ensure(data_dir: Path) -> Install:
    """The install record of `data_dir`, made on first use (two processes racing agree on one:
    the record is linked into place, never overwritten)."""
    data_dir = Path(data_dir)
    path = data_dir / RECORD
    found = _read(path)
    if found is not None:
        return found
    ident = secrets.token_hex(6)
    sessions = data_dir / "sessions"
    legacy = sessions.is_dir() and any(sessions.iterdir())
    made = Install(id=ident, cgroup_parent=LEGACY_PARENT if legacy else f"sandkasten-{ident}")
    tmp = data_dir / f".{RECORD}.{ident}"
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(made.__dict__) + "\n")
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process made it first: theirs holds
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as e:
        raise SandkastenError(f"unable to write install record {path}: {e.strerror or e}") from None
    found = _read(path)
    if found is None:
        raise SandkastenError(f"unable to read install record {path}: not what this program wrote")
    return found


def _read(path: Path) -> Install | None:
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ConfigError(f"unable to read install record {path}: {e} (remove it only if no sandbox of "
                          f"this data_dir runs)") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("id"), str) or not isinstance(raw.get("cgroup_parent"), str):
        raise ConfigError(f"unable to read install record {path}: expected {{id, cgroup_parent}}")
    return Install(id=raw["id"], cgroup_parent=raw["cgroup_parent"])


def cgroup_parent(cfg) -> str:
    """The configured `cgroup_parent`, or this install's own."""
    return cfg.cgroup_parent or ensure(cfg.data_dir).cgroup_parent


class ParentClaim:
    """A running daemon's hold on its cgroup parent. The kernel drops it when the process
    dies, so a crashed daemon never blocks the next one."""

    def __init__(self, fd: int, path: Path):
        self.fd, self.path = fd, path

    @classmethod
    def take(cls, parent: str, data_dir: Path, claims_dir: Path = CLAIMS_DIR) -> ParentClaim:
        path = claims_dir / f"cgroup-{parent}.lock"
        try:
            claims_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            while True:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _holder(fd)
                    os.close(fd)
                    raise SandkastenError(
                        f"unable to start: cgroup parent {parent!r} is in use by another running daemon "
                        f"({holder}); give this daemon its own cgroup_parent, or leave cgroup_parent unset "
                        f"(the default is one parent per data_dir)", cgroup_parent=parent) from None
                try:  # a holder that released meanwhile may have unlinked this file: take the live one
                    if os.fstat(fd).st_ino == os.stat(path).st_ino:
                        break
                except FileNotFoundError:
                    pass
                os.close(fd)
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "data_dir": str(Path(data_dir).absolute())}).encode())
        except OSError as e:
            raise SandkastenError(f"unable to claim cgroup parent {parent!r} at {path}: {e.strerror or e}") from None
        return cls(fd, path)

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still holding it: a waiter re-checks the inode
        except OSError:
            pass
        os.close(self.fd)
        self.fd = -1


def _holder(fd: int) -> str:
    try:
        raw = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {raw['pid']}, data_dir {raw['data_dir']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"
