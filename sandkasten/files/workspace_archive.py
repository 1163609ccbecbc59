"""A workspace as a tar stream and back, on the host, confined exactly like `workspace_fs`.

The daemon runs this as root in a worker thread for `GET/POST /v1/sessions/{id}/fs/archive`
(the Agents SDK provider's persist/hydrate). The sandbox user owns the tree being packed and
the API client owns the tar being unpacked, so neither is trusted:

- pack: a depth-first walk (`beneath.walk_tree`) that opens every entry by its single name with
  O_NOFOLLOW and every file by a lookup beneath the root that refuses any symlink on the way.
  A symlink goes into the tar as a symlink (its target is text, never followed), a second name
  of an inode already packed as a hard link; fifos, sockets and device nodes are skipped.
  Member names are relative to /workspace (`src/app.py`), as the SDK's portable tars are.
- unpack: refuses absolute names, `..`, NUL; symlinks whose target leaves /workspace; hard
  links to anything but an earlier member of the same tar; devices and fifos; files above
  `max_file_bytes` (symlinks out are allowed on request: `unpack`). A member's parent is
  looked up beneath the root with *no* symlinks allowed
  (RESOLVE_NO_SYMLINKS), so a symlink — one the tar made a moment ago, or one already in the
  workspace — is never followed on the host. Files are written next to their final name and
  renamed over it (renameat replaces an entry, never writes through it), owned by the sandbox
  user. A refusal stops the extraction at that member; the members before it stay.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
import tarfile
from contextlib import suppress
from typing import BinaryIO

from sandkasten.files.beneath import walk_tree
from sandkasten.errors import InvalidRequest, PathRefused, TooLarge
from sandkasten.files.workspace_fs import MAX_NAME_BYTES, MAX_PATH_BYTES, MOUNT_POINT, WorkspaceFS

_COPY = 1 << 20
_FILE_OPEN = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY


class WorkspaceArchive(WorkspaceFS):
    """`WorkspaceFS` plus `pack` and `unpack` (same root, owner and size limit)."""

    # --- pack --------------------------------------------------------------------------------

    def pack(self, out: BinaryIO) -> int:
        """Write a tar of the whole workspace to `out`; returns the number of members."""
        written = 0
        with self._failures("archive", "") as root_fd, \
                tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            links: dict[tuple[int, int], str] = {}

            def visit(sub: str, name: str, st: os.stat_result) -> bool:
                nonlocal written
                rel = f"{sub}/{name}" if sub else name
                member = _member(rel, st)
                if stat.S_ISDIR(st.st_mode):
                    tar.addfile(member)
                elif stat.S_ISLNK(st.st_mode):
                    try:
                        member.linkname = self._readlink(root_fd, sub, name)
                    except OSError:
                        return False           # replaced meanwhile: skipped, like a vanished entry
                    tar.addfile(member)
                elif stat.S_ISREG(st.st_mode):
                    first = links.get((st.st_dev, st.st_ino)) if st.st_nlink > 1 else None
                    if first is not None:
                        member.type, member.linkname, member.size = tarfile.LNKTYPE, first, 0
                        tar.addfile(member)
                    elif not self._pack_file(tar, root_fd, rel, member):
                        return False
                    elif st.st_nlink > 1:
                        links[(st.st_dev, st.st_ino)] = rel
                else:
                    return False       # fifo, socket, device: nothing a workspace snapshot needs
                written += 1
                return stat.S_ISDIR(st.st_mode)

            def reopen(sub: str) -> int:
                return self._open(root_fd, sub, os.O_RDONLY | os.O_DIRECTORY, True)

            start = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=root_fd)
            try:
                walk_tree(start, visit, reopen, lambda: False)
            finally:
                os.close(start)
        return written

    def _pack_file(self, tar: tarfile.TarFile, root_fd: int, rel: str, member: tarfile.TarInfo) -> bool:
        """Add one regular file, opened beneath the root with no symlink anywhere on its path.
        Exactly `member.size` bytes go into the tar: a file that shrank meanwhile is padded."""
        try:
            fd = self._open(root_fd, rel, _FILE_OPEN, True)
        except OSError:
            return False                     # removed or replaced by a symlink meanwhile
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return False
            tar.addfile(member, _Exactly(f, member.size))
        return True

    def _readlink(self, root_fd: int, sub: str, name: str) -> str:
        parent = self._open(root_fd, sub, os.O_PATH | os.O_DIRECTORY, True)
        try:
            return os.readlink(name, dir_fd=parent)
        finally:
            os.close(parent)

    # --- unpack ------------------------------------------------------------------------------

    def unpack(self, source: BinaryIO, external_symlinks: bool = False) -> int:
        """Extract a tar stream into the workspace; returns the number of members written.
        external_symlinks: also make symlinks pointing outside /workspace (a venv's
        `bin/python -> /usr/bin/python3`). Nothing here ever follows one, and the sandbox user
        can make them with `ln -s` anyway; refused by default all the same."""
        count = 0
        files: set[str] = set()
        with self._failures("extract into", "") as root_fd:
            try:
                # opened apart to tell a bad stream from a failure inside; closed by `with tar` below
                tar = tarfile.open(fileobj=source, mode="r|*")  # noqa: SIM115
            except tarfile.TarError as e:
                raise InvalidRequest(f"unable to extract the archive: not a tar stream ({e})") from None
            with tar:
                try:
                    for member in tar:
                        rel = self._member_name(member.name)
                        if rel is None:
                            continue
                        self._unpack_member(tar, root_fd, member, rel, files, external_symlinks)
                        count += 1
                except tarfile.TarError as e:
                    raise InvalidRequest(f"unable to extract the archive after {count} members: "
                                         f"malformed tar ({e})", members=count) from None
        return count

    def _member_name(self, name: str) -> str | None:
        """The member's path relative to /workspace; None for the root itself ("." or "./")."""
        def refuse(why: str) -> PathRefused:
            return PathRefused(f"unable to extract '{_shown(name)}': {why}", path=_shown(name))

        if "\0" in name:
            raise refuse("the name contains a NUL byte")
        if name.startswith("/"):
            raise refuse("absolute member names are refused (use names relative to /workspace)")
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise refuse("'..' is refused in member names")
        if len(os.fsencode(name)) > MAX_PATH_BYTES or any(len(os.fsencode(p)) > MAX_NAME_BYTES for p in parts):
            raise refuse("the name is too long")
        return "/".join(parts) or None

    def _unpack_member(self, tar: tarfile.TarFile, root_fd: int, member: tarfile.TarInfo, rel: str,
                       files: set[str], external_symlinks: bool) -> None:
        shown = f"{MOUNT_POINT}/{rel}"

        def refuse(error, why: str):
            return error(f"unable to extract '{_shown(shown)}': {why}", path=_shown(shown))

        if member.isdev() or member.isfifo():
            raise refuse(PathRefused, "device nodes and fifos are refused")
        source: str | None = None   # a hard link's (checked) target
        if member.issym():
            _check_symlink_target(rel, member.linkname, refuse, external_symlinks)
        elif member.islnk():
            try:
                source = self._member_name(member.linkname)
            except PathRefused:
                source = None
            if source is None or source not in files:
                raise refuse(PathRefused, f"a hard link must name an earlier file of the archive, "
                                          f"not '{_shown(member.linkname)}'")
        elif member.isfile() and member.size > self.max_file_bytes:
            raise refuse(TooLarge, f"{member.size} bytes is above the limit of {self.max_file_bytes}")
        elif not (member.isfile() or member.isdir()):
            raise refuse(PathRefused, "unsupported member type")
        parent, _, name = rel.rpartition("/")
        try:
            parent_fd = self._parent_without_symlinks(root_fd, parent)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.EXDEV):
                raise refuse(PathRefused, "its directory is a symlink or not a directory "
                                          "(nothing is extracted through a symlink)") from None
            raise
        try:
            if member.isdir():
                _ensure_dir(parent_fd, name, member.mode, self.uid, self.gid, refuse)
            elif member.issym():
                _place(parent_fd, name, refuse, lambda tmp: os.symlink(member.linkname, tmp, dir_fd=parent_fd),
                       lambda tmp: os.chown(tmp, self.uid, self.gid, dir_fd=parent_fd, follow_symlinks=False))
            elif source is not None:   # a hard link
                src_parent, _, src_name = source.rpartition("/")
                src_fd = self._parent_without_symlinks(root_fd, src_parent)
                try:
                    _place(parent_fd, name, refuse, lambda tmp: os.link(src_name, tmp, src_dir_fd=src_fd,
                                                                        dst_dir_fd=parent_fd, follow_symlinks=False))
                finally:
                    os.close(src_fd)
                files.add(rel)
            else:
                self._write_member(tar, member, parent_fd, name, refuse)
                files.add(rel)
        finally:
            os.close(parent_fd)

    def _write_member(self, tar, member, parent_fd: int, name: str, refuse) -> None:
        data = tar.extractfile(member)
        tmp = f".sk-extract-{secrets.token_hex(8)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=parent_fd)
        try:
            try:
                while chunk := data.read(_COPY):
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view):]
                os.fchown(fd, self.uid, self.gid)
                os.fchmod(fd, member.mode & 0o777)
                os.utime(fd, (member.mtime, member.mtime))
            finally:
                os.close(fd)
            _replace_entry(parent_fd, tmp, name, refuse)
        except BaseException:
            with suppress(OSError):
                os.unlink(tmp, dir_fd=parent_fd)
            raise

    def _parent_without_symlinks(self, root_fd: int, parent: str) -> int:
        """An O_PATH descriptor of `parent`, made (owned by the sandbox user) where missing; any
        symlink on the way is ELOOP, never followed."""
        fd = os.dup(root_fd)
        try:
            for name in [p for p in parent.split("/") if p]:
                try:
                    next_fd = self._open(fd, name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, True)
                except FileNotFoundError:
                    next_fd = self._make_dir(fd, name)
                os.close(fd)
                fd = next_fd
            return fd
        except BaseException:
            os.close(fd)
            raise


# --- pieces of one operation each ---------------------------------------------------------------

def _member(rel: str, st: os.stat_result) -> tarfile.TarInfo:
    info = tarfile.TarInfo(rel)
    info.mode = stat.S_IMODE(st.st_mode)
    info.mtime = int(st.st_mtime)
    info.uid, info.gid = st.st_uid, st.st_gid
    if stat.S_ISDIR(st.st_mode):
        info.type = tarfile.DIRTYPE
    elif stat.S_ISLNK(st.st_mode):
        info.type = tarfile.SYMTYPE
    else:
        info.type, info.size = tarfile.REGTYPE, st.st_size
    return info


class _Exactly:
    """A reader giving exactly `size` bytes of `f`: cut when it grew, zero-padded when it shrank
    while being packed (the tar header already promised `size`)."""

    def __init__(self, f: BinaryIO, size: int) -> None:
        self.f, self.left = f, size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n is None or n < 0 else min(n, self.left)
        data = self.f.read(n) if n else b""
        if len(data) < n:
            data += bytes(n - len(data))
        self.left -= len(data)
        return data

    def readinto(self, buf) -> int:
        data = self.read(len(buf))
        buf[:len(data)] = data
        return len(data)


def _check_symlink_target(rel: str, target: str, refuse, external: bool) -> None:
    """A symlink may point anywhere inside /workspace (absolute /workspace/... or relative
    without climbing out); elsewhere only when `external` was asked for."""
    if not target or "\0" in target:
        raise refuse(PathRefused, "a symlink needs a target without NUL bytes")
    if external:
        return
    if target.startswith("/"):
        if target != MOUNT_POINT and not target.startswith(MOUNT_POINT + "/"):
            raise refuse(PathRefused, f"the symlink points outside {MOUNT_POINT} (to '{_shown(target)}')")
        return
    depth = rel.count("/")           # directories between /workspace and the link
    for part in target.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                raise refuse(PathRefused, f"the symlink points outside {MOUNT_POINT} (to '{_shown(target)}')")
        elif part not in ("", "."):
            depth += 1


def _ensure_dir(parent_fd: int, name: str, mode: int, uid: int, gid: int, refuse) -> None:
    with suppress(FileExistsError):
        os.mkdir(name, 0o700, dir_fd=parent_fd)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise refuse(PathRefused, "an entry that is not a directory is in the way") from None
        raise
    try:
        os.fchown(fd, uid, gid)
        os.fchmod(fd, (mode & 0o777) | 0o700)   # the owner can always go on writing into it
    finally:
        os.close(fd)


def _place(parent_fd: int, name: str, refuse, make, own=None) -> None:
    """make(tmp) creates the entry under a temporary name; it then replaces `name`."""
    tmp = f".sk-extract-{secrets.token_hex(8)}"
    make(tmp)
    try:
        if own is not None:
            own(tmp)
        _replace_entry(parent_fd, tmp, name, refuse)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp, dir_fd=parent_fd)
        raise


def _replace_entry(parent_fd: int, tmp: str, name: str, refuse) -> None:
    """rename(tmp, name): replaces a file or symlink (never writes through it); a directory in
    the way is an error, not something to delete."""
    with suppress(FileNotFoundError):
        if stat.S_ISDIR(os.stat(name, dir_fd=parent_fd, follow_symlinks=False).st_mode):
            raise refuse(InvalidRequest, "a directory of that name is in the way")
    try:
        os.rename(tmp, name, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
    except IsADirectoryError:
        raise refuse(InvalidRequest, "a directory of that name is in the way") from None


def _shown(text: str) -> str:
    text = text.replace("\0", "\\0")
    return text if len(text) <= 200 else text[:200] + "..."

