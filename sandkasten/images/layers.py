"""Image archives: `docker save` tars and OCI image layouts (a directory or a tar of one).

Who runs this: `imgbuilder import` (through `tarimport.import_tar`), as root, on archives of
unknown origin. An image archive is not a root filesystem: it holds a manifest and one tar per
layer, to be applied in order, each on top of the last, with the OCI whiteouts (`.wh.NAME`
removes NAME from the layers below, `.wh..wh..opq` empties its directory of them). This module
only *finds* the layers; `tarimport` extracts each with the same member-by-member checks as a
plain rootfs tar.

- `docker save` (any version): `manifest.json` = `[{"Config", "RepoTags", "Layers": [paths]}]`.
- OCI layout: `oci-layout`, `index.json` → (an index per platform →) an image manifest →
  `layers[].digest` → `blobs/<algorithm>/<hex>`. A multi-platform index picks this host's.

Names inside an archive are checked (no `..`, no absolute paths, digests are hex), so a
manifest cannot point outside a layout directory.
"""

from __future__ import annotations

import io
import json
import os
import platform
import re
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from sandkasten.errors import ImageInvalid

MANIFEST, OCI_LAYOUT, OCI_INDEX = "manifest.json", "oci-layout", "index.json"
INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
               "application/vnd.docker.distribution.manifest.list.v2+json")
DIGEST = re.compile(r"^(sha256|sha512):([0-9a-f]{32,128})$")
_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
MAX_JSON = 16 * 1024 * 1024


@dataclass(frozen=True)
class Layer:
    name: str          # inside the archive: "abc/layer.tar" or "blobs/sha256/<hex>"


class Blobs:
    """Files of an image archive by their archive path: a tar (random access) or a directory."""

    def __init__(self, where: Path, tf: tarfile.TarFile | None):
        self.where, self.tf = where, tf
        self.members = ({_clean(m.name): m for m in tf.getmembers() if m.isfile()} if tf is not None else {})

    def has(self, name: str) -> bool:
        if self.tf is not None:
            return name in self.members
        return (self.where / name).is_file() and not (self.where / name).is_symlink()

    @contextmanager
    def open(self, name: str) -> Iterator[io.BufferedReader]:
        """A buffered reader of the blob (callers peek at its magic bytes)."""
        name = _checked_name(name)
        if self.tf is not None:
            member = self.members.get(name)
            f = self.tf.extractfile(member) if member is not None else None
            if f is None:
                raise ImageInvalid(f"unable to import image archive {self.where}: it names {name!r}, which it lacks")
            with f:
                yield cast(io.BufferedReader, f)   # an ExFileObject, typed only as IO[bytes] by typeshed
            return
        path = self.where / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise ImageInvalid(f"unable to import image archive {self.where}: unable to open {name!r}: "
                               f"{e.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            yield f

    def json(self, name: str):
        with self.open(name) as f:
            data = f.read(MAX_JSON + 1)
        if len(data) > MAX_JSON:
            raise ImageInvalid(f"unable to import image archive {self.where}: {name} is too large")
        try:
            return json.loads(data)
        except ValueError as e:
            raise ImageInvalid(f"unable to import image archive {self.where}: {name} is not JSON ({e})") from None


def is_layout_dir(path: Path) -> bool:
    return path.is_dir() and (path / OCI_LAYOUT).is_file()


@contextmanager
def opened(path: Path) -> Iterator[Blobs | None]:
    """The archive at `path` as image blobs (a layout dir, or a tar holding manifest.json or
    oci-layout at its top), or None when it is something else (a plain rootfs tar)."""
    if path.is_dir():
        yield Blobs(path, None) if is_layout_dir(path) else None
        return
    try:
        tf = tarfile.open(path, "r:*")  # noqa: SIM115 - only the open's errors mean "not a tar"; `with tf` below
    except (tarfile.TarError, OSError, EOFError):
        yield None  # not a tar tarfile can seek in: let the streaming import say what it is
        return
    with tf:
        try:
            blobs = Blobs(path, tf)
        except (tarfile.TarError, OSError, EOFError):
            yield None
            return
        yield blobs if blobs.has(MANIFEST) or blobs.has(OCI_LAYOUT) else None


def layers(blobs: Blobs) -> list[Layer]:
    """The layers to apply, lowest first."""
    where = blobs.where
    if blobs.has(MANIFEST):
        manifest = blobs.json(MANIFEST)
        if not isinstance(manifest, list) or not manifest:
            raise ImageInvalid(f"unable to import image archive {where}: {MANIFEST} lists no image")
        if len(manifest) > 1:
            tags = [t for m in manifest if isinstance(m, dict) for t in m.get("RepoTags") or []]
            raise ImageInvalid(f"unable to import image archive {where}: it holds {len(manifest)} images "
                               f"({', '.join(tags) or 'untagged'}); save one image per archive")
        found = manifest[0].get("Layers") if isinstance(manifest[0], dict) else None
        if not isinstance(found, list) or not all(isinstance(x, str) for x in found):
            raise ImageInvalid(f"unable to import image archive {where}: {MANIFEST} has no list of Layers")
        return [Layer(_checked_name(x)) for x in found]
    image = _pick_manifest(blobs, blobs.json(OCI_INDEX), depth=0)
    found = image.get("layers")
    if not isinstance(found, list):
        raise ImageInvalid(f"unable to import image archive {where}: its image manifest has no layers")
    return [Layer(_blob_name(where, x)) for x in found]


def _pick_manifest(blobs: Blobs, index, depth: int) -> dict:
    where = blobs.where
    if depth > 4 or not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
        raise ImageInvalid(f"unable to import image archive {where}: {OCI_INDEX} lists no manifests")
    entries = [m for m in index["manifests"] if isinstance(m, dict)]
    arch = _ARCH.get(platform.machine().lower(), platform.machine().lower())
    usable = [m for m in entries if not isinstance(m.get("platform"), dict)
              or (m["platform"].get("architecture") == arch and m["platform"].get("os", "linux") == "linux")]
    if not usable:
        have = sorted({str(m.get("platform", {}).get("architecture")) for m in entries})
        raise ImageInvalid(f"unable to import image archive {where}: no image for {arch} (it has {', '.join(have)})")
    if len(usable) > 1 and not any(isinstance(m.get("platform"), dict) for m in usable):
        raise ImageInvalid(f"unable to import image archive {where}: {OCI_INDEX} lists {len(usable)} images; "
                           "save one image per archive")
    chosen = usable[0]
    doc = blobs.json(_blob_name(where, chosen))
    if chosen.get("mediaType") in INDEX_TYPES or (isinstance(doc, dict) and "manifests" in doc):
        return _pick_manifest(blobs, doc, depth + 1)
    if not isinstance(doc, dict):
        raise ImageInvalid(f"unable to import image archive {where}: its image manifest is not an object")
    return doc


def _blob_name(where: Path, descriptor) -> str:
    digest = descriptor.get("digest") if isinstance(descriptor, dict) else None
    found = DIGEST.match(digest) if isinstance(digest, str) else None
    if not found:
        raise ImageInvalid(f"unable to import image archive {where}: bad digest {digest!r}")
    return f"blobs/{found.group(1)}/{found.group(2)}"


def _clean(name: str) -> str:
    return "/".join(p for p in name.split("/") if p not in ("", "."))


def _checked_name(name: str) -> str:
    clean = _clean(name)
    if not clean or ".." in clean.split("/") or name.startswith("/") or "\0" in name:
        raise ImageInvalid(f"unable to import image archive: refused path {name!r} in its manifest")
    return clean
