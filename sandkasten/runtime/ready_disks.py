"""Disks made ahead: a sandbox's own disk (runtime.disk) copied, attached and mounted between
creates, so a create only moves one into place.

Why: attaching a loop device and mounting ext4 on it cost 5-10 ms of kernel time (the queue
freeze of LOOP_CONFIGURE, the mount's reads through the loop device), as much as the rest of a
create. So after a create that wanted a disk is over (not during it: the two would compete for
the CPU and the kernel's locks), a thread of this process makes disks of that size until KEEP
are ready, each an image `<n>.img` in `<data_dir>/ready-disks/<pid>-<start time>/` mounted on
`mnt/<n>/` there (`mnt` a private bind mount of itself, so the mounts below it can be moved). A
create of that size takes one: the image is renamed into the session dir (the loop device
follows its file) and the mount moved (MS_MOVE, 0.1 ms) onto the session's disk directory. Any other size, or none
ready, takes the ordinary path (`disk.prepare`). A ready disk is as fresh as one made at the
create: a copy of the never-mounted template, mounted, nothing written to it by anybody.

Cleanup: `close` (the daemon stops) unmounts and removes every ready disk; their loop devices
detach themselves (autoclear). After a crash, `sweep` (the next daemon's `Runtime.warm`) does
the same for every owner directory whose process is gone — never another live process's.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sandkasten.errors import SandboxError
from sandkasten.runtime import disk, syscalls
from sandkasten.runtime.procfs import mounts_under, proc_start_time

KEEP = 2
RETRY_S = 5.0   # after a failed make (the next create reports the cause itself)
# a make competes for the CPU and the kernel's locks with the create it would be made for, and
# with that sandbox's first command: none starts while a create runs, nor this soon after one
QUIET_S = 0.01


class ReadyDisks:
    def __init__(self, directory: Path, templates: Path) -> None:
        self.base, self.templates = directory, templates
        me = os.getpid()
        self.dir = directory / f"{me}-{proc_start_time(me)}"
        self.ready: list[tuple[int, Path]] = []   # (size in MiB, mount point; its image is <mount point>.img)
        self.want = 0        # the size to keep ready: the last create's
        self.taken = 0       # creates served by a ready disk
        self.closed = False
        self._creating = 0   # creates running (see `creating`)
        self._settled_at = 0.0
        self._made = 0
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None

    def take(self, limit_mb: int, image: Path, mount_point: Path) -> bool:
        """Put a ready disk of `limit_mb` MiB at `mount_point` (made here) with its image at
        `image`; False when none is ready (nothing was done). Asks for more either way, to be
        made after the caller's create is over (see `creating`)."""
        with self._lock:
            if self.closed:
                return False
            self.want = limit_mb
            found = next((d for d in self.ready if d[0] == limit_mb), None)
            if found is not None:
                self.ready.remove(found)
            if self._thread is None:
                self._thread = threading.Thread(target=self._fill, name="ready-disks", daemon=True)
                self._thread.start()
            self._wake.notify()
        if found is None:
            return False
        ready = found[1]
        try:   # the image first: it stays on the host's filesystem, the mount's move cannot fail on it
            os.rename(_image_of(ready), image)
        except OSError:
            _discard(ready)
            return False
        mount_point.mkdir(mode=0o755)
        try:   # (keeps nodev,nosuid,noatime; an unmount here would wait for an RCU grace period)
            syscalls.mount(str(ready), str(mount_point), None, syscalls.MS_MOVE)
        except OSError:
            mount_point.rmdir()
            image.unlink()
            _discard(ready)
            return False
        ready.rmdir()
        self.taken += 1
        return True

    @contextmanager
    def creating(self) -> Iterator[None]:
        """Around a create that may `take`: no disk is made while one runs, nor QUIET_S after."""
        with self._lock:
            self._creating += 1
        try:
            yield
        finally:
            with self._lock:
                self._creating -= 1
                self._settled_at = time.monotonic()
                self._wake.notify()

    def close(self) -> None:
        """Stop making disks; unmount and remove the ready ones (their loop devices detach)."""
        with self._lock:
            self.closed = True
            self._wake.notify()
            thread = self._thread
        if thread is not None:
            thread.join()
        with self._lock:
            ready, self.ready = self.ready, []
        for _, mnt in ready:
            _discard(mnt)
        _remove_owner_dir(self.dir)

    def sweep(self) -> list[str]:
        """Remove the ready disks of owners (daemons) that are gone; their names."""
        swept: list[str] = []
        try:
            owners = list(os.scandir(self.base))
        except OSError:
            return swept
        for entry in owners:
            pid, _, st = entry.name.partition("-")
            if not (pid.isdigit() and st.isdigit()) or Path(entry.path) == self.dir:
                continue
            if proc_start_time(int(pid)) == int(st):
                continue   # a live daemon's
            _remove_owner_dir(Path(entry.path))
            swept.append(entry.name)
        return swept

    # ------------------------------------------------------------------ the filling thread
    def _fill(self) -> None:
        while True:
            with self._lock:
                while not self.closed and sum(1 for d in self.ready if d[0] == self.want) >= KEEP:
                    self._wake.wait()
                while not self.closed and (self._creating or time.monotonic() < self._settled_at + QUIET_S):
                    self._wake.wait(None if self._creating else self._settled_at + QUIET_S - time.monotonic())
                if self.closed:
                    return
                size = self.want
                stale = [d for d in self.ready if d[0] != size]
                self.ready = [d for d in self.ready if d[0] == size]
            try:
                for _, mnt in stale:
                    _discard(mnt)
                mnt = self._make(size)
            except Exception:  # noqa: BLE001 - the next create makes its disk itself and says why
                with self._lock:
                    if not self.closed:
                        self._wake.wait(RETRY_S)
                continue
            with self._lock:
                if not self.closed:
                    self.ready.append((size, mnt))
                    continue
            _discard(mnt)
            return

    def _make(self, size: int) -> Path:
        mounts = self.dir / "mnt"
        if not self._made:   # a mount of its own, private: mounts below it can be moved (MS_MOVE
            # refuses a mount whose parent propagates, as / does on most hosts)
            mounts.mkdir(mode=0o700, parents=True, exist_ok=True)
            if str(mounts) not in mounts_under(mounts):
                syscalls.mount(str(mounts), str(mounts), None, syscalls.MS_BIND)
            syscalls.mount(None, str(mounts), None, syscalls.MS_PRIVATE)
        self._made += 1
        mnt = mounts / str(self._made)
        try:
            disk.prepare(_image_of(mnt), mnt, size, self.templates)
        except BaseException:
            _discard(mnt)
            raise
        return mnt


def _image_of(mnt: Path) -> Path:
    """A ready disk's image: next to the private mount its mount point is in (an image below
    that mount could not be renamed into a session dir: another mount)."""
    return mnt.parent.parent / f"{mnt.name}.img"


def _discard(mnt: Path) -> None:
    """Unmount a ready disk and remove its mount point and image."""
    if os.path.ismount(mnt):   # (an ext4 of its own: another st_dev)
        syscalls.umount(str(mnt), syscalls.MNT_DETACH)
    try:
        _image_of(mnt).unlink()
    except FileNotFoundError:
        pass
    try:
        mnt.rmdir()
    except FileNotFoundError:
        pass


def _remove_owner_dir(owner: Path) -> None:
    for mnt in mounts_under(owner):
        syscalls.umount(mnt, syscalls.MNT_DETACH)
    if mounts_under(owner):
        raise SandboxError(f"unable to remove the ready disks in {owner}: something is still mounted there")
    shutil.rmtree(owner, ignore_errors=True)
