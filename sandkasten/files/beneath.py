"""Lookups and tree walks that never leave a directory descriptor.

Two implementations of one lookup contract: openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS),
which the kernel makes atomic, and, on kernels without it (< 5.6), a walk that opens one
name per step with O_NOFOLLOW, expands symlinks itself and answers `..` from its own stack of
descriptors. Escapes are EXDEV either way. The tree walks (list, delete) open every child by
its single name with O_NOFOLLOW and hold a bounded number of descriptors however deep the tree.
Used by `sandkasten.files.workspace_fs`, which translates the OSErrors raised here.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import stat
from collections import deque
from contextlib import suppress
from functools import cache

MAX_SYMLINKS = 40             # the kernel's own limit per lookup
DELETE_DEPTH = 32             # open descriptors while walking or deleting a tree, however deep

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



def oserror(code: int) -> OSError:
    return OSError(code, os.strerror(code))


# --- resolving a path beneath the root: two implementations of one contract -----------------

def open_openat2(dir_fd: int, rel: str, flags: int, no_symlinks: bool) -> int:
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
    raise oserror(code)


def _is_symlink(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def open_walking(dir_fd: int, rel: str, flags: int, no_symlinks: bool) -> int:
    """The contract of `open_openat2` (for the flags used here) without openat2."""
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
                    raise oserror(errno.EXDEV)
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
            if no_symlinks or (last and not follow_final) or links > MAX_SYMLINKS:
                raise oserror(errno.ELOOP)
            try:
                target = os.readlink(name, dir_fd=here)
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.ENOENT):
                    raise
                pending.appendleft(name)    # no longer a symlink (raced): look at it again
                continue
            if target.startswith("/"):
                raise oserror(errno.EXDEV)
            pending.extendleft(reversed([p for p in target.split("/") if p not in ("", ".")]))
    finally:
        for fd in stack:
            os.close(fd)


@cache
def openat2_available() -> bool:
    """False on kernels before 5.6 (ENOSYS) or where a seccomp policy hides openat2."""
    try:
        os.close(open_openat2(_AT_FDCWD, ".", os.O_PATH | os.O_DIRECTORY, False))
    except OSError:
        return False
    return True


RESOLVERS = {"openat2": open_openat2, "walk": open_walking}



def _scan(fd: int) -> list[tuple[str, os.stat_result]]:
    """(name, lstat) of a directory's entries, sorted; entries vanishing meanwhile are skipped."""
    out = []
    with os.scandir(fd) as it:
        for e in it:
            with suppress(FileNotFoundError):
                out.append((e.name, e.stat(follow_symlinks=False)))
    return sorted(out, key=lambda item: item[0])


def walk_tree(start: int, visit, reopen, done) -> None:
    """Depth-first over the directories below `start`, opening each child by its single name
    with O_NOFOLLOW. visit(sub, name, lstat) -> descend?; done() -> stop?. Only the deepest
    DELETE_DEPTH directories keep a descriptor; a shallower one that still has subdirectories
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
            stack.append([child_fd, f"{sub}/{child}" if sub else child, None])
            if len(stack) > DELETE_DEPTH and stack[-DELETE_DEPTH - 1][0] is not None:
                os.close(stack[-DELETE_DEPTH - 1][0])
                stack[-DELETE_DEPTH - 1][0] = None
    finally:
        for fd, _, _ in stack:
            if fd is not None:
                os.close(fd)
def remove_tree(parent_fd: int, name: str) -> None:
    """rm -r without following symlinks, without recursion, and with at most DELETE_DEPTH open
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
            elif len(stack) >= DELETE_DEPTH:
                with suppress(FileExistsError, FileNotFoundError):
                    os.rename(subdir, f".sk-delete-{secrets.token_hex(8)}", src_dir_fd=fd, dst_dir_fd=top)
            else:
                stack.append((os.open(subdir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                      dir_fd=fd), subdir))
        os.rmdir(name, dir_fd=parent_fd)
    finally:
        for fd, _ in stack:
            os.close(fd)
