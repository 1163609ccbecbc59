"""Removing a persistent workspace's directory `workspaces/<id>` (the executor's, once the
journal says the workspace is deleted)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from sandkasten.errors import SandboxError
from sandkasten.runtime.procfs import mounts_under


def remove_dir(base: Path, wid: str) -> None:
    """rm -r workspaces/<wid>: only a real directory right below `base`, nothing mounted in it
    (shutil.rmtree works by descriptors on Linux, so a symlink inside is removed, not followed)."""
    path = base / wid
    if not os.path.lexists(path):
        return
    if os.path.islink(path) or not os.path.isdir(path) or os.path.realpath(path) != os.path.join(
            os.path.realpath(base), wid):
        raise SandboxError(f"unable to remove workspace {wid}: {path} is not a directory inside {base}")
    if mounts_under(path):
        raise SandboxError(f"unable to remove workspace {wid}: something is still mounted below it")
    try:
        shutil.rmtree(path)
    except OSError as e:
        raise SandboxError(f"unable to remove workspace {wid}: {e.strerror} ({e.filename})") from None
