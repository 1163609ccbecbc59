"""The image store: one directory per image under `cfg.images_dir`.

    images_dir/NAME/rootfs/       the root filesystem, the overlay's lower dir (never written to)
    images_dir/NAME/image.json    name, created_at, size_bytes, source, has_bash, shell
    images_dir/.tmp-NAME-PID-XX/  an import or build in progress (never listed)

Who runs this: `imgbuilder` (as root) writes images; the runtime only reads them and calls
`ensure_valid` before it mounts an overlay. Writers fill a staging dir and rename it into
place, so a failed or killed import never leaves a half image under a valid name.

Paths inside an image are resolved *inside* its rootfs: an absolute symlink `/bin/sh ->
/bin/busybox` means `ROOTFS/bin/busybox`, never the host's `/bin/busybox`.
"""

from __future__ import annotations

import builtins
import ctypes
import dataclasses
import datetime as dt
import json
import os
import re
import shutil
import stat
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from sandkasten.errors import ImageInvalid, ImageNotFound, InvalidRequest, SandkastenError
from sandkasten.runtime.procfs import mounts_under, unescape

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
METADATA = "image.json"
ROOTFS = "rootfs"
STAGING_PREFIX = ".tmp-"
# Where the runtime mounts proc, a tmpfs /dev, a tmpfs /tmp and the workspace bind. Each must be
# a real directory or absent (the overlay creates it): a symlink here would make the mount land
# wherever the link points, resolved on the host.
MOUNT_POINTS = ("proc", "dev", "dev/pts", "tmp", "workspace", "sys")
_MAX_SYMLINK_HOPS = 40


@dataclass(frozen=True)
class ImageInfo:
    name: str
    created_at: str  # UTC, ISO 8601
    size_bytes: int
    source: str  # "tar:/path/to/file.tar", "build:base", "build:python"
    has_bash: bool
    shell: str  # "/bin/bash" or "/bin/sh"
    rootfs: Path

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["rootfs"] = str(self.rootfs)
        return d


def check_name(name: object) -> str:
    """Refuse names that could escape images_dir or clash with staging dirs."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidRequest(
            f"invalid image name {name!r}: use 1-64 of a-z 0-9 . _ - starting with a letter or digit",
            image=str(name))
    return name


class ImageStore:
    def __init__(self, images_dir: Path) -> None:
        self.images_dir = Path(images_dir)

    # ------------------------------------------------------------ reading

    def path(self, name: str) -> Path:
        """The rootfs of NAME (the overlay lower dir)."""
        check_name(name)
        rootfs = self.images_dir / name / ROOTFS
        if not rootfs.is_dir():
            available = (", ".join(self.names())
                         or "none; import one with `imgbuilder import` or `imgbuilder build base`")
            raise ImageNotFound(f"image {name!r} not found in {self.images_dir} (available: {available})",
                                image=name)
        return rootfs

    def exists(self, name: str) -> bool:
        check_name(name)
        return (self.images_dir / name / ROOTFS).is_dir()

    def names(self) -> list[str]:
        try:
            entries = sorted(os.listdir(self.images_dir))
        except FileNotFoundError:
            return []
        return [e for e in entries if NAME_RE.match(e) and (self.images_dir / e / ROOTFS).is_dir()]

    def get(self, name: str) -> ImageInfo:
        rootfs = self.path(name)
        try:
            meta = json.loads((rootfs.parent / METADATA).read_text())
            return ImageInfo(name=name, created_at=str(meta["created_at"]),
                             size_bytes=int(meta["size_bytes"]), source=str(meta["source"]),
                             has_bash=bool(meta["has_bash"]), shell=str(meta["shell"]), rootfs=rootfs)
        except (OSError, ValueError, KeyError, TypeError):
            # An image laid down by hand (cp -a of a rootfs) has no metadata: describe it live.
            return describe(name, rootfs, source="unknown")

    def list(self) -> list[ImageInfo]:
        return [self.get(n) for n in self.names()]

    # ------------------------------------------------------------ checking

    def validate(self, name: str) -> builtins.list[str]:   # `list` here is the method above
        """Problems that would stop a sandbox from starting on NAME; empty means usable."""
        rootfs = self.path(name)
        problems: list[str] = []
        sh = resolve_inside(rootfs, "/bin/sh")
        if sh is None:
            problems.append("/bin/sh is missing or a broken symlink")
        elif not sh.is_file():
            problems.append("/bin/sh is not a regular file")
        elif not os.stat(sh).st_mode & 0o111:
            problems.append("/bin/sh is not executable")
        else:
            interp = elf_interpreter(sh)
            if interp and resolve_inside(rootfs, interp) is None:
                problems.append(f"/bin/sh needs the dynamic loader {interp}, which is missing in the image")
        for mp in MOUNT_POINTS:
            p = rootfs / mp
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                continue  # the overlay's upper dir gets it when the runtime mkdirs it
            except NotADirectoryError:
                problems.append(f"/{mp} cannot be created: a parent is not a directory")
                continue
            if stat.S_ISLNK(st.st_mode):
                problems.append(f"/{mp} is a symlink (to {os.readlink(p)}); mount points must be directories")
            elif not stat.S_ISDIR(st.st_mode):
                problems.append(f"/{mp} is not a directory")
        return problems

    def ensure_valid(self, name: str) -> Path:
        """Called by the runtime before creating a sandbox: the rootfs, or ImageInvalid."""
        problems = self.validate(name)
        if problems:
            raise ImageInvalid(f"image {name!r} is not usable: {'; '.join(problems)}",
                               image=name, problems=problems)
        return self.images_dir / name / ROOTFS

    # ------------------------------------------------------------ writing (root only)

    @contextmanager
    def staging(self, name: str, source: str, replace: bool = False) -> Iterator[Path]:
        """Yield an empty rootfs dir to fill; on success publish it as NAME, on error remove it.

        `with store.staging("base", "build:base") as rootfs: ...fill rootfs...`
        """
        check_name(name)
        if self.exists(name) and not replace:
            raise InvalidRequest(f"image {name!r} already exists; delete it first or use --force", image=name)
        self.images_dir.mkdir(parents=True, exist_ok=True)
        sweep_stale_staging(self.images_dir)
        stage = self.images_dir / f"{STAGING_PREFIX}{name}-{os.getpid()}-{os.urandom(3).hex()}"
        stage.mkdir(mode=0o700)
        rootfs = stage / ROOTFS
        rootfs.mkdir(mode=0o755)
        try:
            yield rootfs
            info = describe(name, rootfs, source)
            (stage / METADATA).write_text(json.dumps(
                {k: v for k, v in info.to_json().items() if k != "rootfs"}, indent=2) + "\n")
            stage.chmod(0o755)
            self._publish(stage, name, replace)
        except BaseException:
            discard(stage)
            raise

    def _publish(self, stage: Path, name: str, replace: bool) -> None:
        target = self.images_dir / name
        if target.exists():
            if not replace:
                raise InvalidRequest(f"image {name!r} already exists; delete it first or use --force",
                                     image=name)
            self._refuse_if_mounted(name, "replace")
            old = self.images_dir / f"{STAGING_PREFIX}{name}-old-{os.getpid()}-{os.urandom(3).hex()}"
            os.rename(target, old)
            os.rename(stage, target)
            discard(old)
        else:
            os.rename(stage, target)

    def delete(self, name: str) -> None:
        self.path(name)  # ImageNotFound with the list of images
        self._refuse_if_mounted(name, "delete")
        discard(self.images_dir / name)

    def _refuse_if_mounted(self, name: str, verb: str) -> None:
        pids = overlay_users(self.images_dir / name / ROOTFS)
        if pids:
            raise InvalidRequest(
                f"unable to {verb} image {name!r}: in use as an overlay lower dir by running sandboxes "
                f"(pids {', '.join(map(str, pids[:10]))}); destroy their sessions first (`sandkasten ps --all` "
                "lists them, idle pool members too: drop the image from pool.images and restart the daemon)",
                image=name)


# ---------------------------------------------------------------- inspecting a rootfs

def describe(name: str, rootfs: Path, source: str) -> ImageInfo:
    bash = resolve_inside(rootfs, "/bin/bash")
    has_bash = bash is not None and bash.is_file()
    return ImageInfo(name=name, created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                     size_bytes=tree_size(rootfs), source=source, has_bash=has_bash,
                     shell="/bin/bash" if has_bash else "/bin/sh", rootfs=rootfs)


def tree_size(root: Path) -> int:
    """Apparent size of files and symlinks, each hardlinked inode counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for f in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            try:
                st = os.lstat(os.path.join(dirpath, f))
            except OSError:
                continue
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1:
                if key in seen:
                    continue
                seen.add(key)
            total += st.st_size
    return total


def resolve_inside(rootfs: Path, path: str) -> Path | None:
    """Follow PATH the way the sandbox would see it, with ROOTFS as `/`.

    Returns the host path of the final target, or None when it is missing or loops.
    `..` stops at the root, absolute link targets restart at the root: nothing resolves outside.
    """
    parts = [p for p in PurePosixPath(path).parts if p != "/"]
    resolved: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        host = rootfs.joinpath(*resolved, part)
        try:
            st = os.lstat(host)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            if hops > _MAX_SYMLINK_HOPS:
                return None
            target = os.readlink(host)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in PurePosixPath(target).parts if p != "/"] + parts
            continue
        if parts and not stat.S_ISDIR(st.st_mode):
            return None
        resolved.append(part)
    return rootfs.joinpath(*resolved)


def elf_interpreter(path: Path) -> str | None:
    """The PT_INTERP of a 64-bit little-endian ELF (None for static binaries and scripts)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
                return None
            phoff, = struct.unpack_from("<Q", head, 0x20)
            phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
            for i in range(phnum):
                f.seek(phoff + i * phentsize)
                ph = f.read(56)
                p_type, = struct.unpack_from("<I", ph, 0)
                if p_type == 3:  # PT_INTERP
                    offset, = struct.unpack_from("<Q", ph, 0x08)
                    size, = struct.unpack_from("<Q", ph, 0x20)
                    f.seek(offset)
                    return f.read(size).rstrip(b"\0").decode("utf-8", "replace")
    except (OSError, struct.error):
        return None
    return None


# ---------------------------------------------------------------- mounts and removal

def overlay_users(rootfs: Path) -> list[int]:
    """Pids (one per mount namespace) that see an overlay with ROOTFS as a lower dir.

    Sandboxes mount their overlay inside their own mount namespace, so every namespace is
    looked at. Detached (idmapped) lower layers do not show their path and are not found.
    """
    needle = os.path.realpath(rootfs)  # data_dir/images may be a symlink (tests share a cache)
    seen_ns: set[str] = set()
    pids: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ns = os.readlink(f"/proc/{entry}/ns/mnt")
            if ns in seen_ns:
                continue
            seen_ns.add(ns)
            with open(f"/proc/{entry}/mountinfo") as f:
                for line in f:
                    if " - overlay " in line and _lowerdirs_contain(line, needle):
                        pids.append(int(entry))
                        break
        except OSError:
            continue
    return pids


def _lowerdirs_contain(mountinfo_line: str, rootfs: str) -> bool:
    super_opts = mountinfo_line.rsplit(" ", 1)[-1].strip()
    for opt in super_opts.split(","):
        if opt.startswith("lowerdir="):
            dirs = opt[len("lowerdir="):].split(":")
            return any(os.path.realpath(unescape(d)) == rootfs for d in dirs)
    return False


def discard(path: Path) -> None:
    """Remove a staging or image dir. Unmounts first (debootstrap mounts /proc and /sys inside
    its target): rmtree must never walk into a live mount."""
    libc = ctypes.CDLL(None, use_errno=True)
    for mp in mounts_under(path):
        if libc.umount2(mp.encode(), 2) != 0:  # MNT_DETACH
            err = ctypes.get_errno()
            raise SandkastenError(f"unable to unmount {mp} before removing {path}: {os.strerror(err)}")
    if mounts_under(path):
        raise SandkastenError(f"unable to remove {path}: mounts remain below it")
    shutil.rmtree(path, ignore_errors=False, onexc=_rmtree_error(path))


def _rmtree_error(root: Path):
    def onexc(func, p, exc):
        if isinstance(exc, FileNotFoundError):
            return
        raise SandkastenError(f"unable to remove {p} (part of {root}): {exc}") from exc
    return onexc


def sweep_stale_staging(images_dir: Path) -> None:
    """Remove staging dirs left by imports that were killed (their pid is gone)."""
    for entry in os.listdir(images_dir):
        if not entry.startswith(STAGING_PREFIX):
            continue
        m = re.search(r"-(\d+)-[0-9a-f]{6}$", entry)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            try:
                discard(images_dir / entry)
            except SandkastenError:
                pass
