"""WorkspaceFS on real files, as root: every trick a sandbox user or an API client can play is
refused, and a canary tree outside the workspace proves nothing outside was read or changed.
Every test runs twice: with openat2 and with the fallback walk (old kernels)."""

from __future__ import annotations

import gc
import hashlib
import os
import stat
import threading
from pathlib import Path

import pytest

from sandkasten.files import workspace_fs
from sandkasten.errors import FileNotFound, InvalidRequest, PathRefused, TooLarge
from sandkasten.files.workspace_fs import Entry, WorkspaceFS

NOBODY = 65534


def snapshot(top: Path) -> dict[str, tuple]:
    """Every entry under `top` with its type, and content hash for files (never follows links)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for n in dirnames + filenames:
            p = Path(dirpath, n)
            st = p.lstat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else None
            out[str(p.relative_to(top))] = (stat.S_IFMT(st.st_mode), st.st_size, digest)
    return out


def open_fds(top: Path) -> set[tuple[str, str]]:
    """This process's descriptors on anything under `top` (a file some other test dropped
    unclosed points elsewhere, so it can close mid-count without changing this)."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed meanwhile (the listing's own descriptor, among others)
            continue
        if target == str(top) or target.startswith(f"{top}/"):
            out.add((fd, target))
    return out


def fds_left(top: Path, before: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """Descriptors under `top` opened since `before` and still open after a full collection
    (which runs only when some are left: it costs a tenth of a second with the suite loaded)."""
    if open_fds(top) - before:
        gc.collect()
    return open_fds(top) - before


@pytest.fixture(params=["openat2", "walk"])
def resolver(request) -> str:
    if request.param == "openat2" and not workspace_fs.openat2_available():
        pytest.skip("kernel without openat2")
    return request.param


@pytest.fixture
def outside(tmp_path) -> Path:
    d = tmp_path / "outside"
    d.mkdir()
    (d / "canary").write_bytes(b"host secret\n")
    (d / "sub").mkdir()
    (d / "sub" / "deep").write_bytes(b"also secret\n")
    return d


@pytest.fixture
def root(tmp_path) -> Path:
    d = tmp_path / "ws"
    d.mkdir()
    return d


@pytest.fixture
def fs(root, outside, resolver):
    before_fds, before_outside = open_fds(root.parent), snapshot(outside)
    yield WorkspaceFS(root, resolver=resolver)
    assert not fds_left(root.parent, before_fds), "descriptor leak"
    assert snapshot(outside) == before_outside, "a file outside the workspace changed"


def test_auto_uses_openat2_when_present_and_walk_otherwise(root, monkeypatch):
    assert WorkspaceFS(root).resolver == ("openat2" if workspace_fs.openat2_available() else "walk")
    monkeypatch.setattr(workspace_fs, "openat2_available", lambda: False)
    assert WorkspaceFS(root).resolver == "walk"


# --- normalize -----------------------------------------------------------------------------------

@pytest.mark.parametrize("given, expected", [
    ("/workspace/a/b", "a/b"), ("a/b", "a/b"), ("./a", "a"), ("a//b/./c/", "a/b/c"),
    ("/workspace", ""), ("/workspace/", ""), ("", ""), (".", ""), ("a/../b", "b"),
])
def test_normalize_accepts(fs, given, expected):
    assert fs.normalize(given) == expected


@pytest.mark.parametrize("given, why", [
    ("..", "escapes /workspace"), ("../x", "escapes /workspace"), ("a/../../x", "escapes /workspace"),
    ("/etc/passwd", "escapes /workspace"), ("/workspace/../etc/passwd", "escapes /workspace"),
    ("/workspacex/a", "escapes /workspace"), ("//workspace/a", "escapes /workspace"),
    ("a\0b", "NUL byte"), ("x" * 256, "longer than 255"), ("a/" * 2100, "longer than 4096"),
    ("\ud800", "not valid UTF-8"),
])
def test_normalize_refuses(fs, given, why):
    with pytest.raises(PathRefused, match=why):
        fs.normalize(given)


# --- round trips -------------------------------------------------------------------------------

def test_binary_round_trip_is_byte_identical_and_owned_by_nobody(fs, root):
    data = os.urandom(5 << 20)
    entry = fs.write("/workspace/blob.bin", data)
    assert entry == Entry("blob.bin", "blob.bin", "file", len(data), 0o644, entry.mtime)
    assert fs.read("blob.bin") == (data, False, len(data))
    st = (root / "blob.bin").stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY, NOBODY, 0o644)
    assert os.listdir(root) == ["blob.bin"], "temp file left behind"


def test_text_round_trip_and_overwrite(fs):
    fs.write("notes.txt", "grüße\n".encode())
    fs.write("notes.txt", "zweite Fassung\n".encode(), mode=0o600)
    assert fs.read("./notes.txt") == ("zweite Fassung\n".encode(), False, 15)
    assert fs.stat("notes.txt").mode == 0o600


def test_write_creates_parents_owned_by_nobody(fs, root):
    fs.write("a/b/c/file", b"x")
    for d in ("a", "a/b", "a/b/c"):
        st = (root / d).stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY, NOBODY, 0o755)
    with pytest.raises(FileNotFound):
        fs.write("missing/file", b"x", make_parents=False)


def test_write_mode_drops_special_bits(fs):
    assert fs.write("tool", b"#!/bin/sh\n", mode=0o4755).mode == 0o755


def test_too_large_names_the_limit_and_writes_nothing(root, resolver):
    small = WorkspaceFS(root, max_file_bytes=1024, resolver=resolver)
    with pytest.raises(TooLarge) as err:
        small.write("big", b"x" * 1025)
    assert err.value.details["limit"] == 1024
    assert os.listdir(root) == []
    small.write("fits", b"x" * 1024)


def test_read_with_max_bytes_truncates(fs):
    fs.write("log", b"0123456789")
    assert fs.read("log", max_bytes=4) == (b"0123", True, 10)
    assert fs.read("log", max_bytes=10) == (b"0123456789", False, 10)


def test_read_caps_at_max_file_bytes(root, resolver):
    (root / "big").write_bytes(b"y" * 100)
    assert WorkspaceFS(root, max_file_bytes=10, resolver=resolver).read("big") == (b"y" * 10, True, 100)


def test_read_of_missing_file_and_of_a_directory(fs, root):
    with pytest.raises(FileNotFound, match="'/workspace/nope': no such file"):
        fs.read("nope")
    (root / "d").mkdir()
    with pytest.raises(InvalidRequest, match="is a directory"):
        fs.read("d")
    with pytest.raises(PathRefused):
        fs.write("", b"x")


# --- escapes by path -------------------------------------------------------------------------

ESCAPES = ["../x", "a/../../x", "/etc/passwd", "/workspace/../etc/passwd", "../outside/canary"]


@pytest.mark.parametrize("path", ESCAPES)
def test_escaping_paths_are_refused_for_every_operation(fs, tmp_path, path):
    for call in (lambda: fs.read(path), lambda: fs.write(path, b"pwned"), lambda: fs.delete(path),
                 lambda: fs.list(path), lambda: fs.stat(path)):
        with pytest.raises(PathRefused, match="path escapes /workspace") as err:
            call()
        assert str(tmp_path) not in str(err.value)
    assert not (tmp_path / "x").exists()


# --- escapes by symlink --------------------------------------------------------------------------

def test_absolute_symlink_to_etc(fs, root):
    (root / "evil").symlink_to("/etc")
    name = f"sk-test-{os.getpid()}"
    try:
        with pytest.raises(PathRefused, match="escapes"):
            fs.read("evil/passwd")
        with pytest.raises(PathRefused, match="escapes"):
            fs.write(f"evil/{name}", b"pwned")
        with pytest.raises(PathRefused, match="escapes"):
            fs.list("evil")
        with pytest.raises(PathRefused, match="escapes"):
            fs.delete("evil/hostname")
    finally:
        assert not Path("/etc", name).exists()
    assert Path("/etc/hostname").exists() or Path("/etc/passwd").exists()


def test_absolute_symlink_to_outside_dir_write_and_read(fs, root, outside):
    (root / "out").symlink_to(outside)
    for path in ("out/canary", "out/new", "out/sub/deep", "out/sub/newdir/f"):
        with pytest.raises(PathRefused, match="escapes"):
            fs.write(path, b"pwned")
        with pytest.raises(PathRefused, match="escapes"):
            fs.read(path)


def test_relative_symlink_climbing_out(fs, root):
    (root / "up").symlink_to("../..")
    (root / "a").mkdir()
    (root / "a" / "up2").symlink_to("../../outside")
    for path in ("up/outside/canary", "a/up2/canary", "a/up2/sub/deep"):
        with pytest.raises(PathRefused, match="escapes"):
            fs.read(path)
        with pytest.raises(PathRefused, match="escapes"):
            fs.write(path, b"pwned")
    with pytest.raises(PathRefused):
        fs.write("a/up2/newfile", b"pwned")
    with pytest.raises(PathRefused):
        fs.list("up", recursive=True)


@pytest.mark.parametrize("target", ["ABS", "../outside/canary", "../outside/not-yet"])
def test_final_symlink_pointing_outside_is_neither_read_nor_written(fs, root, outside, target):
    target = str(outside / "canary") if target == "ABS" else target
    (root / "link").symlink_to(target)
    with pytest.raises(PathRefused, match="escapes"):
        fs.write("link", b"clobbered")
    with pytest.raises((PathRefused, FileNotFound)):
        fs.read("link")
    assert os.readlink(root / "link") == target
    assert not (outside / "not-yet").exists()


def test_symlinks_inside_the_workspace_work(fs, root):
    fs.write("real/data.txt", b"v1")
    (root / "alias").symlink_to("real")
    (root / "real" / "link").symlink_to("data.txt")
    (root / "real" / "sub").mkdir()
    (root / "real" / "sub" / "back").symlink_to("../data.txt")
    assert fs.read("alias/data.txt")[0] == b"v1"
    assert fs.read("real/sub/back")[0] == b"v1"
    fs.write("real/link", b"v2")             # written through: the link stays a link
    assert os.readlink(root / "real" / "link") == "data.txt"
    assert (root / "real" / "data.txt").read_bytes() == b"v2"
    fs.write("alias/sub/back", b"v3")
    assert (root / "real" / "data.txt").read_bytes() == b"v3"
    fs.write("alias/new.txt", b"n")
    assert (root / "real" / "new.txt").read_bytes() == b"n"


def test_dangling_symlink_inside_is_written_through(fs, root):
    (root / "later").symlink_to("made/by/write")
    (root / "made").mkdir()
    (root / "made" / "by").mkdir()
    fs.write("later", b"ok")
    assert (root / "made" / "by" / "write").read_bytes() == b"ok"


def test_symlink_loops_are_refused(fs, root):
    (root / "loop1").symlink_to("loop2")
    (root / "loop2").symlink_to("loop1")
    (root / "self").symlink_to("self")
    for path in ("loop1", "self", "self/x"):
        with pytest.raises(PathRefused, match="symbolic links"):
            fs.read(path)
        with pytest.raises(PathRefused, match="symbolic links"):
            fs.write(path, b"x")


# --- special files -------------------------------------------------------------------------------

def test_fifo_is_refused_without_blocking(fs, root):
    os.mkfifo(root / "pipe")
    (root / "pipelink").symlink_to("pipe")
    outcome: dict[str, BaseException | None] = {}

    def try_read() -> None:
        for path in ("pipe", "pipelink"):
            try:
                fs.read(path)
                outcome[path] = None
            except BaseException as e:
                outcome[path] = e

    reader = threading.Thread(target=try_read, daemon=True)
    reader.start()
    reader.join(60)   # a guard against hanging forever, not a timing assertion
    if reader.is_alive():   # unblock the reader so nothing is left behind, then fail
        os.close(os.open(root / "pipe", os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("reading a fifo blocked")
    for path in ("pipe", "pipelink"):
        assert isinstance(outcome[path], PathRefused) and "fifo" in str(outcome[path])
    with pytest.raises(PathRefused, match="fifo"):
        fs.write("pipe", b"x")
    assert stat.S_ISFIFO((root / "pipe").lstat().st_mode)
    assert fs.stat("pipe").type == "other"


def test_hardlink_to_outside_file_is_not_read_and_write_does_not_touch_it(fs, root, outside):
    os.link(outside / "canary", root / "hl")
    with pytest.raises(PathRefused, match="hard links"):
        fs.read("hl")
    fs.write("hl", b"replaced")      # replaces the directory entry, not the shared inode
    assert (root / "hl").read_bytes() == b"replaced"


def test_device_node_is_refused(fs, root):
    os.mknod(root / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    with pytest.raises(PathRefused, match="character device"):
        fs.read("null")
    with pytest.raises(PathRefused, match="character device"):
        fs.write("null", b"x")
    assert fs.stat("null").type == "other"


def test_write_over_a_directory_is_refused(fs, root):
    (root / "d").mkdir()
    with pytest.raises(InvalidRequest, match="is a directory"):
        fs.write("d", b"x")
    fs.write("f", b"x")
    with pytest.raises(InvalidRequest, match="not a directory"):
        fs.write("f/x", b"x")


# --- list ----------------------------------------------------------------------------------------

def test_list_reports_symlinks_without_following_them(fs, root, outside):
    fs.write("a/b/c.txt", b"abc")
    fs.write("top.txt", b"t")
    (root / "out").symlink_to(outside)
    (root / "a" / "loop").symlink_to("..")
    os.mkfifo(root / "p")
    flat = {e.path: e.type for e in fs.list()}
    assert flat == {"a": "dir", "out": "symlink", "p": "other", "top.txt": "file"}
    deep = {e.path: e.type for e in fs.list("/workspace", recursive=True)}
    assert deep == {**flat, "a/b": "dir", "a/loop": "symlink", "a/b/c.txt": "file"}
    assert [e.name for e in fs.list("a")] == ["b", "loop"]
    assert len(fs.list(recursive=True, limit=3)) == 3
    c = fs.list("a/b")[0]
    assert (c.path, c.name, c.size, c.mode) == ("a/b/c.txt", "c.txt", 3, 0o644)
    with pytest.raises(InvalidRequest):
        fs.list("top.txt")
    with pytest.raises(FileNotFound):
        fs.list("nope")


def test_stat(fs, root):
    fs.write("f", b"12345")
    (root / "l").symlink_to("/etc/passwd")
    assert fs.stat("f").size == 5 and fs.stat("f").type == "file"
    assert fs.stat("l").type == "symlink"
    assert fs.stat("").type == "dir" and fs.stat("/workspace").path == ""


# --- delete --------------------------------------------------------------------------------------

def test_delete_file_dir_and_symlinks(fs, root, outside):
    fs.write("f", b"x")
    fs.write("d/e/f", b"x")
    (root / "d" / "link").symlink_to(outside)
    (root / "tofile").symlink_to(outside / "canary")
    fs.delete("f")
    with pytest.raises(InvalidRequest, match="recursively"):
        fs.delete("d")
    fs.delete("tofile")                     # only the link goes
    fs.delete("d", recursive=True)          # does not descend into d/link
    assert os.listdir(root) == []
    with pytest.raises(FileNotFound):
        fs.delete("f")


def test_delete_symlink_to_outside_dir_recursively_removes_only_the_link(fs, root, outside):
    (root / "out").symlink_to(outside)
    fs.delete("out", recursive=True)
    assert not (root / "out").is_symlink()
    (root / "out").symlink_to(outside)
    with pytest.raises(PathRefused, match="escapes"):
        fs.delete("out/canary")
    with pytest.raises(PathRefused, match="escapes"):
        fs.delete("out/sub", recursive=True)


@pytest.mark.parametrize("path", ["", "/workspace", ".", "/workspace/", "a/.."])
def test_delete_of_root_is_refused(fs, root, path):
    with pytest.raises(PathRefused, match="workspace root"):
        fs.delete(path, recursive=True)
    assert root.is_dir()


def make_deep_tree(root: Path, depth: int) -> None:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(depth):
            os.mkdir("d", dir_fd=fd)
            if i % 100 == 0:
                os.close(os.open(f"file{i}", os.O_WRONLY | os.O_CREAT, dir_fd=fd))
            nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
    finally:
        os.close(fd)


def test_deep_tree_beyond_path_max_is_listed_and_deleted(fs, root):
    (root / "deep").mkdir()
    make_deep_tree(root / "deep", 2500)
    assert len(fs.list("deep", recursive=True, limit=100)) == 100
    entries = fs.list("deep", recursive=True)
    assert len(entries) == 2500 + 25
    assert entries[-1].path.count("/") == 2500 and entries[-1].name == "d"
    fs.delete("deep", recursive=True)
    assert os.listdir(root) == []


# --- races ---------------------------------------------------------------------------------------

def test_swapping_a_directory_for_a_symlink_never_leaks(fs, root, outside):
    """The sandbox flips `d` between a real directory and a symlink to the outside while we read
    and write through it: every attempt either stays inside or is refused."""
    stop = threading.Event()
    (root / "d.real").mkdir()
    (root / "d.real" / "canary").write_bytes(b"inside\n")
    (root / "d.link").symlink_to(outside)

    def swapper() -> None:
        while not stop.is_set():
            for name in ("d.real", "d.link"):
                try:
                    os.rename(root / name, root / "d")
                    os.rename(root / "d", root / name)
                except OSError:
                    pass

    thread = threading.Thread(target=swapper)
    thread.start()
    try:
        for _ in range(400):
            try:
                data, _, _ = fs.read("d/canary")
                assert data == b"inside\n"
            except (PathRefused, FileNotFound, InvalidRequest):
                pass
            try:
                fs.write("d/canary", b"inside\n", make_parents=False)
            except (PathRefused, FileNotFound, InvalidRequest):
                pass
    finally:
        stop.set()
        thread.join()
    assert (outside / "canary").read_bytes() == b"host secret\n"


def test_swapping_the_final_component_for_a_symlink_never_leaks(fs, root, outside):
    """`f` flips between a regular file and a symlink to the outside canary while we read and
    write it: we read only the inside content, and the canary is never written."""
    stop = threading.Event()
    (root / "f.real").write_bytes(b"inside\n")
    (root / "f.link").symlink_to(outside / "canary")

    def swapper() -> None:
        while not stop.is_set():
            for name in ("f.real", "f.link"):
                try:
                    os.rename(root / name, root / "f")
                    os.rename(root / "f", root / name)
                except OSError:
                    pass

    thread = threading.Thread(target=swapper)
    thread.start()
    try:
        for _ in range(400):
            try:
                assert fs.read("f")[0] == b"inside\n"
            except (PathRefused, FileNotFound):
                pass
            try:
                fs.write("f", b"inside\n")
            except PathRefused:
                pass
    finally:
        stop.set()
        thread.join()
    for leftover in ("f", "f.real"):
        if (root / leftover).exists() and not (root / leftover).is_symlink():
            assert (root / leftover).read_bytes() == b"inside\n"


def test_list_of_a_wide_and_deep_tree_visits_everything(fs, root):
    chain = "/".join(["d"] * 100)
    (root / "t/a/b/x" / chain).mkdir(parents=True)
    (root / "t/y").mkdir()
    (root / "t/a/b/y").mkdir()
    (root / "t/a/b/y/f").write_bytes(b"f")
    (root / "t/z").write_bytes(b"z")
    paths = [e.path for e in fs.list("t", recursive=True)]
    assert len(paths) == len(set(paths)) == 3 + 1 + 2 + 100 + 1
    assert {"t/y", "t/z", "t/a/b/y/f", "t/a/b/x/" + chain} <= set(paths)


def test_messages_never_show_the_host_directory(fs, root, tmp_path):
    (root / "out").symlink_to(tmp_path)
    (root / "loop").symlink_to("loop")
    os.mkfifo(root / "p")
    (root / "d").mkdir()
    calls = [lambda: fs.read("out/outside/canary"), lambda: fs.read("missing"), lambda: fs.read("p"),
             lambda: fs.read("loop"), lambda: fs.write("d", b""), lambda: fs.delete("d"),
             lambda: fs.list("out"), lambda: fs.stat("nope/x"), lambda: fs.write("../x", b"")]
    for call in calls:
        with pytest.raises((PathRefused, FileNotFound, InvalidRequest)) as err:
            call()
        assert str(tmp_path) not in f"{err.value} {err.value.details}"
        assert "/workspace" in str(err.value)
