"""The image store, tar import (with every escape trick) and the stock image builds, on real
files, real tar archives and real chroot. Runs as root (ownership, setuid bits, mounts)."""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from sandkasten.errors import ImageInvalid, ImageNotFound, InvalidRequest
from sandkasten.images import ImageStore, build, build_base, import_tar, resolve_inside
from sandkasten.images.build import find_busybox, host_mirror
from sandkasten.images.store import discard
from sandkasten.runtime.procfs import mounts_under


pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="image import keeps ownership: needs root")


# ---------------------------------------------------------------- fixtures and archive helpers

@pytest.fixture(scope="session")
def busybox(tmp_path_factory) -> Path:
    return find_busybox(tmp_path_factory.mktemp("busybox"), lambda _m: None)


@pytest.fixture
def store(tmp_path) -> ImageStore:
    return ImageStore(tmp_path / "data" / "images")


@pytest.fixture
def outside(tmp_path) -> Path:
    """A host directory an evil archive aims at; must stay untouched."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "secret").write_text("host data\n")
    return d


def entry(name: str, kind: str = "file", data: bytes = b"", mode: int | None = None,
          uid: int = 0, gid: int = 0, link: str = "", mtime: int = 1_700_000_000) -> tuple:
    ti = tarfile.TarInfo(name)
    ti.type = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE,
               "hard": tarfile.LNKTYPE, "chr": tarfile.CHRTYPE, "fifo": tarfile.FIFOTYPE}[kind]
    ti.mode = mode if mode is not None else (0o755 if kind == "dir" else 0o644)
    ti.uid, ti.gid, ti.mtime, ti.linkname = uid, gid, mtime, link
    if kind == "file":
        ti.size = len(data)
    if kind == "chr":
        ti.devmajor, ti.devminor = 1, 3
    return ti, (io.BytesIO(data) if kind == "file" else None)


def write_tar(path: Path, entries: list[tuple], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tf:
        for ti, data in entries:
            tf.addfile(ti, data)
    return path


def shell_entries(busybox: Path) -> list[tuple]:
    """The smallest rootfs a sandbox can start on: a static busybox as /bin/sh."""
    return [entry("bin", "dir"), entry("bin/busybox", data=busybox.read_bytes(), mode=0o755),
            entry("bin/sh", "sym", link="/bin/busybox")]


def assert_nothing_left(store: ImageStore) -> None:
    left = os.listdir(store.images_dir) if store.images_dir.exists() else []
    assert left == [], f"import left {left} behind"


# ---------------------------------------------------------------- import

def test_import_keeps_symlinks_hardlinks_modes_and_owners(store, busybox, tmp_path):
    tar = write_tar(tmp_path / "root.tar", shell_entries(busybox) + [
        entry("./", "dir", mode=0o700),  # the root stays 0755 whatever the archive says
        entry("etc", "dir"),
        entry("etc/passwd", data=b"root:x:0:0::/root:/bin/sh\n"),
        entry("etc/mtab", "sym", link="/proc/self/mounts"),  # absolute: resolved inside the sandbox
        entry("usr/bin/su", data=b"#!/bin/sh\n", mode=0o4755),  # parent dirs implied
        entry("usr/bin/su-again", "hard", link="usr/bin/su"),
        entry("usr/bin/wall", data=b"x", mode=0o2755, gid=5),
        entry("home/u", "dir", mode=0o750, uid=1000, gid=1000),
        entry("home/u/notes", data=b"mine", mode=0o600, uid=1000, gid=1000),
        entry("tmp", "dir", mode=0o1777),
        entry("ro", "dir", mode=0o555, mtime=1_600_000_000),
        entry("ro/inside", data=b"still written"),  # a 0555 dir still takes its children
        entry("dev/null", "chr"),  # device nodes are skipped
        entry("run/fifo", "fifo", mode=0o620),
    ])
    messages: list[str] = []
    info = import_tar(store, "alpine-ish", tar, progress=messages.append)
    root = store.path("alpine-ish")

    assert info.name == "alpine-ish" and info.source == f"tar:{tar}"
    assert info.shell == "/bin/sh" and not info.has_bash and info.size_bytes > busybox.stat().st_size
    assert stat.S_IMODE(root.stat().st_mode) == 0o755
    assert os.readlink(root / "etc/mtab") == "/proc/self/mounts"
    assert os.readlink(root / "bin/sh") == "/bin/busybox"
    su, again = (root / "usr/bin/su").stat(), (root / "usr/bin/su-again").stat()
    assert su.st_ino == again.st_ino and su.st_nlink == 2
    assert stat.S_IMODE(su.st_mode) == 0o4755
    wall = (root / "usr/bin/wall").stat()
    assert stat.S_IMODE(wall.st_mode) == 0o2755 and wall.st_gid == 5
    notes = (root / "home/u/notes").stat()
    assert (notes.st_uid, notes.st_gid, stat.S_IMODE(notes.st_mode)) == (1000, 1000, 0o600)
    assert (root / "home/u").stat().st_uid == 1000
    assert stat.S_IMODE((root / "tmp").stat().st_mode) == 0o1777
    ro = (root / "ro").stat()
    assert stat.S_IMODE(ro.st_mode) == 0o555 and ro.st_mtime == 1_600_000_000
    assert (root / "ro/inside").read_text() == "still written"
    assert not (root / "dev/null").exists()
    assert stat.S_ISFIFO((root / "run/fifo").lstat().st_mode)
    assert any("skipped 1 device nodes" in m for m in messages)
    assert store.validate("alpine-ish") == []
    meta = json.loads((store.images_dir / "alpine-ish" / "image.json").read_text())
    assert meta["source"] == f"tar:{tar}" and meta["has_bash"] is False
    out = subprocess.run(["chroot", str(root), "/bin/sh", "-c", "echo hi"], capture_output=True, text=True)
    assert out.stdout == "hi\n"


@pytest.mark.parametrize("mode,suffix", [("w:gz", "tar.gz"), ("w:xz", "tar.xz"), ("w:bz2", "tar.bz2")])
def test_import_compressed(store, busybox, tmp_path, mode, suffix):
    tar = write_tar(tmp_path / f"root.{suffix}", shell_entries(busybox), mode=mode)
    import_tar(store, "packed", tar)
    assert store.validate("packed") == []


def test_absolute_member_names_land_inside(store, tmp_path, outside):
    tar = write_tar(tmp_path / "abs.tar", [entry(f"{outside}/secret", data=b"overwritten"),
                                           entry("/etc/hostname", data=b"box\n")])
    import_tar(store, "abs", tar)
    root = store.path("abs")
    assert (outside / "secret").read_text() == "host data\n"
    assert (root / str(outside).lstrip("/") / "secret").read_text() == "overwritten"
    assert (root / "etc/hostname").read_text() == "box\n"


def test_file_replacing_a_symlink_is_not_written_through(store, tmp_path, outside):
    tar = write_tar(tmp_path / "swap.tar", [entry("f", "sym", link=str(outside / "secret")),
                                            entry("f", data=b"new")])
    import_tar(store, "swap", tar)
    assert (outside / "secret").read_text() == "host data\n"
    assert (store.path("swap") / "f").read_text() == "new"


def test_hardlink_to_a_symlink_links_the_symlink_itself(store, tmp_path, outside):
    tar = write_tar(tmp_path / "hl.tar", [entry("l", "sym", link=str(outside / "secret")),
                                          entry("h", "hard", link="l")])
    import_tar(store, "hl", tar)
    h = store.path("hl") / "h"
    assert h.is_symlink() and os.readlink(h) == str(outside / "secret")
    assert (outside / "secret").stat().st_nlink == 1


ESCAPES = {
    "dotdot": lambda out: [entry("../evil", data=b"x")],
    "nested-dotdot": lambda out: [entry("a/../../evil", data=b"x")],
    "dir-dotdot": lambda out: [entry("../evil-dir", "dir")],
    "through-absolute-symlink": lambda out: [entry("link", "sym", link=str(out)), entry("link/evil", data=b"x")],
    "through-relative-symlink": lambda out: [entry("up", "sym", link="../../../../../../.."),
                                             entry("up/tmp/evil", data=b"x")],
    "dir-through-symlink": lambda out: [entry("etc", "sym", link=str(out)), entry("etc/sub", "dir")],
    "symlink-through-symlink": lambda out: [entry("link", "sym", link=str(out)),
                                            entry("link/evil", "sym", link="/")],
    "hardlink-dotdot": lambda out: [entry("h", "hard", link="../outside/secret")],
    "hardlink-through-symlink": lambda out: [entry("l", "sym", link=str(out)),
                                             entry("h", "hard", link="l/secret")],
    "hardlink-to-missing": lambda out: [entry("h", "hard", link="nowhere")],
    "hardlink-into-symlink-dir": lambda out: [entry("l", "sym", link=str(out)), entry("x", data=b"x"),
                                              entry("l/h", "hard", link="x")],
}


@pytest.mark.parametrize("trick", sorted(ESCAPES))
def test_escape_tricks_are_refused_and_leave_nothing(store, tmp_path, outside, trick):
    entries = [entry("bin", "dir"), entry("bin/ok", data=b"ok")] + ESCAPES[trick](outside)
    tar = write_tar(tmp_path / "evil.tar", entries)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ImageInvalid) as e:
        import_tar(store, "evil", tar)
    offending = entries[-1][0].name
    assert repr(offending) in e.value.message, e.value.message
    assert_nothing_left(store)
    assert sorted(os.listdir(outside)) == ["secret"]
    assert (outside / "secret").read_text() == "host data\n"
    assert (outside / "secret").stat().st_nlink == 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "data") == before
    assert not (tmp_path.parent / "evil").exists()


@pytest.mark.parametrize("content", [b"this is not a tar archive at all" * 40, b""])
def test_bad_tar_is_refused(store, tmp_path, content):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(content)
    with pytest.raises(ImageInvalid, match="not a readable tar archive"):
        import_tar(store, "bad", bad)
    assert_nothing_left(store)


def test_truncated_targz_is_refused(store, busybox, tmp_path):
    good = write_tar(tmp_path / "good.tar.gz", shell_entries(busybox), mode="w:gz")
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ImageInvalid, match="unable to import image 'cut'"):
        import_tar(store, "cut", cut)
    assert_nothing_left(store)


def test_missing_tar_file(store, tmp_path):
    with pytest.raises(InvalidRequest, match="no such file"):
        import_tar(store, "x", tmp_path / "nope.tar")


def test_import_refuses_an_existing_name_unless_replace(store, busybox, tmp_path):
    tar = write_tar(tmp_path / "a.tar", shell_entries(busybox))
    import_tar(store, "one", tar)
    with pytest.raises(InvalidRequest, match="already exists"):
        import_tar(store, "one", tar)
    tar2 = write_tar(tmp_path / "b.tar", shell_entries(busybox) + [entry("marker", data=b"2")])
    import_tar(store, "one", tar2, replace=True)
    assert (store.path("one") / "marker").read_text() == "2"
    assert os.listdir(store.images_dir) == ["one"]


# ---------------------------------------------------------------- store

@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "-x", "Upper", "x" * 65, "a b", "..", 7])
def test_bad_names_are_refused(store, name):
    with pytest.raises(InvalidRequest, match="invalid image name"):
        store.path(name)


def test_list_get_exists_delete(store, busybox, tmp_path):
    assert store.list() == []
    tar = write_tar(tmp_path / "a.tar", shell_entries(busybox))
    import_tar(store, "b-image", tar)
    import_tar(store, "a.image_1", tar)
    assert [i.name for i in store.list()] == ["a.image_1", "b-image"]
    assert store.exists("b-image") and not store.exists("c")
    assert store.get("b-image").rootfs == store.images_dir / "b-image" / "rootfs"
    store.delete("b-image")
    assert not (store.images_dir / "b-image").exists()
    with pytest.raises(ImageNotFound) as e:
        store.get("b-image")
    assert "'b-image'" in e.value.message and "available: a.image_1" in e.value.message


def test_image_without_metadata_is_described_live(store, busybox):
    rootfs = store.images_dir / "handmade" / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    shutil.copy(busybox, rootfs / "bin" / "sh")
    info = store.get("handmade")
    assert info.source == "unknown" and info.size_bytes == busybox.stat().st_size
    assert store.validate("handmade") == []


def test_image_without_sh_fails_validate(store, tmp_path):
    tar = write_tar(tmp_path / "nosh.tar", [entry("etc/hostname", data=b"x")])
    import_tar(store, "nosh", tar)
    assert store.validate("nosh") == ["/bin/sh is missing or a broken symlink"]
    with pytest.raises(ImageInvalid, match="image 'nosh' is not usable: /bin/sh is missing"):
        store.ensure_valid("nosh")


def test_sh_is_resolved_inside_the_rootfs_not_on_the_host(store, tmp_path):
    # /bin/busybox exists on the host; inside this image the link target is missing
    tar = write_tar(tmp_path / "dangling.tar", [entry("bin/sh", "sym", link="/bin/busybox")])
    import_tar(store, "dangling", tar)
    assert store.validate("dangling") == ["/bin/sh is missing or a broken symlink"]


def test_validate_finds_each_problem(store, tmp_path):
    bash = Path(shutil.which("bash") or "/bin/bash")  # dynamic: needs a loader the image lacks
    tar = write_tar(tmp_path / "broken.tar", [
        entry("bin/sh", data=bash.read_bytes(), mode=0o755),
        entry("tmp", "sym", link="/etc"),  # a tmpfs mounted here would land on the host's /etc
        entry("proc", data=b"not a dir"),
        entry("workspace", "dir"),
    ])
    import_tar(store, "broken", tar)
    problems = store.validate("broken")
    assert any("dynamic loader" in p for p in problems), problems
    assert "/tmp is a symlink (to /etc); mount points must be directories" in problems
    assert "/proc is not a directory" in problems
    assert len(problems) == 3


def test_validate_sh_not_executable(store, tmp_path):
    tar = write_tar(tmp_path / "noexec.tar", [entry("bin/sh", data=b"#!x", mode=0o644)])
    import_tar(store, "noexec", tar)
    assert store.validate("noexec") == ["/bin/sh is not executable"]


def test_resolve_inside_clamps_dotdot_and_stops_loops(tmp_path):
    root = tmp_path / "r"
    (root / "a").mkdir(parents=True)
    (root / "a" / "f").write_text("x")
    (root / "up").symlink_to("../../../../a")
    (root / "abs").symlink_to("/a/f")
    (root / "loop1").symlink_to("loop2")
    (root / "loop2").symlink_to("loop1")
    assert resolve_inside(root, "/up/f") == root / "a" / "f"
    assert resolve_inside(root, "/abs") == root / "a" / "f"
    assert resolve_inside(root, "/../../a/../a/f") == root / "a" / "f"
    assert resolve_inside(root, "/loop1") is None
    assert resolve_inside(root, "/a/f/x") is None


def test_failed_staging_unmounts_and_removes(store, privileged):
    """debootstrap mounts /proc inside its target; a failed build must unmount before rm."""
    with pytest.raises(RuntimeError, match="build failed"):
        with store.staging("mounted", "build:test") as rootfs:
            (rootfs / "proc").mkdir()
            subprocess.run(["mount", "-t", "tmpfs", "none", str(rootfs / "proc")], check=True)
            (rootfs / "proc" / "file").write_text("x")
            raise RuntimeError("build failed")
    assert mounts_under(store.images_dir) == []
    assert_nothing_left(store)


@pytest.mark.parametrize("via_symlink", [False, True])
def test_delete_refuses_an_image_under_a_mounted_overlay(store, busybox, tmp_path, via_symlink):
    import_tar(store, "busy", write_tar(tmp_path / "a.tar", shell_entries(busybox)))
    rootfs = store.path("busy")
    if via_symlink:  # the runtime may see images_dir through a symlink, as the test conftest does
        (tmp_path / "images-link").symlink_to(store.images_dir)
        rootfs = tmp_path / "images-link" / "busy" / "rootfs"
    work = tmp_path / "ovl"
    for d in ("upper", "work", "merged"):
        (work / d).mkdir(parents=True)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={rootfs},upperdir={work}/upper,workdir={work}/work", str(work / "merged")],
                   check=True)
    try:
        with pytest.raises(InvalidRequest, match="in use as an overlay lower dir"):
            store.delete("busy")
        assert (rootfs / "bin" / "busybox").exists()
    finally:
        subprocess.run(["umount", str(work / "merged")], check=True)
    store.delete("busy")
    assert_nothing_left(store)


def test_discard_refuses_nothing_outside_but_removes_tree(tmp_path):
    d = tmp_path / "x"
    (d / "a" / "b").mkdir(parents=True)
    (d / "a" / "b" / "f").write_text("1")
    (d / "link").symlink_to(tmp_path)  # rmtree must not follow it
    discard(d)
    assert not d.exists() and tmp_path.exists()


# ---------------------------------------------------------------- builds

def test_build_base_for_real(store):
    messages: list[str] = []
    info = build_base(store, messages.append)
    root = store.path("base")
    assert info.source == "build:base" and info.shell == "/bin/sh"
    assert store.validate("base") == []
    out = subprocess.run(["chroot", str(root), "/bin/sh", "-c", "echo hi; id -u nobody"],
                         capture_output=True, text=True)
    assert out.stdout == "hi\n65534\n", out.stderr
    assert stat.S_IMODE((root / "tmp").stat().st_mode) == 0o1777
    for d in ("proc", "dev", "workspace", "root", "home", "etc"):
        assert (root / d).is_dir()
    assert "nobody:x:65534:65534" in (root / "etc/passwd").read_text()
    assert "nogroup:x:65534" in (root / "etc/group").read_text()
    assert "ID=sandkasten-base" in (root / "etc/os-release").read_text()
    assert os.readlink(root / "usr/bin/awk") == "../../bin/busybox"
    assert build(store, "base") is None  # cached: no rebuild without force
    assert build(store, "base", force=True) is not None
    assert os.listdir(store.images_dir) == ["base"]


def test_host_mirror_from_deb822_and_one_line_sources(tmp_path):
    d = tmp_path / "apt"
    (d / "sources.list.d").mkdir(parents=True)
    (d / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\n# URIs: http://commented.invalid/x\nURIs: http://mirror.invalid/debian\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n\n"
        "Types: deb\nURIs: http://security.invalid/debian-security\nSuites: bookworm-security\n")
    assert host_mirror("bookworm", d) == "http://mirror.invalid/debian"
    (d / "sources.list.d" / "debian.sources").unlink()
    (d / "sources.list").write_text("# deb http://old.invalid/ bookworm main\n"
                                    "deb [arch=amd64 signed-by=/k.gpg] http://list.invalid/debian bookworm main\n")
    assert host_mirror("bookworm", d) == "http://list.invalid/debian"
    with pytest.raises(Exception, match="no Debian mirror for trixie"):
        host_mirror("trixie", d)


def test_python_image(image_store, python_image):
    info = image_store.get(python_image)
    root = image_store.path(python_image)
    assert info.source == "build:python" and info.has_bash and info.shell == "/bin/bash"
    assert image_store.validate(python_image) == []
    out = subprocess.run(["chroot", str(root), "/bin/bash", "-c", "python3 -c 'print(6 * 7)'; id -u nobody"],
                         capture_output=True, text=True)
    assert out.stdout == "42\n65534\n", out.stderr
    assert (root / "workspace").is_dir()
    assert not list((root / "var/cache/apt/archives").glob("*.deb"))
    assert [p.name for p in (root / "var/lib/apt/lists").iterdir()] == ["partial"]
    assert not list(root.glob("usr/lib/python3*/EXTERNALLY-MANAGED"))
