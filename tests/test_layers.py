"""Image archives (issue 15): `docker save` tars and OCI layouts are imported layer by layer,
whiteouts applied — not unpacked as if they were a root filesystem."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import platform
import subprocess
import tarfile
from pathlib import Path

import pytest

from sandkasten.errors import ImageInvalid
from sandkasten.images import import_tar
from tests.test_images import busybox, entry, shell_entries, store  # noqa: F401 - fixtures
from tests.test_imgbuilder_cli import cfg, run  # noqa: F401 - fixture

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="image import keeps ownership: needs root")
ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


def layer_bytes(entries: list[tuple]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for ti, data in entries:
            tf.addfile(ti, data)
    return buf.getvalue()


def two_layers(busybox_path: Path) -> list[bytes]:
    lower = shell_entries(busybox_path) + [
        entry("etc", "dir"), entry("etc/old.conf", data=b"old\n"), entry("opt/stuff", "dir"),
        entry("opt/stuff/a", data=b"a"), entry("opt/stuff/b", data=b"b"), entry("var/gone", "dir"),
        entry("var/gone/f", data=b"f"), entry("srv/x", "dir"), entry("srv/x/y", data=b"y"),
    ]
    upper = [
        entry("etc/.wh.old.conf"), entry("etc/new.conf", data=b"new\n"),
        entry("opt/stuff", "dir"), entry("opt/stuff/c", data=b"c"), entry("opt/stuff/.wh..wh..opq"),
        entry("var/.wh.gone"), entry("srv/x", data=b"now a file"),
    ]
    return [layer_bytes(lower), layer_bytes(upper)]


def docker_save_tar(path: Path, layers: list[bytes]) -> Path:
    """The layout of `docker save` before 25: <id>/layer.tar ..., <config>.json, manifest.json."""
    names = []
    with tarfile.open(path, "w") as tf:
        for data in layers:
            lid = hashlib.sha256(data).hexdigest()
            tf.addfile(entry(lid, "dir")[0])
            ti = tarfile.TarInfo(f"{lid}/layer.tar")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
            names.append(f"{lid}/layer.tar")
        config = json.dumps({"architecture": ARCH, "os": "linux"}).encode()
        cid = hashlib.sha256(config).hexdigest()
        for name, data in ((f"{cid}.json", config), ("manifest.json", json.dumps(
                [{"Config": f"{cid}.json", "RepoTags": ["mini:latest"], "Layers": names}]).encode())):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return path


def oci_layout(d: Path, layers: list[bytes]) -> Path:
    """An OCI image layout directory, layers gzip-compressed, behind a multi-platform index."""
    blobs = d / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def blob(data: bytes) -> dict:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    descs = [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **blob(gzip.compress(x))} for x in layers]
    config = blob(json.dumps({"architecture": ARCH, "os": "linux"}).encode())
    manifest = blob(json.dumps({"schemaVersion": 2, "config": config, "layers": descs}).encode())
    other = blob(json.dumps({"schemaVersion": 2, "config": config, "layers": []}).encode())
    (d / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (d / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", **other,
         "platform": {"architecture": "s390x", "os": "linux"}},
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", **manifest,
         "platform": {"architecture": ARCH, "os": "linux"}}]}))
    return d


def assert_layers_applied(rootfs: Path) -> None:
    assert (rootfs / "bin" / "sh").is_symlink()
    assert not (rootfs / "etc" / "old.conf").exists() and (rootfs / "etc" / "new.conf").read_text() == "new\n"
    assert sorted(os.listdir(rootfs / "opt" / "stuff")) == ["c"]
    assert not (rootfs / "var" / "gone").exists()
    assert (rootfs / "srv" / "x").read_bytes() == b"now a file"
    assert not list(rootfs.rglob(".wh.*")) and not (rootfs / "manifest.json").exists()


def test_a_docker_save_tar_is_imported_layer_by_layer(store, busybox, tmp_path):  # noqa: F811
    tar = docker_save_tar(tmp_path / "saved.tar", two_layers(busybox))
    info = import_tar(store, "saved", tar)
    assert store.validate("saved") == []
    assert_layers_applied(Path(info.rootfs))


def test_an_oci_layout_directory_and_its_tar_are_imported(store, busybox, tmp_path):  # noqa: F811
    layout = oci_layout(tmp_path / "layout", two_layers(busybox))
    assert_layers_applied(Path(import_tar(store, "oci-dir", layout).rootfs))
    tar = tmp_path / "layout.tar"
    with tarfile.open(tar, "w") as tf:
        for name in ("blobs", "oci-layout", "index.json"):
            tf.add(layout / name, arcname=name)
    assert_layers_applied(Path(import_tar(store, "oci-tar", tar).rootfs))


def test_image_archives_that_cannot_be_imported_say_why(store, busybox, tmp_path):  # noqa: F811
    layers = two_layers(busybox)
    two = docker_save_tar(tmp_path / "two.tar", layers)
    with tarfile.open(two) as tf:
        manifest = json.loads(tf.extractfile("manifest.json").read())
    bad = tmp_path / "evil.tar"
    with tarfile.open(two) as src, tarfile.open(bad, "w") as dst:
        for m in src.getmembers():
            if m.name == "manifest.json":
                data = json.dumps([{**manifest[0], "Layers": ["../../etc/passwd"]}]).encode()
                m.size = len(data)
                dst.addfile(m, io.BytesIO(data))
            else:
                dst.addfile(m, src.extractfile(m) if m.isfile() else None)
    with pytest.raises(ImageInvalid, match="refused path '../../etc/passwd'"):
        import_tar(store, "evil", bad)
    with subprocess.Popen(["cat", str(two)], stdout=subprocess.PIPE) as cat:  # like `--tar <(cat x)`
        with pytest.raises(ImageInvalid, match="not a root filesystem"):
            import_tar(store, "piped", f"/proc/self/fd/{cat.stdout.fileno()}")
        cat.stdout.close()
    assert not store.exists("evil") and not store.exists("piped")


def test_imgbuilder_import_of_a_docker_save_tar_gives_a_usable_image(cfg, busybox, tmp_path):  # noqa: F811
    tar = docker_save_tar(tmp_path / "saved.tar", two_layers(busybox))
    r = run("import", "--name", "saved", "--tar", str(tar), "--config", str(cfg))
    assert r.returncode == 0 and "imported image saved" in r.stdout and "warning" not in r.stderr, r.stderr
    assert run("validate", "saved", "--config", str(cfg)).returncode == 0
