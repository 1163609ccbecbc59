"""Import a root filesystem from a tar archive (plain, gzip, bzip2 or xz; e.g. `docker export`),
or an image archive (`docker save`, an OCI layout directory or tar: see `layers`), whose layers
are applied in order with their whiteouts.

Who runs this: `imgbuilder import`, as root, on archives of unknown origin. Every member is
created by hand through directory file descriptors opened with O_NOFOLLOW, never with
`tarfile.extractall`, so that:

- `..` components are refused and absolute names are taken relative to the root;
- a member whose path passes through a symlink (one written earlier in the same archive) is
  refused: `etc -> /etc` followed by `etc/passwd` would otherwise write to the host;
- hardlinks must name a member already inside the root, reached without symlinks;
- an existing symlink at a member's own name is replaced, never written through;
- symlink *targets* are kept as they are (absolute ones resolve inside the sandbox);
- uid/gid are kept numerically, modes are kept with setuid/setgid/sticky bits (chmod after
  chown, because chown clears setuid); device nodes are skipped (the runtime bind-mounts
  the few /dev nodes a sandbox gets).

A refused member raises ImageInvalid naming it; the store's staging dir is then removed.
"""

from __future__ import annotations

import bz2
import errno
import gzip
import lzma
import os
import re
import shutil
import stat
import sys
import tarfile
import time
import zlib
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

from sandkasten.errors import ImageInvalid, InvalidRequest, SandkastenError
from sandkasten.images import layers as layers_mod
from sandkasten.images.store import ImageInfo, ImageStore, check_name

Progress = Callable[[str], None]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_LAYER_DIR = re.compile(r"^[0-9a-f]{64}(\.json)?$")  # docker save before 25: <id>/layer.tar, <config>.json
WHITEOUT, OPAQUE = ".wh.", ".wh..wh..opq"
_PROGRESS_EVERY_S = 2.0


def import_tar(store: ImageStore, name: str, tar_path: str | os.PathLike,
               progress: Progress | None = None, replace: bool = False) -> ImageInfo:
    """Extract TAR_PATH (or "-" for stdin) into a new image NAME and return its info."""
    check_name(name)
    if str(tar_path) == "-":
        source, fileobj = "tar:-", sys.stdin.buffer
    else:
        path = Path(tar_path).absolute()
        if path.is_dir() and not layers_mod.is_layout_dir(path):
            raise InvalidRequest(f"unable to import image {name!r} from {path}: it is a directory, neither a tar "
                                 "archive nor an OCI image layout (no oci-layout file)", image=name)
        if not path.exists():  # a pipe (`--tar <(docker export c)`) is fine: it is read once, in order
            raise InvalidRequest(f"unable to import image {name!r} from {path}: no such file", image=name)
        if path.is_dir() or (path.is_file() and _image_archive_first(path)):
            return _import_layers(store, name, path, progress, replace)
        source, fileobj = f"tar:{path}", None
    where = f"unable to import image {name!r} from {'stdin' if fileobj is not None else path}"
    with (open(path, "rb") if fileobj is None else nullcontext(fileobj)) as raw, \
            store.staging(name, source, replace=replace) as rootfs:
        try:
            with _decompressed(raw) as data:
                counted = _Counted(data)
                # typeshed asks every mode's methods (write, seek, tell); stream mode "r|" only reads
                with tarfile.open(fileobj=counted, mode="r|") as tf:  # type: ignore[call-overload]
                    _Extractor(rootfs, name, progress).run(tf)
                    end = tf.offset
                counted.drain()  # to the end: a compressed stream checks its own end marker
        except tarfile.TarError as e:
            raise ImageInvalid(f"{where}: not a readable tar archive ({e})", image=name) from None
        except (EOFError, zlib.error, lzma.LZMAError, OSError) as e:
            # OSError: gzip.BadGzipFile, bz2's "Invalid data stream" (the extractor turns its own
            # write errors into SandkastenError, and the file was opened above)
            raise ImageInvalid(f"{where}: archive is truncated or corrupt ({e})", image=name) from None
        if counted.count - end < tarfile.BLOCKSIZE:
            # tarfile ends quietly at a missing or partial header; a whole archive ends with zero blocks
            raise ImageInvalid(f"{where}: archive is truncated (it ends inside or right after member data, "
                               "without the end-of-archive blocks)", image=name)
        if any((rootfs / n).is_file() for n in (layers_mod.MANIFEST, layers_mod.OCI_LAYOUT)) \
                and not (rootfs / "bin").exists():
            raise ImageInvalid(f"{where}: it is an image archive (docker save or an OCI layout), not a root "
                               f"filesystem; pass it as a file (--tar FILE), which imports its layers", image=name)
    return store.get(name)


def _image_archive_first(path: Path) -> bool:
    """Whether the archive's first member is one of an image archive's (docker save puts a
    layer directory `<64 hex>/` or `blobs/` first; a rootfs tar starts with its own dirs)."""
    try:
        with tarfile.open(path, "r|*") as tf:
            first = next(iter(tf), None)
    except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError):
        return False  # the streaming import says what is wrong with it
    if first is None:
        return False
    name = "/".join(p for p in first.name.split("/") if p not in ("", "."))
    top = name.split("/")[0]
    return (top in ("blobs", layers_mod.MANIFEST, layers_mod.OCI_LAYOUT, layers_mod.OCI_INDEX, "repositories")
            or bool(_LAYER_DIR.match(top)))


def _import_layers(store: ImageStore, name: str, path: Path, progress: Progress | None, replace: bool) -> ImageInfo:
    """An image archive: each layer extracted in order into one rootfs, whiteouts applied."""
    where = f"unable to import image {name!r} from {path}"
    with layers_mod.opened(path) as blobs:
        if blobs is None:
            raise ImageInvalid(f"{where}: it looks like an image archive but has no manifest.json or "
                               f"oci-layout", image=name)
        found = layers_mod.layers(blobs)
        with store.staging(name, f"image-archive:{path}", replace=replace) as rootfs:
            for number, layer in enumerate(found, 1):
                if progress:
                    progress(f"layer {number}/{len(found)}: {layer.name}")
                try:
                    with blobs.open(layer.name) as raw:
                        if raw.peek(4)[:4] == b"\x28\xb5\x2f\xfd":
                            raise ImageInvalid(f"{where}: layer {layer.name} is zstd-compressed, which is not "
                                               f"supported (save it with gzip or uncompressed layers)", image=name)
                        with _decompressed(raw) as data, tarfile.open(fileobj=data, mode="r|") as tf:
                            _Extractor(rootfs, name, progress, layered=True).run(tf)
                except tarfile.TarError as e:
                    raise ImageInvalid(f"{where}: layer {layer.name} is not a readable tar ({e})", image=name) from None
                except (EOFError, zlib.error, lzma.LZMAError) as e:
                    raise ImageInvalid(f"{where}: layer {layer.name} is truncated or corrupt ({e})",
                                       image=name) from None
    return store.get(name)


class _Counted:
    """A read-only stream that counts what was read (tarfile's stream mode reads it in order)."""

    def __init__(self, f) -> None:
        self.f = f
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.count += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def _decompressed(raw):
    """RAW, decompressed by its magic bytes (gzip, bzip2, xz, lzma) or as it is. The stdlib
    decompressors raise EOFError on a stream cut short; tarfile's own "r|*" decompression
    stops silently at the cut if it falls between members."""
    head = raw.peek(6)[:6] if hasattr(raw, "peek") else b""
    if head.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if head.startswith(b"BZh"):
        return bz2.BZ2File(raw, "rb")
    if head.startswith((b"\xfd7zXZ\x00", b"\x5d\x00\x00")):
        return lzma.LZMAFile(raw, "rb")
    return nullcontext(raw)


class _Extractor:
    """Creates one member at a time below ROOTFS; directory metadata is applied at the end
    (a 0555 dir must still take its children, and adding children changes its mtime)."""

    def __init__(self, rootfs: Path, image: str, progress: Progress | None, layered: bool = False) -> None:
        self.rootfs = rootfs
        self.image = image
        self.progress = progress
        self.layered = layered               # a layer of an image archive: whiteouts, replacements
        self.made: set[tuple[str, ...]] = set()  # what this layer created (an opaque dir keeps it)
        self.dirs: dict[tuple[str, ...], tarfile.TarInfo] = {}
        self.count = 0
        self.bytes = 0
        self.skipped: dict[str, int] = {}
        self.last_report = time.monotonic()

    def run(self, tf: tarfile.TarFile) -> None:
        self.root_fd = os.open(self.rootfs, _DIR_FLAGS)
        try:
            for member in tf:
                try:
                    self.extract(tf, member)
                except OSError as e:  # disk full, an uid the filesystem refuses, ...
                    raise SandkastenError(f"unable to import image {self.image!r}: member {member.name!r}: "
                                          f"{e.strerror or e}", image=self.image, member=member.name) from None
                self.count += 1
                self.report()
            self.finish_dirs()
        finally:
            os.close(self.root_fd)
        if self.progress:
            skipped = "".join(f", skipped {n} {kind}" for kind, n in sorted(self.skipped.items()))
            self.progress(f"extracted {self.count} entries ({self.bytes / 1e6:.1f} MB){skipped}")

    def report(self) -> None:
        now = time.monotonic()
        if self.progress and now - self.last_report >= _PROGRESS_EVERY_S:
            self.last_report = now
            self.progress(f"extracting: {self.count} entries, {self.bytes / 1e6:.1f} MB")

    def refuse(self, member: tarfile.TarInfo, why: str) -> ImageInvalid:
        return ImageInvalid(f"unable to import image {self.image!r}: refused member {member.name!r}: {why}",
                            image=self.image, member=member.name)

    # ------------------------------------------------------------ one member

    def extract(self, tf: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        parts = self.split(m, m.name, "its name")
        if m.ischr() or m.isblk():
            self.skipped["device nodes"] = self.skipped.get("device nodes", 0) + 1
            return
        if not (m.isdir() or m.isreg() or m.issym() or m.islnk() or m.isfifo()):
            self.skipped["unknown entries"] = self.skipped.get("unknown entries", 0) + 1
            return
        if not parts:  # "./": the root itself stays root-owned 0755 whatever the archive says
            if m.isdir():
                return
            raise self.refuse(m, "replaces the root directory with a non-directory")
        parent = self.open_dir(m, parts[:-1], create=True)
        leaf = parts[-1]
        try:
            if self.layered and leaf.startswith(WHITEOUT):
                self.whiteout(m, parts, parent)
                return
            self.made.add(tuple(parts))
            existing = _lstat(leaf, parent)
            if m.isdir():
                if existing is not None and not stat.S_ISDIR(existing.st_mode):
                    os.unlink(leaf, dir_fd=parent)
                    existing = None
                if existing is None:
                    os.mkdir(leaf, 0o700, dir_fd=parent)
                self.dirs[tuple(parts)] = m
                return
            if existing is not None:
                if stat.S_ISDIR(existing.st_mode):
                    if not self.layered:
                        raise self.refuse(m, "would replace a directory with a non-directory")
                    shutil.rmtree(leaf, dir_fd=parent)  # a layer replaces what the ones below had
                else:
                    os.unlink(leaf, dir_fd=parent)
            if m.isreg():
                self.write_file(tf, m, leaf, parent)
            elif m.issym():
                os.symlink(m.linkname, leaf, dir_fd=parent)
                os.chown(leaf, m.uid, m.gid, dir_fd=parent, follow_symlinks=False)
                os.utime(leaf, (m.mtime, m.mtime), dir_fd=parent, follow_symlinks=False)
            elif m.islnk():
                self.link(m, leaf, parent)
            elif m.isfifo():
                os.mkfifo(leaf, 0o600, dir_fd=parent)
                os.chown(leaf, m.uid, m.gid, dir_fd=parent, follow_symlinks=False)
                os.chmod(leaf, m.mode & 0o7777, dir_fd=parent)
                os.utime(leaf, (m.mtime, m.mtime), dir_fd=parent, follow_symlinks=False)
        finally:
            os.close(parent)

    def whiteout(self, m: tarfile.TarInfo, parts: list[str], parent: int) -> None:
        """`.wh.NAME`: NAME from the layers below is gone; `.wh..wh..opq`: this directory keeps
        only what this layer put in it. Removal goes by descriptors, never through a symlink."""
        leaf = parts[-1]
        if leaf == OPAQUE:
            here = tuple(parts[:-1])
            for child in os.listdir(parent):
                if (*here, child) not in self.made:
                    _remove(child, parent)
            return
        gone = leaf[len(WHITEOUT):]
        if not gone or gone in (".", ".."):
            raise self.refuse(m, "a whiteout without a name")
        _remove(gone, parent)

    def write_file(self, tf: tarfile.TarFile, m: tarfile.TarInfo, leaf: str, parent: int) -> None:
        fd = os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=parent)
        with os.fdopen(fd, "wb") as out:
            src = tf.extractfile(m)
            if src is not None:
                shutil.copyfileobj(src, out, 1 << 20)
            out.flush()
            os.fchown(fd, m.uid, m.gid)
            os.fchmod(fd, m.mode & 0o7777)  # after chown: chown clears setuid/setgid
            os.utime(fd, (m.mtime, m.mtime))
        self.bytes += m.size

    def link(self, m: tarfile.TarInfo, leaf: str, parent: int) -> None:
        target = self.split(m, m.linkname, "its hardlink target")
        if not target:
            raise self.refuse(m, "hardlink to the root directory")
        try:
            tdir = self.open_dir(m, target[:-1], create=False)
        except FileNotFoundError:
            raise self.refuse(m, f"hardlink target {m.linkname!r} does not exist in the archive") from None
        try:
            st = _lstat(target[-1], tdir)
            if st is None:
                raise self.refuse(m, f"hardlink target {m.linkname!r} does not exist in the archive")
            if stat.S_ISDIR(st.st_mode):
                raise self.refuse(m, f"hardlink target {m.linkname!r} is a directory")
            # follow_symlinks=False: a link to a symlink links the symlink itself.
            os.link(target[-1], leaf, src_dir_fd=tdir, dst_dir_fd=parent, follow_symlinks=False)
        finally:
            os.close(tdir)

    # ------------------------------------------------------------ paths

    def split(self, m: tarfile.TarInfo, name: str, what: str) -> list[str]:
        """Member name -> path components below the root; leading `/` and `.` dropped."""
        if "\0" in name:
            raise self.refuse(m, f"{what} contains a NUL byte")
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise self.refuse(m, f"{what} {name!r} contains '..' and could escape the root")
        return parts

    def open_dir(self, m: tarfile.TarInfo, parts: list[str], create: bool) -> int:
        """An fd for ROOT/parts, each step a real directory (O_NOFOLLOW): never a symlink."""
        fd = os.dup(self.root_fd)
        try:
            for i, part in enumerate(parts):
                try:
                    nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(part, 0o755, dir_fd=fd)
                    nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as e:
                    if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    where = "/".join(parts[:i + 1])
                    st = _lstat(part, fd)
                    if st is not None and stat.S_ISLNK(st.st_mode):
                        raise self.refuse(m, f"passes through the symlink {where!r} "
                                             f"(-> {os.readlink(part, dir_fd=fd)!r})") from None
                    raise self.refuse(m, f"passes through {where!r}, which is not a directory") from None
                os.close(fd)
                fd = nxt
            return fd
        except BaseException:
            os.close(fd)
            raise

    def finish_dirs(self) -> None:
        for parts, m in sorted(self.dirs.items(), key=lambda kv: len(kv[0]), reverse=True):
            try:
                fd = self.open_dir(m, list(parts), create=False)
            except (FileNotFoundError, ImageInvalid):
                continue  # replaced by a later member
            try:
                os.fchown(fd, m.uid, m.gid)
                os.fchmod(fd, m.mode & 0o7777)
                os.utime(fd, (m.mtime, m.mtime))
            finally:
                os.close(fd)


def _remove(name: str, dir_fd: int) -> None:
    st = _lstat(name, dir_fd)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)


def _lstat(name: str, dir_fd: int) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
