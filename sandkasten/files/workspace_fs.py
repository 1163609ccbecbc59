"""Host-side file access confined to one workspace directory (bind-mounted at /workspace).

The daemon runs this as root, in a worker thread, for the HTTP file API. Sandbox users own the
directory's contents (symlinks, fifos, hardlinks, deep trees, and they change them while we look);
API clients own the paths. So nothing here trusts a path string after it leaves `normalize`:

- every lookup goes through the kernel with openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)
  relative to a descriptor of the root, which refuses an escape (EXDEV) atomically — a `..`,
  an absolute symlink or a relative one climbing out — with no check-then-use window;
- on kernels without openat2 (< 5.6) a walk gives the same contract: one name per step, opened
  with O_NOFOLLOW relative to the previous directory's descriptor, symlinks expanded by us and
  `..` answered from our own stack of descriptors, never by the filesystem;
- after the lookup every change is one name relative to a directory descriptor (mkdirat,
  renameat, unlinkat, fchown), and none of those follows a final symlink.

The lookups and the tree walks live in `sandkasten.files.beneath`; this module adds the API's rules
(paths, sizes, what may be read or replaced) on top.

Foreign exceptions (OSError) are translated into `sandkasten.errors` at one boundary,
`_failures`; messages show /workspace/..., never the host directory.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from sandkasten.files.beneath import MAX_SYMLINKS, RESOLVERS, oserror, openat2_available, remove_tree, walk_tree
from sandkasten.errors import FileBusy, FileNotFound, InvalidRequest, PathRefused, SandkastenError, TooLarge

MOUNT_POINT = "/workspace"
MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 255
_DIR_MODE = 0o755


@dataclass(frozen=True)
class Entry:
    path: str    # normalized, relative to /workspace ("" is the root)
    name: str
    type: str    # "file" | "dir" | "symlink" | "other"
    size: int
    mode: int    # permission bits (stat.S_IMODE)
    mtime: float


class _Refused(Exception):
    """Raised inside an operation; `_failures` adds the verb and the path."""

    def __init__(self, error: type[SandkastenError], why: str) -> None:
        super().__init__(why)
        self.error, self.why = error, why


# --- small pure pieces -------------------------------------------------------------------------

def _split(rel: str) -> tuple[str, str]:
    parent, _, name = rel.rpartition("/")
    return parent, name


def _join(*parts: str) -> str:
    return "/".join(p for p in parts if p)


def _kind(mode: int) -> str:
    return {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink"}.get(stat.S_IFMT(mode), "other")


def _describe(mode: int) -> str:
    return {stat.S_IFIFO: "a fifo", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
            stat.S_IFSOCK: "a socket", stat.S_IFLNK: "a symlink"}.get(stat.S_IFMT(mode), "not a regular file")


def _entry(rel: str, st: os.stat_result) -> Entry:
    return Entry(path=rel, name=_split(rel)[1], type=_kind(st.st_mode), size=st.st_size,
                 mode=stat.S_IMODE(st.st_mode), mtime=st.st_mtime)


def _shown(path: object) -> str:
    text = str(path).replace("\0", "\\0")
    return text if len(text) <= 200 else text[:200] + "..."


def _relative_to_root(root_fd: int, fd: int) -> str:
    """Where the directory `fd` is now, relative to the root. Only ever used to compute a path
    that is then resolved beneath the root again, so a race here cannot lead outside."""
    root = os.readlink(f"/proc/self/fd/{root_fd}").rstrip("/")
    here = os.readlink(f"/proc/self/fd/{fd}")
    if here.endswith(" (deleted)"):
        raise oserror(errno.ENOENT)
    if here == root or here == root + "/":
        return ""
    if not here.startswith(root + "/"):
        raise oserror(errno.EXDEV)
    return here[len(root) + 1:]


def _follow_lexically(base: str, target: str) -> str:
    parts = base.split("/") if base else []
    for p in target.split("/"):
        if p == "..":
            if not parts:
                raise oserror(errno.EXDEV)
            parts.pop()
        elif p not in ("", "."):
            parts.append(p)
    return "/".join(parts)


_ERRNO_FAILURES: dict[int, tuple[type[SandkastenError], str]] = {
    errno.EXDEV: (PathRefused, "path escapes /workspace"),
    errno.ELOOP: (PathRefused, "too many levels of symbolic links"),
    errno.ENAMETOOLONG: (PathRefused, "path too long"),
    errno.EACCES: (PathRefused, "permission denied"),
    errno.EPERM: (PathRefused, "operation not permitted"),
    errno.ENOENT: (FileNotFound, "no such file or directory"),
    errno.ENOTDIR: (InvalidRequest, "a path component is not a directory"),
    errno.EISDIR: (InvalidRequest, "is a directory"),
    errno.ENOTEMPTY: (InvalidRequest, "directory not empty"),
    errno.EEXIST: (InvalidRequest, "file exists"),
    errno.ENOSPC: (TooLarge, "no space left on the workspace's filesystem"),
    errno.EDQUOT: (TooLarge, "disk quota exceeded"),
    # a process in the sandbox holds a lease (F_SETLEASE) or runs the file: for it to let go
    errno.EAGAIN: (FileBusy, "a process in the sandbox holds a lease on it: retry later"),
    errno.ETXTBSY: (FileBusy, "it is a program running in the sandbox"),
    errno.EBUSY: (FileBusy, "it is busy (a mount point?)"),
}


class WorkspaceFS:
    def __init__(self, root: Path, uid: int = 65534, gid: int = 65534, max_file_bytes: int = 64 << 20,
                 *, resolver: str = "auto") -> None:
        """resolver: "openat2", "walk" (the fallback, also for tests) or "auto" (openat2 if the
        kernel has it)."""
        if resolver == "auto":
            resolver = "openat2" if openat2_available() else "walk"
        if resolver not in RESOLVERS:
            raise ValueError(f"unknown resolver {resolver!r}")
        self.root = Path(root)
        self.uid, self.gid, self.max_file_bytes = uid, gid, max_file_bytes
        self.resolver = resolver
        self._open = RESOLVERS[resolver]

    # --- paths -------------------------------------------------------------------------------

    def normalize(self, path: str, verb: str = "access") -> str:
        """The path relative to the root ("" is the root itself); refusals say `unable to <verb>`."""
        return self._normalize(path, verb)

    def _normalize(self, path: str, verb: str) -> str:
        def refuse(why: str) -> PathRefused:
            return PathRefused(f"unable to {verb} '{_shown(path)}': {why}", path=_shown(path))

        if not isinstance(path, str):
            raise refuse("path must be a string")
        if "\0" in path:
            raise refuse("path contains a NUL byte")
        try:
            size = len(os.fsencode(path))
        except UnicodeEncodeError:
            raise refuse("path is not valid UTF-8") from None
        if size > MAX_PATH_BYTES:
            raise refuse(f"path is longer than {MAX_PATH_BYTES} bytes")
        if path.startswith("/"):
            if path != MOUNT_POINT and not path.startswith(MOUNT_POINT + "/"):
                raise refuse(f"path escapes {MOUNT_POINT}")
            path = path[len(MOUNT_POINT):]
        parts: list[str] = []
        for part in path.split("/"):
            if part == "..":
                if not parts:
                    raise refuse(f"path escapes {MOUNT_POINT}")
                parts.pop()
            elif part not in ("", "."):
                if len(os.fsencode(part)) > MAX_NAME_BYTES:
                    raise refuse(f"a path component is longer than {MAX_NAME_BYTES} bytes")
                parts.append(part)
        return "/".join(parts)

    @contextmanager
    def _failures(self, verb: str, rel: str) -> Iterator[int]:
        """Open the root, yield its descriptor; translate every failure inside into our errors."""
        shown = _shown(MOUNT_POINT + ("/" + rel if rel else ""))
        try:
            root_fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise FileNotFound(f"unable to {verb} '{shown}': the workspace directory is missing",
                               path=shown, errno=errno.errorcode.get(e.errno or 0, "?")) from None
        try:
            yield root_fd
        except _Refused as r:
            raise r.error(f"unable to {verb} '{shown}': {r.why}", path=shown) from None
        except OSError as e:
            name = errno.errorcode.get(e.errno or 0, "?")
            error, why = _ERRNO_FAILURES.get(e.errno or 0, (SandkastenError, f"{name} ({os.strerror(e.errno or 0)})"))
            raise error(f"unable to {verb} '{shown}': {why}", path=shown, errno=name) from None
        finally:
            os.close(root_fd)

    # --- reading -----------------------------------------------------------------------------

    def read(self, path: str, max_bytes: int | None = None) -> tuple[bytes, bool, int]:
        """(data, truncated, size). At most max_bytes (and never more than max_file_bytes)."""
        rel = self._normalize(path, "read")
        cap = self.max_file_bytes if max_bytes is None else max(0, min(max_bytes, self.max_file_bytes))
        with self._failures("read", rel) as root_fd:
            probe = self._open(root_fd, rel, os.O_PATH, False)
            try:
                _check_readable(os.fstat(probe))
                fd = _reopen_for_reading(probe, lambda: self._open(root_fd, rel, _READ_FLAGS, False))
            finally:
                os.close(probe)
            try:
                size = os.fstat(fd).st_size
                buf = bytearray()
                while len(buf) <= cap:
                    chunk = os.read(fd, min(1 << 20, cap + 1 - len(buf)))
                    if not chunk:
                        break
                    buf += chunk
            finally:
                os.close(fd)
        return bytes(buf[:cap]), len(buf) > cap or size > cap, max(size, len(buf))

    def stat(self, path: str) -> Entry:
        """The entry itself: a final symlink is reported, not followed."""
        rel = self._normalize(path, "stat")
        with self._failures("stat", rel) as root_fd:
            if not rel:
                return _entry(rel, os.fstat(root_fd))
            parent, name = _split(rel)
            parent_fd = self._open(root_fd, parent, os.O_PATH | os.O_DIRECTORY, False)
            try:
                return _entry(rel, os.stat(name, dir_fd=parent_fd, follow_symlinks=False))
            finally:
                os.close(parent_fd)

    def list(self, path: str = "", recursive: bool = False, limit: int = 10000) -> list[Entry]:
        """Entries of a directory sorted by name, then (recursive) each subdirectory's, depth
        first. Symlinks are reported as such and never followed (only the starting path may pass
        through one). At most `limit` entries."""
        rel = self._normalize(path, "list")
        found: list[Entry] = []
        with self._failures("list", rel) as root_fd:
            start = self._open(root_fd, rel, os.O_RDONLY | os.O_DIRECTORY, False)
            def visit(sub: str, name: str, st: os.stat_result) -> bool:
                found.append(_entry(_join(rel, sub, name), st))
                return recursive and stat.S_ISDIR(st.st_mode)

            def reopen(sub: str) -> int:
                return self._open(start, sub, os.O_RDONLY | os.O_DIRECTORY, True)

            try:
                walk_tree(start, visit, reopen, lambda: len(found) >= limit)
            finally:
                os.close(start)
        return found

    # --- changing ----------------------------------------------------------------------------

    def write(self, path: str, data: bytes, mode: int = 0o644, make_parents: bool = True) -> Entry:
        """Atomically replace (or create) a regular file owned by uid:gid. A final symlink that
        stays inside the workspace is written through (its target is replaced)."""
        rel = self._normalize(path, "write")
        if not rel:
            raise PathRefused(f"unable to write '{MOUNT_POINT}': the workspace root is a directory", path=MOUNT_POINT)
        if len(data) > self.max_file_bytes:
            raise TooLarge(f"unable to write '{_shown(MOUNT_POINT + '/' + rel)}': {len(data)} bytes is above "
                           f"the limit of {self.max_file_bytes}", limit=self.max_file_bytes)
        with self._failures("write", rel) as root_fd:
            for _ in range(MAX_SYMLINKS + 1):
                parent, name = _split(rel)
                parent_fd = self._open_parent(root_fd, parent, make_parents)
                try:
                    try:
                        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
                    except FileNotFoundError:
                        st = None
                    if st is None or stat.S_ISREG(st.st_mode):
                        return self._replace(parent_fd, name, rel, data, mode)
                    if stat.S_ISDIR(st.st_mode):
                        raise oserror(errno.EISDIR)
                    if not stat.S_ISLNK(st.st_mode):
                        raise _Refused(PathRefused, f"the existing entry is {_describe(st.st_mode)}")
                    try:
                        target = os.readlink(name, dir_fd=parent_fd)
                    except OSError as e:
                        if e.errno in (errno.EINVAL, errno.ENOENT):
                            continue        # no longer a symlink (raced): look at it again
                        raise
                    if target.startswith("/"):
                        raise oserror(errno.EXDEV)
                    rel = _follow_lexically(_relative_to_root(root_fd, parent_fd), target)
                    if not rel:
                        raise oserror(errno.EISDIR)
                finally:
                    os.close(parent_fd)
            raise oserror(errno.ELOOP)

    def delete(self, path: str, recursive: bool = False) -> None:
        """Remove one entry; a symlink is removed itself, never its target."""
        rel = self._normalize(path, "delete")
        if not rel:
            raise PathRefused(f"unable to delete '{MOUNT_POINT}': refusing to delete the workspace root",
                              path=MOUNT_POINT)
        with self._failures("delete", rel) as root_fd:
            parent, name = _split(rel)
            parent_fd = self._open(root_fd, parent, os.O_PATH | os.O_DIRECTORY, False)
            try:
                st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
                if not stat.S_ISDIR(st.st_mode):
                    os.unlink(name, dir_fd=parent_fd)
                elif not recursive:
                    raise _Refused(InvalidRequest, "is a directory (delete it recursively to remove its contents)")
                else:
                    remove_tree(parent_fd, name)
            finally:
                os.close(parent_fd)

    def _open_parent(self, root_fd: int, parent: str, create: bool) -> int:
        """An O_PATH descriptor of `parent`, creating missing directories (owned uid:gid) if asked."""
        try:
            return self._open(root_fd, parent, os.O_PATH | os.O_DIRECTORY, False)
        except OSError as e:
            if e.errno != errno.ENOENT or not create:
                raise
        fd = os.dup(root_fd)
        try:
            done: list[str] = []
            for name in parent.split("/"):
                done.append(name)
                try:
                    next_fd = self._open(root_fd, "/".join(done), os.O_PATH | os.O_DIRECTORY, False)
                except FileNotFoundError:
                    next_fd = self._make_dir(fd, name)
                os.close(fd)
                fd = next_fd
            return fd
        except BaseException:
            os.close(fd)
            raise

    def _make_dir(self, parent_fd: int, name: str) -> int:
        try:
            os.mkdir(name, 0o700, dir_fd=parent_fd)
            created = True
        except FileExistsError:
            created = False   # made meanwhile, or a dangling symlink: the O_NOFOLLOW open decides
        try:
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
        except OSError as e:
            raise oserror(errno.ENOTDIR if e.errno == errno.ELOOP else (e.errno or errno.EIO)) from None
        if created:
            os.fchown(fd, self.uid, self.gid)
            os.fchmod(fd, _DIR_MODE)
        return fd

    def _replace(self, parent_fd: int, name: str, rel: str, data: bytes, mode: int) -> Entry:
        """Write a temp file next to `name`, then rename it over `name` (renameat never follows)."""
        tmp = f".sk-write-{secrets.token_hex(8)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=parent_fd)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fchown(fd, self.uid, self.gid)
                os.fchmod(fd, mode & 0o777)
                os.fsync(fd)
                st = os.fstat(fd)
            finally:
                os.close(fd)
            os.rename(tmp, name, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
        except BaseException:
            with suppress(OSError):
                os.unlink(tmp, dir_fd=parent_fd)
            raise
        return _entry(rel, st)


# --- helpers of one operation each ---------------------------------------------------------------

_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY   # O_NONBLOCK: a fifo must never block us


def _check_readable(st: os.stat_result) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise oserror(errno.EISDIR)
    if not stat.S_ISREG(st.st_mode):
        raise _Refused(PathRefused, f"not a regular file ({_describe(st.st_mode)[2:]})")
    if st.st_nlink > 1:
        raise _Refused(PathRefused, "the file has several hard links and may be shared with a file "
                                    f"outside {MOUNT_POINT}")


def _reopen_for_reading(probe: int, open_again) -> int:
    """Turn the checked O_PATH descriptor into a readable one for the very same inode: through
    /proc/self/fd (no lookup at all), or by a second lookup if /proc is missing, checked again."""
    try:
        fd = os.open(f"/proc/self/fd/{probe}", _READ_FLAGS | os.O_CLOEXEC)
    except FileNotFoundError:
        fd = open_again()
    before, after = os.fstat(probe), os.fstat(fd)
    if (before.st_dev, before.st_ino) != (after.st_dev, after.st_ino):
        os.close(fd)
        raise _Refused(PathRefused, "the file was replaced while opening it")
    try:
        _check_readable(after)
    except BaseException:
        os.close(fd)
        raise
    return fd
