"""A sandbox's own disk: a sparse ext4 image, loop-mounted, that holds the overlay's upper and
work directories and the per-session workspace — everything a sandbox writes except /tmp and
/dev/shm (tmpfs, counted in its memory limit), exec logs (kept by the runner outside, see
`limits.log_retention_seconds`) and a persistent workspace (a directory of the host, shared
between sessions). So one sandbox fills its own disk (ENOSPC), never the host's.

How a disk is made cheaply (cold create is measured in milliseconds): `mkfs.ext4` runs once per
size, into a *template* under `<data_dir>/disk-templates/` (an empty filesystem, never mounted:
`prepare` refuses a template whose superblock says it ever was, and makes it again). Each sandbox
gets a copy of it — only the template's data extents (about 1.1 MB for 2 GiB) are copied, with
`copy_file_range`, the rest stays a hole — attached to a free loop device with the ioctl
LOOP_CONFIGURE (LOOP_SET_FD + LOOP_SET_STATUS64 where the kernel lacks it) and mounted with
mount(2). No program is forked per create (mkfs.ext4 once per size and data_dir). A copy is a
fresh empty filesystem, nothing of any other sandbox's data is in it; the copies share the
template's ext4 UUID and directory hash seed, which nothing here reads (the disk is mounted by
device, never by UUID; overlayfs identifies its lower layers, on the host's filesystem, not
this upper one).

The loop device is attached with LO_FLAGS_AUTOCLEAR: it detaches itself when its last user goes
— the mount, or, when the mount fails, the fd `prepare` holds until then. So nothing here ever
detaches a loop device by number (it could be somebody else's), and a daemon that dies between
the attach and the mount leaves none behind.

Who runs this: `Runtime.create`, in a daemon worker thread, as root, before the spawner is asked
for the sandbox (ioctls and mount(2): no fork in a threaded process). Teardown needs nothing of
its own: `Runtime.destroy` unmounts everything below the session directory, the loop device goes
with the mount (autoclear), the image with the dir.
Measured (2 GiB): the copy 0.4 ms, attach and mount about 1 ms; mkfs (once) about 20 ms.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import os
import secrets
import struct
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from sandkasten.errors import SandboxError
from sandkasten.runtime import syscalls

MB = 1024 * 1024
# no journal (a sandbox does not outlive a host crash), inode tables filled lazily (fast mkfs),
# no blocks reserved for root, one inode per 4 KiB (trees of small files, node_modules)
MKFS = ("mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-E", "lazy_itable_init=1,nodiscard", "-m", "0",
        "-i", "4096")
MOUNT_FLAGS = syscalls.MS_NODEV | syscalls.MS_NOSUID | syscalls.MS_NOATIME
NO_QUOTA = "defaults.disk_limit_mb: 0 runs sandboxes without a disk quota"

# <linux/loop.h>
LOOP_SET_FD, LOOP_CLR_FD, LOOP_SET_STATUS64, LOOP_CONFIGURE = 0x4C00, 0x4C01, 0x4C04, 0x4C0A
LOOP_CTL_GET_FREE = 0x4C82
LO_FLAGS_AUTOCLEAR = 4
LO_NAME_SIZE = 64
ATTACH_ATTEMPTS = 64   # a free device another process takes first answers EBUSY: ask for another


class _LoopInfo64(ctypes.Structure):
    _fields_ = [("lo_device", ctypes.c_uint64), ("lo_inode", ctypes.c_uint64), ("lo_rdevice", ctypes.c_uint64),
                ("lo_offset", ctypes.c_uint64), ("lo_sizelimit", ctypes.c_uint64), ("lo_number", ctypes.c_uint32),
                ("lo_encrypt_type", ctypes.c_uint32), ("lo_encrypt_key_size", ctypes.c_uint32),
                ("lo_flags", ctypes.c_uint32), ("lo_file_name", ctypes.c_char * LO_NAME_SIZE),
                ("lo_crypt_name", ctypes.c_char * LO_NAME_SIZE), ("lo_encrypt_key", ctypes.c_char * 32),
                ("lo_init", ctypes.c_uint64 * 2)]


class _LoopConfig(ctypes.Structure):
    _fields_ = [("fd", ctypes.c_uint32), ("block_size", ctypes.c_uint32), ("info", _LoopInfo64),
                ("reserved", ctypes.c_uint64 * 8)]


def prepare(image: Path, mount_point: Path, limit_mb: int, templates: Path) -> None:
    """`mount_point` as a directory where the sandbox's files go: an ext4 of `limit_mb` MiB
    backed by the sparse file `image` (a copy of the template for that size kept in the
    directory `templates`, made on first use), or, with limit_mb 0 (no quota), a plain directory."""
    mount_point.mkdir(mode=0o755)
    if limit_mb <= 0:
        return
    who = mount_point.parent.name
    template = _template(templates, limit_mb)
    try:
        template.copy_to(image)
    except OSError as e:
        raise SandboxError(f"unable to make the disk of {who} ({limit_mb} MiB): copying the template "
                           f"failed: {e.strerror or e}") from None
    loop_fd, device = _attach(image, who)
    try:
        syscalls.mount(device, str(mount_point), "ext4", MOUNT_FLAGS)
    except OSError as e:
        raise SandboxError(f"unable to mount the disk of {who} ({device}): {e.strerror or e} "
                           f"({NO_QUOTA})") from None
    finally:
        os.close(loop_fd)   # the mount holds the device now; without one, autoclear detaches it


# ---------------------------------------------------------------------------------- templates
@dataclass(frozen=True)
class Template:
    path: Path
    size: int
    extents: tuple[tuple[int, int], ...]   # (offset, length) of its data; the rest is holes
    key: tuple[int, int, int]              # (inode, size, mtime_ns) when the extents were read

    def copy_to(self, image: Path) -> None:
        """A new sparse file `image` with the template's contents (never an existing file)."""
        src = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            st = os.fstat(src)
            if (st.st_ino, st.st_size, st.st_mtime_ns) != self.key:
                raise OSError(errno.ESTALE, f"the template {self.path} changed since it was checked")
            dst = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(dst, self.size)
                for offset, length in self.extents:
                    done = 0
                    while done < length:
                        n = os.copy_file_range(src, dst, length - done, offset + done, offset + done)
                        if n <= 0:
                            raise OSError(errno.EIO, f"short copy of {self.path} at {offset + done}")
                        done += n
            finally:
                os.close(dst)
        finally:
            os.close(src)


_templates: dict[Path, Template] = {}
_templates_lock = threading.Lock()


def template_name(limit_mb: int) -> str:
    """One template per size and mkfs options (a change of options makes a new one)."""
    digest = hashlib.sha256("\0".join(MKFS).encode()).hexdigest()[:12]
    return f"ext4-{limit_mb}M-{digest}.img"


def _template(directory: Path, limit_mb: int) -> Template:
    path = directory / template_name(limit_mb)
    with _templates_lock:   # creates run in several worker threads: one mkfs per size
        known = _templates.get(path)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            st = None
        if known is not None and st is not None and (st.st_ino, st.st_size, st.st_mtime_ns) == known.key:
            return known
        found = _load(path, limit_mb) if st is not None else None
        if found is None:
            _make(path, limit_mb)
            found = _load(path, limit_mb)
            if found is None:
                raise SandboxError(f"unable to make the disk template {path}: mkfs.ext4 made no usable filesystem")
        _templates[path] = found
        return found


def _make(path: Path, limit_mb: int) -> None:
    """mkfs.ext4 into a temporary file, renamed over `path` (a reader sees none or a whole one)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, limit_mb * MB)
        finally:
            os.close(fd)
        _run([*MKFS, str(tmp)], f"make the disk template for {limit_mb} MiB")
        os.chmod(tmp, 0o400)
        os.rename(tmp, path)
    except OSError as e:
        raise SandboxError(f"unable to make the disk template {path}: {e.strerror or e}") from None
    finally:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass


def _load(path: Path, limit_mb: int) -> Template | None:
    """The template at `path` with its data extents, or None when it is not one to copy: the
    wrong size, not ext4, or mounted at some time (its superblock counts mounts)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if st.st_size != limit_mb * MB or not fresh_ext4(os.pread(fd, 1024, 1024)):
            return None
        extents = []
        offset = 0
        while offset < st.st_size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:   # only holes after offset
                    break
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            extents.append((start, end - start))
            offset = end
        return Template(path, st.st_size, tuple(extents), (st.st_ino, st.st_size, st.st_mtime_ns))
    except OSError:
        return None
    finally:
        os.close(fd)


def fresh_ext4(superblock: bytes) -> bool:
    """Whether this ext4 superblock belongs to a filesystem that was never mounted (no mount
    count, no mount or write time)."""
    if len(superblock) < 0x40:
        return False
    mtime, _wtime, mnt_count, _max, magic = struct.unpack_from("<IIHhH", superblock, 0x2C)
    return magic == 0xEF53 and mnt_count == 0 and mtime == 0


# ---------------------------------------------------------------------------------- loop device
def _attach(image: Path, who: str) -> tuple[int, str]:
    """A free loop device backed by `image`, set to clear itself when its last user goes; its
    open fd (the caller closes it) and its path."""
    try:
        backing = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise SandboxError(f"unable to attach the disk of {who}: {e.strerror or e}") from None
    try:
        ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        os.close(backing)
        raise SandboxError(f"unable to attach the disk of {who}: /dev/loop-control: {e.strerror or e} "
                           f"(the loop module; {NO_QUOTA})") from None
    try:
        for _ in range(ATTACH_ATTEMPTS):
            number = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
            device = f"/dev/loop{number}"
            try:
                loop_fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.ENXIO, errno.ENODEV):   # removed meanwhile
                    continue
                raise
            try:
                _configure(loop_fd, backing, image)
            except OSError as e:
                os.close(loop_fd)
                if e.errno == errno.EBUSY:   # taken meanwhile by somebody else
                    continue
                raise
            return loop_fd, device
        raise OSError(errno.EBUSY, f"every free loop device was taken first, {ATTACH_ATTEMPTS} times")
    except OSError as e:
        raise SandboxError(f"unable to attach the disk of {who} to a loop device: {e.strerror or e} "
                           f"({NO_QUOTA})") from None
    finally:
        os.close(ctl)
        os.close(backing)   # the loop device keeps its own reference


def _configure(loop_fd: int, backing: int, image: Path) -> None:
    config = _LoopConfig()
    config.fd = backing
    config.info.lo_flags = LO_FLAGS_AUTOCLEAR
    config.info.lo_file_name = os.fsencode(image)[-(LO_NAME_SIZE - 1):]
    try:
        fcntl.ioctl(loop_fd, LOOP_CONFIGURE, config)
        return
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTTY):   # kernels before 5.8 lack LOOP_CONFIGURE
            raise
    fcntl.ioctl(loop_fd, LOOP_SET_FD, backing)
    try:
        fcntl.ioctl(loop_fd, LOOP_SET_STATUS64, config.info)
    except OSError:
        fcntl.ioctl(loop_fd, LOOP_CLR_FD, 0)   # attached by us a moment ago
        raise


def _run(args: list[str], what: str) -> None:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise SandboxError(f"unable to {what}: {args[0]} is not installed (tools/debian-deps installs it; "
                           f"{NO_QUOTA})") from None
    except subprocess.TimeoutExpired:
        raise SandboxError(f"unable to {what}: {args[0]} timed out") from None
    if done.returncode != 0:
        raise SandboxError(f"unable to {what}: {(done.stderr or done.stdout).strip() or done.returncode} "
                           f"({NO_QUOTA})")
