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

Foreign exceptions (OSError) are translated into `sandkasten.errors` at one boundary,
`_failures`; messages show /workspace/..., never the host directory.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import stat
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from sandkasten.errors import FileNotFound, InvalidRequest, PathRefused, SandkastenError, TooLarge

MOUNT_POINT = "/workspace"
MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 255
_MAX_SYMLINKS = 40            # the kernel's own limit per lookup
_DELETE_DEPTH = 32            # open descriptors while walking or deleting a tree, however deep
_DIR_MODE = 0o755

# openat2(2): the same number on x86_64 and aarch64 (new syscalls share one table since 5.1).
_SYS_OPENAT2 = 437
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_AT_FDCWD = -100


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


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


def _oserror(code: int) -> OSError:
    return OSError(code, os.strerror(code))


# --- resolving a path beneath the root: two implementations of one contract -----------------

def _open_openat2(dir_fd: int, rel: str, flags: int, no_symlinks: bool) -> int:
    """openat2(dir_fd, rel) that never leaves dir_fd; symlinks inside are followed unless
    no_symlinks (then any symlink is ELOOP); the final one is not followed with O_NOFOLLOW."""
    resolve = _RESOLVE_BENEATH | _RESOLVE_NO_MAGICLINKS | (_RESOLVE_NO_SYMLINKS if no_symlinks else 0)
    how = _OpenHow(flags | os.O_CLOEXEC, 0, resolve)
    path = os.fsencode(rel or ".")
    for _ in range(16):   # EAGAIN: a concurrent rename raced a '..' lookup; the kernel asks to retry
        fd = _libc.syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(dir_fd), ctypes.c_char_p(path),
                           ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
        if fd >= 0:
            return fd
        code = ctypes.get_errno()
        if code not in (errno.EAGAIN, errno.EINTR):
            break
    raise _oserror(code)


def _is_symlink(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _open_walking(dir_fd: int, rel: str, flags: int, no_symlinks: bool) -> int:
    """The contract of `_open_openat2` (for the flags used here) without openat2."""
    follow_final = not (no_symlinks or flags & os.O_NOFOLLOW)
    pending = deque(p for p in rel.split("/") if p not in ("", "."))
    stack: list[int] = []          # descriptors of the directories below dir_fd we are in
    links = 0
    try:
        while True:
            here = stack[-1] if stack else dir_fd
            if not pending:
                return os.open(".", flags | os.O_CLOEXEC, dir_fd=here)
            name = pending.popleft()
            if name == "..":
                if not stack:
                    raise _oserror(errno.EXDEV)
                os.close(stack.pop())
                continue
            last = not pending
            step = (flags if last else os.O_PATH | os.O_DIRECTORY) | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                fd = os.open(name, step, dir_fd=here)
            except OSError as e:
                if e.errno not in (errno.ELOOP, errno.ENOTDIR) or not _is_symlink(name, here):
                    raise
                fd = -1
            else:
                if step & os.O_PATH and stat.S_ISLNK(os.fstat(fd).st_mode):
                    os.close(fd)
                    fd = -1
            if fd >= 0:
                if last:
                    return fd
                stack.append(fd)
                continue
            links += 1                      # `name` is a symlink: expand it ourselves
            if no_symlinks or (last and not follow_final) or links > _MAX_SYMLINKS:
                raise _oserror(errno.ELOOP)
            try:
                target = os.readlink(name, dir_fd=here)
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.ENOENT):
                    raise
                pending.appendleft(name)    # no longer a symlink (raced): look at it again
                continue
            if target.startswith("/"):
                raise _oserror(errno.EXDEV)
            pending.extendleft(reversed([p for p in target.split("/") if p not in ("", ".")]))
    finally:
        for fd in stack:
            os.close(fd)


@cache
def openat2_available() -> bool:
    """False on kernels before 5.6 (ENOSYS) or where a seccomp policy hides openat2."""
    try:
        os.close(_open_openat2(_AT_FDCWD, ".", os.O_PATH | os.O_DIRECTORY, False))
    except OSError:
        return False
    return True


_RESOLVERS = {"openat2": _open_openat2, "walk": _open_walking}


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
        raise _oserror(errno.ENOENT)
    if here == root or here == root + "/":
        return ""
    if not here.startswith(root + "/"):
        raise _oserror(errno.EXDEV)
    return here[len(root) + 1:]


def _follow_lexically(base: str, target: str) -> str:
    parts = base.split("/") if base else []
    for p in target.split("/"):
        if p == "..":
            if not parts:
                raise _oserror(errno.EXDEV)
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
}


class WorkspaceFS:
    def __init__(self, root: Path, uid: int = 65534, gid: int = 65534, max_file_bytes: int = 64 << 20,
                 *, resolver: str = "auto") -> None:
        """resolver: "openat2", "walk" (the fallback, also for tests) or "auto" (openat2 if the
        kernel has it)."""
        if resolver == "auto":
            resolver = "openat2" if openat2_available() else "walk"
        if resolver not in _RESOLVERS:
            raise ValueError(f"unknown resolver {resolver!r}")
        self.root = Path(root)
        self.uid, self.gid, self.max_file_bytes = uid, gid, max_file_bytes
        self.resolver = resolver
        self._open = _RESOLVERS[resolver]

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
                               path=shown, errno=errno.errorcode.get(e.errno, "?")) from None
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
                _walk_tree(start, visit, reopen, lambda: len(found) >= limit)
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
            for _ in range(_MAX_SYMLINKS + 1):
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
                        raise _oserror(errno.EISDIR)
                    if not stat.S_ISLNK(st.st_mode):
                        raise _Refused(PathRefused, f"the existing entry is {_describe(st.st_mode)}")
                    try:
                        target = os.readlink(name, dir_fd=parent_fd)
                    except OSError as e:
                        if e.errno in (errno.EINVAL, errno.ENOENT):
                            continue        # no longer a symlink (raced): look at it again
                        raise
                    if target.startswith("/"):
                        raise _oserror(errno.EXDEV)
                    rel = _follow_lexically(_relative_to_root(root_fd, parent_fd), target)
                    if not rel:
                        raise _oserror(errno.EISDIR)
                finally:
                    os.close(parent_fd)
            raise _oserror(errno.ELOOP)

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
                    _remove_tree(parent_fd, name)
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
            raise _oserror(errno.ENOTDIR if e.errno == errno.ELOOP else e.errno) from None
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
        raise _oserror(errno.EISDIR)
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


def _scan(fd: int) -> list[tuple[str, os.stat_result]]:
    """(name, lstat) of a directory's entries, sorted; entries vanishing meanwhile are skipped."""
    out = []
    with os.scandir(fd) as it:
        for e in it:
            with suppress(FileNotFoundError):
                out.append((e.name, e.stat(follow_symlinks=False)))
    return sorted(out, key=lambda item: item[0])


def _walk_tree(start: int, visit, reopen, done) -> None:
    """Depth-first over the directories below `start`, opening each child by its single name
    with O_NOFOLLOW. visit(sub, name, lstat) -> descend?; done() -> stop?. Only the deepest
    _DELETE_DEPTH directories keep a descriptor; a shallower one that still has subdirectories
    to visit is reopened by its path below `start` (reopen(sub), no symlinks allowed)."""
    stack: list[list] = [[os.dup(start), "", None]]   # [fd | None, sub, subdirs still to visit]
    try:
        while stack and not done():
            frame = stack[-1]
            fd, sub, todo = frame
            if todo is None:
                todo = frame[2] = deque()
                for child, st in _scan(fd):
                    if done():
                        return
                    if visit(sub, child, st):
                        todo.append(child)
            if not todo:
                stack.pop()
                if fd is not None:
                    os.close(fd)
                continue
            child = todo.popleft()
            try:
                if fd is None:
                    fd = frame[0] = reopen(sub)
                child_fd = os.open(child, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError:
                continue      # replaced by a symlink, removed or too deep meanwhile: skip it
            stack.append([child_fd, _join(sub, child), None])
            if len(stack) > _DELETE_DEPTH and stack[-_DELETE_DEPTH - 1][0] is not None:
                os.close(stack[-_DELETE_DEPTH - 1][0])
                stack[-_DELETE_DEPTH - 1][0] = None
    finally:
        for fd, _, _ in stack:
            if fd is not None:
                os.close(fd)


def _remove_tree(parent_fd: int, name: str) -> None:
    """rm -r without following symlinks, without recursion, and with at most _DELETE_DEPTH open
    descriptors however deep the tree: deeper directories are first moved up into the top one."""
    top = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
    stack: list[tuple[int, str]] = [(top, name)]
    try:
        while stack:
            fd = stack[-1][0]
            subdir = None
            with os.scandir(fd) as it:
                for e in it:
                    if e.is_dir(follow_symlinks=False):
                        subdir = e.name
                        break
                    with suppress(FileNotFoundError):
                        os.unlink(e.name, dir_fd=fd)
            if subdir is None:
                os.close(fd)
                _, done = stack.pop()
                if stack:
                    os.rmdir(done, dir_fd=stack[-1][0])
            elif len(stack) >= _DELETE_DEPTH:
                with suppress(FileExistsError, FileNotFoundError):
                    os.rename(subdir, f".sk-delete-{secrets.token_hex(8)}", src_dir_fd=fd, dst_dir_fd=top)
            else:
                stack.append((os.open(subdir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                      dir_fd=fd), subdir))
        os.rmdir(name, dir_fd=parent_fd)
    finally:
        for fd, _ in stack:
            os.close(fd)
