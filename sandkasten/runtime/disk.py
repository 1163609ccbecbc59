"""A sandbox's own disk: a sparse ext4 image, loop-mounted, that holds the overlay's upper and
work directories and the per-session workspace — everything a sandbox writes except /tmp and
/dev/shm (tmpfs, counted in its memory limit), exec logs (kept by the runner outside, see
`limits.log_retention_seconds`) and a persistent workspace (a directory of the host, shared
between sessions). So one sandbox fills its own disk (ENOSPC), never the host's.

Who runs this: `Runtime.create`, in a daemon worker thread, as root, before the spawner is asked
for the sandbox (mkfs.ext4 and mount(8) are separate programs: nothing forks in the daemon
itself). Teardown needs nothing of its own: `Runtime.destroy` unmounts everything below the
session directory, the loop device goes with the mount (autoclear), the image with the dir.
Measured: mkfs of a 1 GiB sparse image plus the mount take about 20 ms.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from sandkasten.errors import SandboxError

MB = 1024 * 1024
# no journal (a sandbox does not outlive a host crash), inode tables filled lazily (fast mkfs),
# no blocks reserved for root, one inode per 4 KiB (trees of small files, node_modules)
MKFS = ("mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-E", "lazy_itable_init=1,nodiscard", "-m", "0",
        "-i", "4096")
MOUNT_OPTIONS = "loop,nodev,nosuid,noatime"


def prepare(image: Path, mount_point: Path, limit_mb: int) -> None:
    """`mount_point` as a directory where the sandbox's files go: an ext4 of `limit_mb` MiB
    backed by the sparse file `image`, or, with limit_mb 0 (no quota), a plain directory."""
    mount_point.mkdir(mode=0o755)
    if limit_mb <= 0:
        return
    fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, limit_mb * MB)
    finally:
        os.close(fd)
    _run([*MKFS, str(image)], f"make the disk of {mount_point.parent.name} ({limit_mb} MiB)")
    _run(["mount", "-o", MOUNT_OPTIONS, str(image), str(mount_point)],
         f"mount the disk of {mount_point.parent.name}")


def _run(args: list[str], what: str) -> None:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise SandboxError(f"unable to {what}: {args[0]} is not installed (tools/debian-deps installs it; "
                           f"defaults.disk_limit_mb: 0 runs sandboxes without a disk quota)") from None
    except subprocess.TimeoutExpired:
        raise SandboxError(f"unable to {what}: {args[0]} timed out") from None
    if done.returncode != 0:
        raise SandboxError(f"unable to {what}: {(done.stderr or done.stdout).strip() or done.returncode} "
                           f"(defaults.disk_limit_mb: 0 runs sandboxes without a disk quota)")
